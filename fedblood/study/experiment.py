"""The parts of a run that the config fixes, built once: :class:`Experiment`.

``build(config)`` makes the model, its trainable/frozen partition, the augmentation, the
classifier loss and the evaluation; every stage (:mod:`fedblood.study.stages`) and
:func:`fedblood.study.inference.load_model` take the :class:`Experiment` plus their own sub-config
(``config.reference``, ``config.fl``, ``config.baselines``) instead of the whole config.

Compiled functions are keyed on values, never on the config's text: :class:`Augment` and
:class:`Loss` are hashable values (equal settings are equal), so two runs of one config in one
process (a resume, the tests) share the jitted steps cached per ``(model, augment)`` or per loss.
"""

import functools
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedblood import data
from fedblood.model import classifier, metrics, models, partition
from fedblood.rundir import checkpoint_listing
from fedblood.study import centralized, selection

# Sub-keys of the run's key, one per stage (fold_in(key, STAGE[...])).
STAGE = {'reference': 1, 'fl': 2, 'participation': 3, 'pooled': 4, 'local': 100,
         'personal': 1000}


class Augment(NamedTuple):
  """``(rng, images) -> images`` of the ``data.augment`` settings, as a hashable value."""
  settings: ml_collections.FrozenConfigDict

  def __call__(self, rng, images):
    return data.augment(rng, images, self.settings)


class Loss(NamedTuple):
  """The classifier's masked cross-entropy with ``augment``, as a hashable value.

  ``(trainable, frozen, batch, rng) -> (loss, aux)``
  (:func:`fedblood.model.classifier.classifier_loss`); ``logit_adjust`` is FL's
  (``fl.logit_adjust``, set by :func:`fedblood.core.rounds.local_loss`).
  """
  model: Any
  augment: Augment | None
  logit_adjust: float = 0.0

  def __call__(self, trainable, frozen, batch, rng):
    return classifier.classifier_loss(self.model, self.augment, self.logit_adjust)(
        trainable, frozen, batch, rng)


# Features of the frozen blocks that FL's per-round evaluation keeps in memory
# (:meth:`Experiment.prepare`): 7 MB for the CPU study's 849 validation and test images; above
# this they are recomputed every round.
EVAL_CACHE_BYTES = 1 << 30


class Prepared(NamedTuple):
  """Splits made ready for repeated evaluation (:meth:`Experiment.prepare`).

  Attributes:
    sizes: images per split.
    labels: each split's labels.
    chunks: ``eval_batch``-image chunks of every split's images in turn (the last one padded),
      or with ``cached`` their features after block ``trunk_blocks``.
    cached: whether ``chunks`` hold features.
  """
  sizes: tuple
  labels: list
  chunks: list
  cached: bool


