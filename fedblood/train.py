"""The study, one command: reference model, Table 1, federated fine-tuning, Table 2, baselines.

``run(config, workdir)`` runs the stages in order; each is resumable, so the
same command in the same workdir picks up where a previous run stopped::

  (a) reference   centralized training on the reference center (or restore it
                  from ``reference.restore``), early-stopped on its validation split
  (b) Table 1     the reference model on every center's test split
  (c) fl          ``fl.rounds`` federated rounds, every center evaluated each round
  (d) Table 2     the final federated model(s) on every center's test split
  baselines       local-only training per center and pooled centralized training

Workdir::

  config.json  metrics.jsonl  results.json  report.md  figures/  tb/  checkpoints/  run.lock

Before anything is written the whole config is checked (:mod:`fedblood.validate`), then the
workdir is locked for the run (:mod:`fedblood.lock`), the centers are loaded and checked
(every center needs a training and a test image), and only then is config.json written.

Determinism: every random stream derives from ``config.seed`` by ``fold_in``
(stage, then epoch or round), and rows of ``metrics.jsonl`` are written before
the checkpoint that commits them and dropped on resume when no checkpoint
committed them, so a run killed at any point and resumed ends bit-identical to
an uninterrupted one.
"""

import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedblood import centralized, checkpoint, data, metrics, models, partition, privacy, report
from fedblood import classifier, lock, names, numerics, runlog, simulate, validate

# Sub-keys of the run's key, one per stage (fold_in(key, STAGE[...])).
STAGE = {'reference': 1, 'fl': 2, 'participation': 3, 'pooled': 4, 'local': 100}
EVAL_MODELS = ('server', 'active_mean')


def init_params(config, model):
  """Fresh parameters from ``config.seed``, overlaid with ``model.pretrained`` weights if set.

  The init key is an 'rbg' key: XLA compiles threefry's bit generation for every
  parameter leaf slowly (about 10 s for VGG16 on 2 CPU cores, against 2-3 s);
  rbg is deterministic on a given backend, which is all a run needs.
  """
  size = config.data.image_size
  params = _jitted_init(model)(jax.random.key(config.seed, impl='rbg'),
                               jnp.zeros((1, size, size, 3), jnp.float32))['params']
  if config.model.get('pretrained'):
    from fedblood import weights  # pylint: disable=g-import-not-at-top
    params, load = weights.load_pretrained(params, config.model.pretrained, model=model)
    logging.info('loaded %d tensors from %s; kept fresh: %s', len(load.loaded), load.path,
                 load.initialised)
  return params


@functools.lru_cache(maxsize=4)
def _jitted_init(model):
  return jax.jit(model.init)


def param_shapes(config, model):
  """The parameter tree's shapes and dtypes, computed without running anything."""
  size = config.data.image_size
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))['params']


def fl_rules(config):
  return partition.frozen_block_rules(config.model.frozen_blocks)


