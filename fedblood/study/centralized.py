"""Centralized training: the reference model, and the local-only and pooled baselines.

One recipe for all three (``config.reference`` / ``config.baselines``): Adam with decoupled
weight decay, linear warmup then cosine decay, global-norm gradient clipping, optional
augmentation, early stopping on a validation split. A narrow VGG without normalisation layers
collapses to one class on pooled data with a large constant lr; warmup + clipping is what makes
it robust.

The learning rate is computed on the host from the schedule and passed to the jitted step as an
argument, so every fit of the same model and partition reuses one compiled step whatever its
length. Batches are gathered on the host (small uint8 arrays) into a fixed shape with a mask for
the last partial one.

Each epoch is checkpointed (last one + best by the monitored validation metric); a fit restarts
from its last committed epoch with the early-stopping counters stored in the checkpoint's meta,
and every random stream is ``fold_in(key, epoch)``, so an interrupted fit finishes bit-identical
to an uninterrupted one.
"""

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedblood.model import classifier, metrics, partition
from fedblood.rundir import checkpoint
from fedblood.study import selection


class FitResult(NamedTuple):
  """Attributes:
    params: the best epoch's full parameter tree.
    epoch: the best epoch (1-based).
    val: the best epoch's validation metrics summary.
    epochs_run: epochs trained before stopping.
  """
  params: Any
  epoch: int
  val: dict
  epochs_run: int


def adam_tx(max_grad_norm: float, weight_decay: float) -> optax.GradientTransformation:
  """Clip, Adam, decoupled weight decay; the caller multiplies by ``-lr``."""
  parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
  parts += [optax.scale_by_adam(), optax.add_decayed_weights(weight_decay)]
  return optax.chain(*parts)


def lr_at(recipe, step: int, total_steps: int, steps_per_epoch: int) -> float:
  """Linear warmup from 0 over ``warmup_epochs``, then cosine decay to ``lr * final_lr_fraction``.

  Plain Python (the same curve as ``optax.warmup_cosine_decay_schedule``): it runs
  on the host once per step, where a jnp schedule would cost a dispatch each time.
  """
  warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
  end = recipe.lr * recipe.get('final_lr_fraction', 0.01)
  if step < warmup:
    return recipe.lr * step / warmup
  decay = max(total_steps - warmup, 1)
  progress = min(step - warmup, decay) / decay
  return end + (recipe.lr - end) * 0.5 * (1 + math.cos(math.pi * progress))


@functools.lru_cache(maxsize=8)
def train_step_fn(model, max_grad_norm: float, weight_decay: float, augment_fn: Callable | None):
  """Jitted ``(trainable, opt_state, frozen, batch, rng, lr) -> (trainable, opt_state, loss, acc)``.

  Cached per (model, clipping, weight decay, augmentation): fits that share them share
  one compilation.
  """
  loss_fn = classifier.classifier_loss(model, augment_fn)
  tx = adam_tx(max_grad_norm, weight_decay)

  @jax.jit
  def step(trainable, opt_state, frozen, batch, rng, lr):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    return optax.apply_updates(trainable, updates), opt_state, loss, aux['accuracy']

  return step, tx


# classifier.make_predict(model, batch_size), compiled once per (model, batch size).
predict_fn = functools.lru_cache(maxsize=8)(classifier.make_predict)


def predict_probs(model, trainable, frozen, images: np.ndarray,
                  batch_size: int = 128) -> np.ndarray:
  """Softmax probabilities ``[N, K]`` of uint8 images, in fixed-size chunks (one compile)."""
  predict = predict_fn(model, batch_size)
  logits = [predict(trainable, frozen, c) for c in classifier.chunks([images], batch_size)]
  return classifier.probabilities(logits, len(images), model.num_classes)


def evaluate(model, trainable, frozen, split, batch_size: int = 128) -> dict:
  """Full metrics (:func:`fedblood.model.metrics.classify`) of a model on a split."""
  probs = predict_probs(model, trainable, frozen, split.images, batch_size)
  return metrics.classify(split.labels, probs.argmax(-1) if len(probs) else np.zeros(0, int))


def epoch_batches(rng, n: int, batch_size: int):
  """Index ``[steps, B]`` and mask ``[steps, B]`` of one epoch in a random order."""
  return _batched(np.asarray(jax.random.permutation(rng, n)), batch_size)


def balanced_batches(rng, groups: np.ndarray, batch_size: int):
  """Like :func:`epoch_batches`, every group drawn equally (:func:`selection.balanced_order`)."""
  return _batched(selection.balanced_order(rng, groups), batch_size)


def _batched(order: np.ndarray, batch_size: int):
  """``order`` cut into ``[steps, B]`` rows, the last one padded, with its mask."""
  n = len(order)
  steps = max(1, math.ceil(n / batch_size))
  pad = steps * batch_size - n
  idx = np.concatenate([order, np.zeros(pad, order.dtype)]).reshape(steps, batch_size)
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return idx, mask.reshape(steps, batch_size)