class Experiment(NamedTuple):
  """What every stage of a run shares, from :func:`build`.

  Attributes:
    model: the Flax classifier (:func:`fedblood.model.models.build` of ``config.model``).
    rules: the FL partition (``model.frozen_blocks`` frozen): which params train, which not.
    augment: the training augmentation (``data.augment``), or None when disabled.
    loss: ``(trainable, frozen, batch, rng) -> (loss, aux)``, the classifier's loss.
    key: the run's root key (``config.seed``); stage ``s`` uses ``fold_in(key, STAGE[s])``.
    shapes: the parameter tree's shapes and dtypes (nothing run).
    init: ``() -> params``: fresh parameters of ``config.seed``, with ``model.pretrained``.
    eval_batch: ``eval.batch_size``.
    progress: a tqdm-like ``(total, desc, initial) -> bar`` factory, or None (``progress``).
    model_name: ``model.name``, for checkpoint summaries.
    trunk_blocks: ``model.frozen_blocks``: every evaluation runs the blocks up to it and the
      rest as two compiled halves (:meth:`prepare`), so FL's per-round evaluation computes the
      frozen blocks' features once.
  """
  model: Any
  rules: Any
  augment: Augment | None
  loss: Loss
  key: jax.Array
  shapes: Any
  init: Callable[[], Any]
  eval_batch: int
  progress: Callable | None
  model_name: str
  trunk_blocks: int

  def split(self, params) -> tuple[Any, Any]:
    """``(trainable, frozen)`` of a full parameter tree, by :attr:`rules`."""
    return partition.split(params, self.rules)

  def evaluate(self, trainable, frozen, split) -> dict:
    """Full metrics (:func:`fedblood.model.metrics.classify`) of a model on a split."""
    return self.evaluate_many(trainable, frozen, [split])[0]

  def evaluate_many(self, trainable, frozen, splits) -> list:
    """:meth:`evaluate` of each of ``splits``, their images predicted in ONE pass.

    The chunks of ``eval_batch`` images run full across the splits' borders: a center's 54
    test images no longer cost a padded chunk of their own (the per-round evaluation of 4
    centers' test and validation splits ran 11 chunks of 128 for 849 images, now 7).
    """
    return self.evaluate_prepared(trainable, frozen, self.prepare(frozen, splits, max_bytes=0))

  def prepare(self, frozen, splits, max_bytes: int = EVAL_CACHE_BYTES) -> Prepared:
    """``splits`` made ready for evaluations that repeat under the same ``frozen`` parameters.

    Their images in chunks of ``eval_batch`` (across the splits' borders, the last one padded);
    with ``model.frozen_blocks = k > 0`` each chunk is replaced by its features after block k
    (:func:`fedblood.model.classifier.make_trunk`) when they all fit in ``max_bytes``: FL
    evaluates every round with blocks 1..k fixed, so only the blocks after them run per round.
    Cached or not, :meth:`evaluate_prepared` gives the same numbers (the same two compiled
    halves on the same chunks).
    """
    sizes = tuple(len(s.labels) for s in splits)
    chunks = classifier.chunks([s.images for s in splits], self.eval_batch)
    cached = False
    if self.trunk_blocks and chunks and max_bytes > 0:  # (0: no tracing just to size them)
      trunk = classifier.make_trunk(self.model, self.trunk_blocks)
      one = jax.eval_shape(trunk, frozen, chunks[0])
      if len(chunks) * one.size * one.dtype.itemsize <= max_bytes:
        chunks, cached = [trunk(frozen, c) for c in chunks], True
    return Prepared(sizes, [s.labels for s in splits], chunks, cached)

  def validator(self, frozen, val) -> Callable:
    """``trainable -> (metrics or None, summary or None)``: a fit's validation on ``val`` (a split,
    or a list of splits: the mean over them), as :meth:`centralized.FitModel.validator`.

    A fit that keeps this run's trunk blocks frozen (the baselines and site fine-tuning from
    the reference or a federated model) gets ``val`` made ready once (:meth:`prepare`): each
    epoch then runs only the blocks after them, as FL's per-round evaluation does.
    """
    if not self._holds_trunk(frozen):
      return centralized.FitModel(self.model, eval_batch=self.eval_batch).validator(frozen, val)
    prepared = self.prepare(frozen, selection.val_splits(val))
    return lambda trainable: selection.validation(
        val, self.evaluate_prepared(trainable, frozen, prepared))

  def _holds_trunk(self, frozen) -> bool:
    """Whether ``frozen`` holds every parameter of blocks 1..:attr:`trunk_blocks` (> 0)."""
    blocks = [f'block{i}' for i in range(1, self.trunk_blocks + 1)]
    return bool(blocks) and all(
        b in frozen and jax.tree.structure(frozen[b]) == jax.tree.structure(self.shapes[b])
        for b in blocks)

  def evaluate_prepared(self, trainable, frozen, prepared: Prepared) -> list:
    """:meth:`evaluate` of each split :meth:`prepare` made ready (same ``frozen``)."""
    probs = self.predict_prepared(trainable, frozen, prepared)
    out, start = [], 0
    for labels, n in zip(prepared.labels, prepared.sizes):
      out.append(metrics.classify(labels, probs[start:start + n].argmax(-1)))
      start += n
    return out

  def predict_prepared(self, trainable, frozen, prepared: Prepared) -> np.ndarray:
    """Softmax probabilities ``[N, K]`` of the images :meth:`prepare` made ready."""
    if self.trunk_blocks:
      trunk = classifier.make_trunk(self.model, self.trunk_blocks)
      rest = classifier.make_rest(self.model, self.trunk_blocks)
      logits = [rest(trainable, frozen, c if prepared.cached else trunk(frozen, c))
                for c in prepared.chunks]
    else:
      predict = centralized.predict_fn(self.model, self.eval_batch)
      logits = [predict(trainable, frozen, c) for c in prepared.chunks]
    return classifier.probabilities(logits, sum(prepared.sizes), self.model.num_classes)

  def evaluate_splits(self, params, splits: dict) -> dict:
    """``{name: metrics}`` of full ``params`` on each split of ``{name: split}`` (one pass)."""
    return dict(zip(splits, self.evaluate_many(*self.split(params), list(splits.values()))))

  def predict(self, trainable, frozen, images):
    """Softmax probabilities ``[N, K]`` of uint8 images."""
    chunks = classifier.chunks([images], self.eval_batch)
    return self.predict_prepared(trainable, frozen, Prepared((len(images),), [None], chunks, False))

  def summary(self, params) -> dict:
    """The parameter counts a checkpoint's meta stores (``checkpoint_listing.param_summary``)."""
    return checkpoint_listing.param_summary(*self.split(params), self.model_name)


def build(config) -> Experiment:
  """The :class:`Experiment` of a (validated) config; builds no compiled function."""
  model = models.build(config.model)
  size = config.data.image_size
  augment = (Augment(ml_collections.FrozenConfigDict(config.data.augment))
             if config.data.augment.enabled else None)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))['params']
  return Experiment(
      model=model, rules=partition.frozen_block_rules(config.model.frozen_blocks),
      augment=augment, loss=Loss(model, augment),
      key=jax.random.key(config.seed), shapes=shapes,
      init=functools.partial(_init_params, model, config.seed, size,
                             config.model.get('pretrained')),
      eval_batch=config.eval.batch_size, progress=_progress(config.get('progress', True)),
      model_name=config.model.name, trunk_blocks=config.model.frozen_blocks)


def _init_params(model, seed: int, size: int, pretrained):
  """Fresh parameters from ``seed``, overlaid with the ``pretrained`` weights file if set.

  The init key is an 'rbg' key: XLA compiles threefry's bit generation for every parameter
  leaf slowly (docs/performance.md); rbg is deterministic on a given backend, which is all a
  run needs.
  """
  params = _jitted_init(model)(jax.random.key(seed, impl='rbg'),
                               jnp.zeros((1, size, size, 3), jnp.float32))['params']
  if pretrained:
    from fedblood.model import weights  # pylint: disable=g-import-not-at-top
    params, load = weights.load_pretrained(params, pretrained, model=model)
    logging.info('loaded %d tensors from %s; kept fresh: %s', len(load.loaded), load.path,
                 load.initialised)
  return params


@functools.lru_cache(maxsize=4)
def _jitted_init(model):
  return jax.jit(model.init)


def _progress(enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return lambda total, desc, initial: tqdm(total=total, desc=desc, initial=initial,
                                           dynamic_ncols=True, leave=True)