def augment_fn(config):
  """``(rng, images) -> images`` from ``data.augment``, or None when disabled."""
  if not config.data.augment.enabled:
    return None
  return _augment_for(json.dumps(config.data.augment.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=None)
def _augment_for(cfg_json: str):
  # One function object per augmentation config, so the jitted steps cached on it are reused.
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  return lambda rng, images: data.augment(rng, images, cfg)


def _progress(config):
  if not config.get('progress', True):
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return lambda total, desc, initial: tqdm(total=total, desc=desc, initial=initial,
                                           dynamic_ncols=True, leave=True)


def evaluate_split(config, model, params, split) -> dict:
  """Full metrics of ``params`` on a split (split with the FL rules: one predict compile)."""
  trainable, frozen = partition.split(params, fl_rules(config))
  return centralized.evaluate(model, trainable, frozen, split, config.eval.batch_size)


# ------------------------------------------------------------------------------- (a) reference
def reference_stage(config, model, center, key, workdir: Path, log) -> tuple[dict, dict]:
  """Trains (or restores) the reference model; saves it once to ``checkpoints/reference_model``."""
  mngr = checkpoint.manager(workdir / 'checkpoints' / 'reference_model', keep=1)
  restored = checkpoint.restore_latest(mngr, {'params': param_shapes(config, model)})
  if restored is not None:
    mngr.close()
    return restored[0]['params'], restored[1]['info']
  if config.reference.get('restore'):
    params, source = load_reference(config.reference.restore, param_shapes(config, model), model)
    info = {'center': center.name, 'restored_from': source}
  else:
    template = init_params(config, model)
    result = centralized.fit(
        'reference', model, template, partition.frozen_block_rules(config.reference.frozen_blocks),
        center.train, center.val, config.reference, jax.random.fold_in(key, STAGE['reference']),
        workdir / 'checkpoints' / 'reference', augment_fn=augment_fn(config),
        log=lambda row: log({**row, 'center': center.name}), eval_batch=config.eval.batch_size,
        progress=_progress(config),
        on_resume=lambda epoch: runlog.truncate(workdir, 'reference', epoch))
    params = result.params
    info = {'center': center.name, 'best_epoch': result.epoch, 'epochs_run': result.epochs_run,
            'val': result.val}
  trainable, frozen = partition.split(params, fl_rules(config))
  checkpoint.save(mngr, info.get('best_epoch', 0), {'params': params}, {
      'kind': 'reference model', 'info': info, 'metrics': {
          f'val_{k}': v for k, v in (info.get('val') or {}).items() if k != 'n'},
      'params': checkpoint.param_summary(trainable, frozen, config.model.name)})
  mngr.close()
  return params, info


def load_reference(path, template, model) -> tuple[dict, str]:
  """A full reference model from a workdir, a checkpoint directory, or a weights file.

  Args:
    path: a fedblood workdir (its ``checkpoints/reference_model``), an Orbax
      checkpoint directory of ``{'params': ...}``, or a weights file that
      :func:`fedblood.weights.load_pretrained` reads and that covers every parameter.
    template: the parameter tree (arrays or shapes) this config builds.
    model: the Flax module.
  """
  path = Path(path)
  candidates = [path / 'checkpoints' / 'reference_model', path]
  for directory in candidates:
    if directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir()):
      mngr = checkpoint.manager(directory)
      state, _ = checkpoint.restore(mngr, {'params': template})
      mngr.close()
      return state['params'], str(directory)
  if path.is_file():
    from fedblood import weights  # pylint: disable=g-import-not-at-top
    fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), template)
    params, load = weights.load_pretrained(fresh, path, model=model)
    if load.initialised:
      raise ValueError(f'reference.restore={str(path)!r} does not hold a full model of this '
                       f'config: {load.initialised} would stay freshly initialised')
    return params, str(path)
  raise FileNotFoundError(f'reference.restore={str(path)!r} is neither a fedblood workdir, a '
                          'checkpoint directory, nor a weights file')


# -------------------------------------------------------------------------------------- (c) fl
def stack_centers(centers) -> simulate.Centers:
  """Every center's training split padded to a common length, for the jitted round."""
  nmax = max(len(c.train.labels) for c in centers)
  def pad(x):
    return np.concatenate([x, np.zeros((nmax - len(x),) + x.shape[1:], x.dtype)])
  return simulate.Centers(
      examples={'image': jnp.asarray(np.stack([pad(c.train.images) for c in centers])),
                'label': jnp.asarray(np.stack([pad(c.train.labels.astype(np.int32))
                                              for c in centers]))},
      sizes=jnp.asarray([len(c.train.labels) for c in centers], jnp.int32))


def participation(config, key, round_index: int, num: int) -> np.ndarray:
  """Active centers of round ``r``: ``ceil(fraction * C)`` drawn from ``fold_in(key, r)``."""
  fraction = config.fl.get('participation', 1.0)
  if not 0 < fraction <= 1:
    raise ValueError(f'fl.participation must be in (0, 1], got {fraction}')
  count = max(1, math.ceil(fraction * num))
  if count == num:
    return np.ones(num, bool)
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, round_index), num))
  active = np.zeros(num, bool)
  active[order[:count]] = True
  return active


def eval_model_name(config, available) -> str:
  name = config.fl.get('eval_model', 'server')
  if name not in EVAL_MODELS:
    raise ValueError(f'fl.eval_model must be one of {EVAL_MODELS}, got {name!r}')
  # FedAvg / FedProx / SCAFFOLD have one model: their server model IS the average.
  return name if name in available else 'server'