def _val_summary(model, t, frozen, val, eval_batch):
  """:func:`selection.validation` of a fit's ``val``, the network whole: one pass over every
  split's images (one padded chunk in all, not one per center), each split's metrics from its
  own rows."""
  splits = selection.val_splits(val)
  if not splits:
    return None, None
  probs = predict_probs(model, t, frozen, np.concatenate([v.images for v in splits]), eval_batch)
  ends = np.cumsum([len(v.labels) for v in splits])[:-1]
  return selection.validation(val, [metrics.classify(v.labels, p.argmax(-1))
                                    for v, p in zip(splits, np.split(probs, ends))])


def check_finite(value: float, what: str, last_good: str) -> None:
  """Stops a run on a NaN/inf loss with a message naming where and the checkpoint kept."""
  if not np.isfinite(value):
    raise FloatingPointError(f'{what}: the training loss is {value}. Stopped; the last good '
                             f'checkpoint is kept: {last_good}. Lower the learning rate or '
                             'check the data, then rerun the same command to resume from it.')


class FitModel(NamedTuple):
  """The model-side settings of a fit on its own; a run's fits take its Experiment, which has
  the fields and method of these names too.

  Attributes:
    model: the Flax module.
    augment: optional ``(rng, float images) -> images`` of the training batches.
    eval_batch: validation batch size.
    progress: optional tqdm-like factory ``(total, desc, initial) -> bar``.
  """
  model: Any
  augment: Callable | None = None
  eval_batch: int = 128
  progress: Callable | None = None

  def validator(self, frozen, val) -> Callable:
    """``trainable -> (metrics or None, summary or None)`` on ``val``: the network whole."""
    return lambda trainable: _val_summary(self.model, trainable, frozen, val, self.eval_batch)


def fit(name: str, exp, params, rules, train, val, recipe, key, ckpt_dir, *, log=None,
        keep: int = 1, on_resume: Callable[[int], None] | None = None,
        groups: np.ndarray | None = None) -> FitResult:
  """Trains ``params`` on ``train``, early-stopped on ``val``; resumes from ``ckpt_dir``.

  Args:
    name: stage name (logs, checkpoint meta, messages), e.g. 'reference'.
    exp: the run's Experiment, or a :class:`FitModel` (``model``, ``augment``, ``progress``,
      ``validator``).
    params, rules: initial full parameter tree; partition rules (frozen blocks get no update).
    train, val: splits with ``images`` uint8 [N, S, S, 3] and ``labels`` int [N]; ``val`` may
      be a list of splits (one per center): the monitor is then the unweighted mean over them.
    recipe: ConfigDict with epochs, batch_size, lr, warmup_epochs, weight_decay, max_grad_norm,
      patience (epochs without improvement before stopping; 0 = never), monitor (a key of the
      val metrics, higher is better), optionally stop_below_lr (:func:`selection.stop_counts`).
    key: this fit's PRNG key; epoch e uses ``fold_in(key, e)``.
    ckpt_dir: the fit's checkpoint directory.
    log: optional ``callable(row: dict)`` for one row per epoch.
    keep: epochs kept besides the best.
    on_resume: optional ``callable(epoch)`` told the last committed epoch the fit continues
      from (0 when it starts afresh) before it trains; e.g. to drop log rows past it.
    groups: optional ``[N]`` group (center) id of each training example: every epoch then
      draws each group equally often (:func:`balanced_batches`) instead of one permutation.
  """
  if len(train.labels) == 0:
    raise ValueError(f'{name}: the training split is empty')
  trainable, frozen = partition.split(params, rules)
  step_fn, tx = train_step_fn(exp.model, float(recipe.max_grad_norm),
                              float(recipe.weight_decay), exp.augment)
  mngr = checkpoint.manager(ckpt_dir, keep=keep, best_metric='score')
  steps_per_epoch = _steps_per_epoch(train, groups, recipe.batch_size)
  state, track = _start(mngr, {'trainable': trainable, 'opt_state': tx.init(trainable)})
  if on_resume is not None:
    on_resume(track['epoch'])
  bar = exp.progress(recipe.epochs, name, track['epoch']) if exp.progress else None
  validate = exp.validator(frozen, val)
  while not track['done']:
    epoch = track['epoch'] + 1
    last_good = f'epoch {track["epoch"]} in {ckpt_dir}' if track['epoch'] else 'none yet'
    state, loss, accuracy, lr = _train_epoch(step_fn, state, frozen, train, groups, recipe,
                                             jax.random.fold_in(key, epoch), epoch,
                                             steps_per_epoch)
    _check_epoch(f'{name}, epoch {epoch}', loss, state['trainable'], last_good)
    val_metrics, val_summary = validate(state['trainable'])
    score = (val_metrics or val_summary or {}).get(recipe.get('monitor', 'accuracy'))
    score = -loss if score is None else score  # no validation split: fall back to train loss
    track = _advance(track, recipe, epoch, score, val_summary, steps_per_epoch)
    if log is not None:
      log({'stage': name, 'epoch': epoch, 'loss': loss, 'train_accuracy': accuracy, 'lr': lr,
           **({f'val_{k}': v for k, v in val_summary.items()} if val_summary else {})})
    _save_epoch(mngr, epoch, state, name, track, score, loss)
    if bar is not None:
      bar.update(1)
      bar.set_postfix(epoch=epoch, loss=f'{loss:.3f}', val=f'{score:.3f}')
  if bar is not None:
    bar.close()
  best_state, _ = checkpoint.restore(mngr, state, step=track['best_epoch'])
  mngr.close()
  return FitResult(partition.merge(best_state['trainable'], frozen), track['best_epoch'],
                   track['best_val'] or {}, track['epoch'])