def fl_json(config, dp_plan=None) -> str:
  """``config.fl`` as JSON, less the fields the compiled round does not depend on (a cache key).

  ``dp_plan`` (:func:`fedblood.privacy.plan`) sets the (calibrated) noise multiplier.
  """
  fl = {k: v for k, v in config.fl.to_dict().items()
        if k not in ('rounds', 'eval_model', 'participation', 'holdout')}
  if dp_plan is not None:
    fl['dp'] = {**fl['dp'], 'noise_multiplier': dp_plan.noise_multiplier, 'target_epsilon': 0.0}
  return json.dumps(fl, sort_keys=True)


def fl_template(config, model, reference_params, num_centers: int, dp_plan=None):
  """``(algorithm, round_fn, state template, frozen)`` of the FL stage, from the config alone."""
  trainable, frozen = partition.split(reference_params, fl_rules(config))
  algorithm, round_fn = _fl_functions(model, fl_json(config, dp_plan), augment_fn(config))
  server, clients = algorithm.init(trainable, num_centers)
  state = {'server': server, 'clients': clients,
           'rng': jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), STAGE['fl']))}
  return algorithm, round_fn, state, frozen


@functools.lru_cache(maxsize=4)
def _fl_functions(model, fl_json: str, augment):
  # Cached per config: a resumed or repeated run in the same process reuses the compiled round.
  loss_fn = classifier.classifier_loss(model, augment)
  return simulate.build(ml_collections.ConfigDict(json.loads(fl_json)), loss_fn)


def held_out(config, centers=None) -> tuple:
  """The names in ``fl.holdout`` (centers that never join FL or the pooled baseline), checked."""
  holdout = tuple(config.fl.get('holdout', ()) or ())
  if centers is not None:
    names = [c.name for c in centers]
    unknown = [h for h in holdout if h not in names]
    if unknown:
      raise ValueError(f'config fl.holdout={holdout!r}: no center named {unknown}; the centers '
                       f'are {names}')
    if names[0] in holdout:
      raise ValueError(f'config fl.holdout={holdout!r}: the reference center {names[0]!r} '
                       'cannot be held out')
  return holdout


def fl_row(round_index, center, eval_name, active, loss, train_accuracy, test, val,
           epsilon=None) -> dict:
  """One ``metrics.jsonl`` row of the FL stage: center ``center`` after round ``round_index``.

  ``epsilon``: the center's DP-SGD epsilon so far (runs with ``fl.dp``), else no such key.
  """
  return {'stage': 'fl', 'round': round_index, 'center': center, 'model': eval_name,
          'active': bool(active), 'loss': float(loss), 'train_accuracy': float(train_accuracy),
          **test, **{f'val_{m}': v for m, v in val.items()},
          **({'epsilon': epsilon} if epsilon is not None else {})}


class FLRun(NamedTuple):
  """One run's FL stage, set up by :func:`fl_setup`: what each round needs besides the states."""
  names: list
  algorithm: Any
  round_fn: Callable
  frozen: Any
  mngr: Any
  start: int
  fl_key: Any
  part_key: Any
  eval_name: str
  summary: dict
  rng: Any
  dp_plan: Any = None        # fedblood.privacy.plan of fl.dp (None without DP)


def fl_setup(config, model, reference_params, centers, key, workdir: Path):
  """``(FLRun, server, clients)``: the round function and the states, restored if checkpointed."""
  dp_plan = privacy.plan(config.fl, {c.name: len(c.train.labels) for c in centers})
  algorithm, round_fn, state, frozen = fl_template(config, model, reference_params, len(centers),
                                                   dp_plan)
  mngr = checkpoint.manager(workdir / 'checkpoints' / 'fl', keep=config.checkpoint.keep,
                            best_metric='val_accuracy')
  start = 0
  restored = checkpoint.restore_latest(mngr, state)
  if restored is not None:
    state, start = restored[0], restored[1]['round']
  runlog.truncate(workdir, 'fl', start)
  summary = checkpoint.param_summary(*partition.split(reference_params, fl_rules(config)),
                                     config.model.name)
  run = FLRun(names=[c.name for c in centers], algorithm=algorithm, round_fn=round_fn,
              frozen=frozen, mngr=mngr, start=start, fl_key=jax.random.fold_in(key, STAGE['fl']),
              part_key=jax.random.fold_in(key, STAGE['participation']),
              eval_name=eval_model_name(config, algorithm.eval_params(state['server'])),
              summary=summary, rng=state['rng'], dp_plan=dp_plan)
  return run, state['server'], state['clients']


def fl_after_round(config, model, run: FLRun, centers, r: int, active, server, clients,
                   round_metrics, log, held=()) -> dict:
  """Checks, evaluates, logs and checkpoints round ``r``; returns the round's summary.

  ``held``: centers that never joined (``fl.holdout``), evaluated after the others in rows
  marked ``held_out``, out of the round's means.
  """
  mngr = run.mngr
  losses = np.asarray(round_metrics['loss'])
  last_good = f'round {r - 1} in {mngr.directory}' if r > 1 else 'the reference model'
  for k, name in enumerate(run.names):
    if active[k]:
      centralized.check_finite(float(losses[k]), f'fl round {r}, center {name!r}', last_good)
  params = run.algorithm.eval_params(server)[run.eval_name]
  if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params)):
    raise FloatingPointError(f'fl round {r}: the {run.eval_name} model has non-finite parameters '
                             f'after aggregation. Stopped; the last good checkpoint is kept: '
                             f'{last_good}.')
  full = partition.merge(params, run.frozen)
  epsilons = _epsilons(config, run, r, len(centers)) if run.dp_plan is not None else None
  rows, val_accs, test_accs = [], [], []
  for k, center in enumerate(centers):
    test = metrics.summary(evaluate_split(config, model, full, center.test))
    val = (metrics.summary(evaluate_split(config, model, full, center.val))
           if len(center.val.labels) else {})
    rows.append(fl_row(r, center.name, run.eval_name, active[k], losses[k],
                       np.asarray(round_metrics['accuracy'])[k], test, val,
                       epsilons[k] if epsilons else None))
    test_accs.append(test['accuracy'])
    if val:
      val_accs.append(val['accuracy'])
  for center in held:
    val = (metrics.summary(evaluate_split(config, model, full, center.val))
           if len(center.val.labels) else {})
    rows.append({'stage': 'fl', 'round': r, 'center': center.name, 'model': run.eval_name,
                 'held_out': True,
                 **metrics.summary(evaluate_split(config, model, full, center.test)),
                 **{f'val_{m}': v for m, v in val.items()}})
  for row in rows:
    log(row)
  mean_val = float(np.mean(val_accs)) if val_accs else None
  round_summary = {'val_accuracy': mean_val, 'test_accuracy': float(np.mean(test_accs)),
                   'loss': float(np.mean(losses[active]))}
  if r % config.checkpoint.get('every', 1) == 0 or r == config.fl.rounds:
    # Ranking score: ties go to the earliest round.
    checkpoint.save(mngr, r, {'server': server, 'clients': clients, 'rng': run.rng},
                    {'kind': 'round', 'round': r, 'centers': run.names,
                     'eval_model': run.eval_name, 'algorithm': config.fl.algorithm,
                     'metrics': round_summary, 'best_metric': 'val_accuracy',
                     'params': run.summary},
                    metrics={'val_accuracy': (mean_val or 0.0) - 1e-9 * r})
  return round_summary


def _steps_taken(config, run: FLRun, rounds: int, num_centers: int):
  # Participation is a function of the round: a resumed run recounts the mechanisms taken.
  actives = [participation(config, run.part_key, r, num_centers) for r in range(1, rounds + 1)]
  return privacy.steps_taken(run.dp_plan, actives)


def _epsilons(config, run: FLRun, rounds: int, num_centers: int):
  return privacy.epsilons(run.dp_plan, _steps_taken(config, run, rounds, num_centers))


def fl_finish(config, run: FLRun, server) -> tuple[dict, dict]:
  """Closes the run's checkpoints; the final ``({name: params}, info)``."""
  run.mngr.close()
  models_out = {name: partition.merge(p, run.frozen)
                for name, p in run.algorithm.eval_params(server).items()}
  info = {'eval_model': run.eval_name, 'rounds': config.fl.rounds}
  if run.dp_plan is not None:
    info['privacy'] = privacy.summary(
        run.dp_plan, _steps_taken(config, run, config.fl.rounds, len(run.names)),
        config.fl.dp.target_epsilon)
  return models_out, info


def fl_round(config, model, run: FLRun, centers, sim, r: int, server, clients, log, held=()):
  """Round ``r`` of one run: ``(server, clients, round_summary)``; ``held``: see fl_after_round."""
  active = participation(config, run.part_key, r, len(centers))
  server, clients, round_metrics = run.round_fn(server, clients, run.frozen, sim,
                                                jnp.asarray(active), run.fl_key, jnp.int32(r))
  return server, clients, fl_after_round(config, model, run, centers, r, active, server, clients,
                                         round_metrics, log, held)