def _steps_per_epoch(train, groups, batch_size: int) -> int:
  """Steps of one epoch: every example once, or (balanced) every group as often as the largest."""
  epoch_len = (len(train.labels) if groups is None
               else len(np.unique(groups)) * math.ceil(len(groups) / len(np.unique(groups))))
  return max(1, math.ceil(epoch_len / batch_size))


def _start(mngr, state: dict) -> tuple[dict, dict]:
  """``(state, track)``: fresh, or restored from the fit's last committed epoch."""
  track = {'epoch': 0, 'best_epoch': 0, 'best': -math.inf, 'bad_epochs': 0, 'done': False,
           'best_val': None}
  restored = checkpoint.restore_latest(mngr, state)
  if restored is not None:
    state, track = restored[0], restored[1]['track']
  return state, track


def _train_epoch(step_fn, state, frozen, train, groups, recipe, epoch_key, epoch: int,
                 steps_per_epoch: int):
  """One epoch of steps: ``(state, mean train loss, mean train accuracy, last lr)``."""
  if groups is None:
    idx, mask = epoch_batches(jax.random.fold_in(epoch_key, 0), len(train.labels),
                              recipe.batch_size)
  else:
    idx, mask = balanced_batches(jax.random.fold_in(epoch_key, 0), groups, recipe.batch_size)
  total_steps = recipe.epochs * steps_per_epoch
  losses, accs, weights = [], [], []
  t, o = state['trainable'], state['opt_state']
  for s in range(len(idx)):
    batch = {'image': jnp.asarray(train.images[idx[s]]),
             'label': jnp.asarray(train.labels[idx[s]]),
             'mask': jnp.asarray(mask[s])}
    lr = lr_at(recipe, (epoch - 1) * steps_per_epoch + s, total_steps, steps_per_epoch)
    t, o, loss, acc = step_fn(t, o, frozen, batch, jax.random.fold_in(epoch_key, s + 1),
                              jnp.float32(lr))
    losses.append(loss)
    accs.append(acc)
    weights.append(mask[s].sum())
  losses, accs = np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(accs))
  return ({'trainable': t, 'opt_state': o}, float(np.average(losses, weights=weights)),
          float(np.average(accs, weights=weights)), lr)


def _check_epoch(where: str, loss: float, trainable, last_good: str) -> None:
  """Stops on a non-finite loss or parameters, naming the checkpoint kept."""
  check_finite(loss, where, last_good)
  if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(trainable)):
    raise FloatingPointError(f'{where}: non-finite parameters after the epoch. '
                             f'Stopped; the last good checkpoint is kept: {last_good}.')


def _advance(track: dict, recipe, epoch: int, score, val_summary, steps_per_epoch: int) -> dict:
  """The early-stopping record after ``epoch`` (:func:`fedblood.study.selection.advance`)."""
  total_steps = recipe.epochs * steps_per_epoch
  counts = selection.stop_counts(recipe, epoch, steps_per_epoch, total_steps, lr_at)
  track = selection.advance(track, epoch, score, counts, val_summary)
  stop_early = bool(recipe.patience and track['bad_epochs'] >= recipe.patience)
  track['done'] = epoch >= recipe.epochs or stop_early
  return track


def _save_epoch(mngr, epoch: int, state, name: str, track: dict, score, loss: float) -> None:
  # Ranking score with ties broken towards the earliest epoch (the one early stopping keeps).
  checkpoint.save(mngr, epoch, state,
                  {'kind': 'epoch', 'stage': name, 'track': track, 'best_metric': 'score',
                   'metrics': {'score': score, 'loss': loss}},
                  metrics={'score': score - 1e-9 * epoch})