def fl_stage(config, model, reference_params, centers, key, workdir: Path,
             log) -> tuple[dict, dict]:
  """Runs (or resumes) the federated rounds; returns the final ``({name: params}, info)``.

  Centers named in ``fl.holdout`` never train: they are evaluated every round as centers that
  never joined (rows marked ``held_out``) and stay out of the validation mean that ranks rounds.
  """
  holdout = held_out(config, centers)
  held = [c for c in centers if c.name in holdout]
  centers = [c for c in centers if c.name not in holdout]
  run, server, clients = fl_setup(config, model, reference_params, centers, key, workdir)
  sim = stack_centers(centers)
  progress = _progress(config)
  bar = progress(config.fl.rounds, f'fl {config.fl.algorithm}', run.start) if progress else None
  for r in range(run.start + 1, config.fl.rounds + 1):
    server, clients, round_summary = fl_round(config, model, run, centers, sim, r, server,
                                              clients, log, held)
    if bar is not None:
      bar.update(1)
      bar.set_postfix(round=r, loss=f'{round_summary["loss"]:.3f}',
                      acc=f'{round_summary["test_accuracy"]:.3f}')
  if bar is not None:
    bar.close()
  return fl_finish(config, run, server)


# ------------------------------------------------------------------------------- baselines
def _concat(splits) -> data.Split:
  return data.Split(*[np.concatenate([getattr(s, f) for s in splits]) for f in data.Split._fields])


def baselines_stage(config, model, reference_params, centers, key, workdir: Path, log) -> dict:
  """Local-only training per center and pooled training: ``{name: {center: metrics}}``.

  ``baselines.init='both'`` trains each baseline from the reference and from scratch, named
  ``<baseline>_reference`` / ``<baseline>_scratch``; one init keeps the plain names. Centers in
  ``fl.holdout`` stay out of the pooled training set (they never joined).
  """
  cfg = config.baselines
  if cfg.init not in ('reference', 'scratch', 'both'):
    raise ValueError(f"baselines.init must be 'reference', 'scratch' or 'both', got {cfg.init!r}")
  if cfg.init != 'both':
    return _baselines_from(config, cfg.init, '', model, reference_params, centers, key, workdir,
                           log)
  out = {}
  for init, prefix in (('scratch', 'scratch_'), ('reference', '')):
    for name, per in _baselines_from(config, init, prefix, model, reference_params, centers, key,
                                     workdir, log).items():
      out[f'{name}_{init}'] = per
  order = [f'{b}_{i}' for b in ('local_only', 'pooled') for i in ('scratch', 'reference')]
  return {name: out[name] for name in order if name in out}


def _baselines_from(config, init, prefix, model, reference_params, centers, key, workdir,
                    log) -> dict:
  """The baselines from one init; stage names ``local_<prefix><center>``, ``pooled_<prefix>``.

  From scratch, fields of ``baselines.scratch`` (when the config has it) override the recipe.
  """
  cfg = config.baselines
  out = {}
  if init == 'reference':
    start, rules = reference_params, fl_rules(config)
  else:
    if 'scratch' in cfg:
      cfg = ml_collections.ConfigDict({**{k: v for k, v in cfg.to_dict().items() if k != 'scratch'},
                                      **cfg.scratch.to_dict()})
    start, rules = init_params(config, model), partition.frozen_block_rules(
        config.reference.frozen_blocks)

  def run_fit(stage, train, val, stage_key, groups=None):
    return centralized.fit(stage, model, start, rules, train, val, cfg, stage_key,
                           workdir / 'checkpoints' / names.slug(stage),
                           augment_fn=augment_fn(config), log=log,
                           eval_batch=config.eval.batch_size, progress=_progress(config),
                           on_resume=lambda epoch: runlog.truncate(workdir, stage, epoch),
                           groups=groups).params

  if cfg.local_only:
    out['local_only'] = {}
    for k, center in enumerate(centers):
      if init == 'reference' and k == 0:
        params = reference_params  # the reference model IS local-only training at its center
      else:
        params = run_fit(f'local_{prefix}{center.name}', center.train, center.val,
                         jax.random.fold_in(key, STAGE['local'] + k))
      out['local_only'][center.name] = evaluate_split(config, model, params, center.test)
  if cfg.pooled:
    joined = [c for c in centers if c.name not in held_out(config)]
    groups = (np.concatenate([np.full(len(c.train.labels), k) for k, c in enumerate(joined)])
              if cfg.get('balance', 'none') == 'centers' else None)
    val = ([c.val for c in joined] if cfg.get('pooled_val', 'pooled') == 'center_mean'
           else _concat([c.val for c in joined]))
    params = run_fit('pooled' + ('_' + prefix.rstrip('_') if prefix else ''),
                     _concat([c.train for c in joined]), val,
                     jax.random.fold_in(key, STAGE['pooled']), groups)
    out['pooled'] = {c.name: evaluate_split(config, model, params, c.test) for c in centers}
  return out


def study_results(config, names, before, after_models, eval_name, baselines, reference_info,
                  train_sizes) -> dict:
  """The results dict of a study (results.json) from full per-center metrics.

  ``before``: ``{center: metrics}`` of the reference model; ``after_models``:
  ``{model: {center: metrics}}`` after FL; ``baselines``: ``{name: {center: metrics}}``.
  """
  after = after_models[eval_name]
  summarize = lambda per: {c: metrics.summary(m) for c, m in per.items()}
  return {
      'title': config.get('title', 'fedblood run'), 'centers': names, 'reference': names[0],
      'classes': list(metrics.CLASSES), 'algorithm': config.fl.algorithm,
      'rounds': config.fl.rounds, 'eval_model': eval_name,
      'before': summarize(before), 'after': summarize(after),
      'after_models': {name: summarize(per) for name, per in after_models.items()},
      'baselines': {name: summarize(per) for name, per in baselines.items()},
      'confusion': {'before': {c: m['confusion'] for c, m in before.items()},
                    'after': {c: m['confusion'] for c, m in after.items()}},
      'details': {'before': before, 'after': after, **baselines},
      'reference_training': reference_info,
      'train_sizes': train_sizes,
  }


# ------------------------------------------------------------------------------------------ run
def run(config, workdir) -> dict:
  """Runs (or resumes) the whole study in ``workdir``; returns the results dict."""
  workdir = Path(workdir)
  validate.check(config)  # before anything is written: a rejected setting can be corrected
  with lock.hold(workdir), numerics.applied(config):
    runlog.check_config(config, workdir, write=False)
    return _run(config, workdir)


def _run(config, workdir: Path) -> dict:
  started = time.time()
  times = {}
  key = jax.random.key(config.seed)
  centers = data.load_centers(config.data)
  data.require_splits(centers)
  holdout = held_out(config, centers)  # names checked before config.json is written
  runlog.check_config(config, workdir)
  times['data_s'] = time.time() - started
  names = [c.name for c in centers]
  model = models.build(config.model)
  log = runlog.logger(workdir)

  t = time.time()
  reference_params, reference_info = reference_stage(config, model, centers[0], key, workdir, log)
  times['reference_s'] = time.time() - t
  before = {c.name: evaluate_split(config, model, reference_params, c.test) for c in centers}

  t = time.time()
  fl_models, fl_info = fl_stage(config, model, reference_params, centers, key, workdir, log)
  times['fl_s'] = time.time() - t
  after_models = {name: {c.name: evaluate_split(config, model, p, c.test) for c in centers}
                  for name, p in fl_models.items()}

  t = time.time()
  baselines = baselines_stage(config, model, reference_params, centers, key, workdir, log)
  times['baselines_s'] = time.time() - t

  results = study_results(config, names, before, after_models, fl_info['eval_model'], baselines,
                          reference_info, {c.name: int(len(c.train.labels)) for c in centers})
  if 'privacy' in fl_info:
    results['privacy'] = fl_info['privacy']
  if holdout:
    results['held_out'] = list(holdout)
  if numerics.describe(config):
    results['numerics'] = numerics.describe(config)
  times['total_s'] = time.time() - started
  # Timing differs between an interrupted and an uninterrupted run; it lives apart from metrics.
  (workdir / 'results.json').write_text(json.dumps(results, indent=1))
  (workdir / 'timing.json').write_text(json.dumps(times, indent=1))
  report.write_report(workdir, {**results, 'wall_time_s': times['total_s']})
  runlog.close(workdir)
  return results
