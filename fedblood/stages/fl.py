"""Stage (c): ``fl.rounds`` federated rounds from the reference model, every center evaluated.

:func:`fl_stage` runs them; its parts (:func:`fl_setup`, :func:`fl_round`,
:func:`fl_after_round`, :func:`fl_finish`) are what the vectorised seed sweep
(:mod:`fedblood.seeds`) and the deployed server reuse. Each takes the run's
:class:`fedblood.experiment.Experiment`; the settings come from ``config.fl`` (the ``fl``
argument) and ``config.checkpoint``.
"""

import functools
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedblood import centralized, checkpoint, metrics, privacy, runlog, simulate
from fedblood import workdir as workdir_lib
from fedblood.experiment import STAGE, Experiment

EVAL_MODELS = ('server', 'active_mean')
# Fields of config.fl that the compiled round does not depend on.
_NOT_IN_ROUND = ('rounds', 'eval_model', 'participation', 'holdout')


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


def participation(fl, key, round_index: int, num: int) -> np.ndarray:
  """Active centers of round ``r``: ``ceil(fl.participation * C)``, from ``fold_in(key, r)``."""
  fraction = fl.get('participation', 1.0)
  if not 0 < fraction <= 1:
    raise ValueError(f'fl.participation must be in (0, 1], got {fraction}')
  count = max(1, math.ceil(fraction * num))
  if count == num:
    return np.ones(num, bool)
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, round_index), num))
  active = np.zeros(num, bool)
  active[order[:count]] = True
  return active


def eval_model_name(fl, available) -> str:
  """``fl.eval_model``, checked; 'server' for algorithms whose only model is the server's."""
  name = fl.get('eval_model', 'server')
  if name not in EVAL_MODELS:
    raise ValueError(f'fl.eval_model must be one of {EVAL_MODELS}, got {name!r}')
  # FedAvg / FedProx / SCAFFOLD have one model: their server model IS the average.
  return name if name in available else 'server'


def held_out(fl, centers=None) -> tuple:
  """The names in ``fl.holdout`` (centers that never join FL or the pooled baseline), checked."""
  holdout = tuple(fl.get('holdout', ()) or ())
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


def round_settings(fl, dp_plan=None) -> ml_collections.FrozenConfigDict:
  """``config.fl`` less the fields the compiled round does not depend on, as a hashable value.

  ``dp_plan`` (:func:`fedblood.privacy.plan`) sets the (calibrated) noise multiplier.
  """
  settings = {k: v for k, v in fl.to_dict().items() if k not in _NOT_IN_ROUND}
  if dp_plan is not None:
    settings['dp'] = {**settings['dp'], 'noise_multiplier': dp_plan.noise_multiplier,
                      'target_epsilon': 0.0}
  return ml_collections.FrozenConfigDict(settings)


def fl_functions(exp: Experiment, fl, dp_plan=None) -> tuple[Any, Callable]:
  """``(algorithm, round_fn)`` of ``config.fl`` (:func:`fedblood.simulate.build`)."""
  return _fl_functions(exp.loss, round_settings(fl, dp_plan))


@functools.lru_cache(maxsize=4)
def _fl_functions(loss, settings: ml_collections.FrozenConfigDict):
  # Keyed on values: a resumed or repeated run in the same process reuses the compiled round.
  return simulate.build(settings.as_configdict(), loss)


def fl_template(exp: Experiment, fl, reference_params, num_centers: int, dp_plan=None):
  """``(algorithm, round_fn, state template, frozen)`` of the FL stage, from the config alone."""
  trainable, frozen = exp.split(reference_params)
  algorithm, round_fn = fl_functions(exp, fl, dp_plan)
  server, clients = algorithm.init(trainable, num_centers)
  state = {'server': server, 'clients': clients,
           'rng': jax.random.key_data(jax.random.fold_in(exp.key, STAGE['fl']))}
  return algorithm, round_fn, state, frozen


def fl_row(round_index, center, eval_name, active, loss, train_accuracy, test, val,
           epsilon=None) -> dict:
  """One ``metrics.jsonl`` row of the FL stage: center ``center`` after round ``round_index``.

  ``epsilon``: the center's DP-SGD epsilon so far (runs with ``fl.dp``), else no such key.
  """
  return {'stage': 'fl', 'round': round_index, 'center': center, 'model': eval_name,
          'active': bool(active), 'loss': float(loss), 'train_accuracy': float(train_accuracy),
          **_metric_columns(test, val), **({'epsilon': epsilon} if epsilon is not None else {})}


def held_row(round_index, center, eval_name, test, val) -> dict:
  """The row of a center that never joined (``fl.holdout``): its metrics, no training columns."""
  return {'stage': 'fl', 'round': round_index, 'center': center, 'model': eval_name,
          'held_out': True, **_metric_columns(test, val)}


def _metric_columns(test, val) -> dict:
  return {**test, **{f'val_{m}': v for m, v in val.items()}}


class FLRun(NamedTuple):
  """One run's FL stage, set up by :func:`fl_setup`: what each round needs besides the states."""
  fl: Any                    # config.fl
  every: int                 # config.checkpoint.every: checkpoint each `every` rounds (and last)
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


def fl_setup(exp: Experiment, fl, checkpoint_cfg, reference_params, centers, workdir: Path):
  """``(FLRun, server, clients)``: the round function and the states, restored if checkpointed."""
  dp_plan = privacy.plan(fl, {c.name: len(c.train.labels) for c in centers})
  algorithm, round_fn, state, frozen = fl_template(exp, fl, reference_params, len(centers),
                                                   dp_plan)
  mngr = checkpoint.manager(workdir_lib.checkpoints(workdir, workdir_lib.FL),
                            keep=checkpoint_cfg.keep, best_metric='val_accuracy')
  start = 0
  restored = checkpoint.restore_latest(mngr, state)
  if restored is not None:
    state, start = restored[0], restored[1]['round']
  runlog.truncate(workdir, 'fl', start)
  run = FLRun(fl=fl, every=checkpoint_cfg.get('every', 1), names=[c.name for c in centers],
              algorithm=algorithm, round_fn=round_fn, frozen=frozen, mngr=mngr, start=start,
              fl_key=jax.random.fold_in(exp.key, STAGE['fl']),
              part_key=jax.random.fold_in(exp.key, STAGE['participation']),
              eval_name=eval_model_name(fl, algorithm.eval_params(state['server'])),
              summary=exp.summary(reference_params), rng=state['rng'], dp_plan=dp_plan)
  return run, state['server'], state['clients']


def _evaluated(exp: Experiment, trainable, frozen, center) -> tuple[dict, dict]:
  """``(test summary, val summary or {})`` of a center."""
  test = metrics.summary(exp.evaluate(trainable, frozen, center.test))
  val = (metrics.summary(exp.evaluate(trainable, frozen, center.val))
         if len(center.val.labels) else {})
  return test, val


def fl_after_round(exp: Experiment, run: FLRun, centers, r: int, active, server, clients,
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
  epsilons = _epsilons(run, r, len(centers)) if run.dp_plan is not None else None
  rows, val_accs, test_accs = [], [], []
  for k, center in enumerate(centers):
    test, val = _evaluated(exp, params, run.frozen, center)
    rows.append(fl_row(r, center.name, run.eval_name, active[k], losses[k],
                       np.asarray(round_metrics['accuracy'])[k], test, val,
                       epsilons[k] if epsilons else None))
    test_accs.append(test['accuracy'])
    if val:
      val_accs.append(val['accuracy'])
  for center in held:
    test, val = _evaluated(exp, params, run.frozen, center)
    rows.append(held_row(r, center.name, run.eval_name, test, val))
  for row in rows:
    log(row)
  mean_val = float(np.mean(val_accs)) if val_accs else None
  round_summary = {'val_accuracy': mean_val, 'test_accuracy': float(np.mean(test_accs)),
                   'loss': float(np.mean(losses[active]))}
  if r % run.every == 0 or r == run.fl.rounds:
    # Ranking score: ties go to the earliest round.
    checkpoint.save(mngr, r, {'server': server, 'clients': clients, 'rng': run.rng},
                    {'kind': 'round', 'round': r, 'centers': run.names,
                     'eval_model': run.eval_name, 'algorithm': run.fl.algorithm,
                     'metrics': round_summary, 'best_metric': 'val_accuracy',
                     'params': run.summary},
                    metrics={'val_accuracy': (mean_val or 0.0) - 1e-9 * r})
  return round_summary


def _steps_taken(run: FLRun, rounds: int, num_centers: int):
  # Participation is a function of the round: a resumed run recounts the mechanisms taken.
  actives = [participation(run.fl, run.part_key, r, num_centers) for r in range(1, rounds + 1)]
  return privacy.steps_taken(run.dp_plan, actives)


def _epsilons(run: FLRun, rounds: int, num_centers: int):
  return privacy.epsilons(run.dp_plan, _steps_taken(run, rounds, num_centers))


def fl_finish(run: FLRun, server) -> tuple[dict, dict]:
  """Closes the run's checkpoints; the final ``({name: (trainable, frozen)}, info)``."""
  run.mngr.close()
  models_out = {name: (p, run.frozen) for name, p in run.algorithm.eval_params(server).items()}
  info = {'eval_model': run.eval_name, 'rounds': run.fl.rounds}
  if run.dp_plan is not None:
    info['privacy'] = privacy.summary(
        run.dp_plan, _steps_taken(run, run.fl.rounds, len(run.names)), run.fl.dp.target_epsilon)
  return models_out, info


def fl_round(exp: Experiment, run: FLRun, centers, sim, r: int, server, clients, log, held=()):
  """Round ``r`` of one run: ``(server, clients, round_summary)``; ``held``: see fl_after_round."""
  active = participation(run.fl, run.part_key, r, len(centers))
  server, clients, round_metrics = run.round_fn(server, clients, run.frozen, sim,
                                                jnp.asarray(active), run.fl_key, jnp.int32(r))
  return server, clients, fl_after_round(exp, run, centers, r, active, server, clients,
                                         round_metrics, log, held)


def fl_stage(exp: Experiment, fl, checkpoint_cfg, reference_params, centers, workdir: Path,
             log) -> tuple[dict, dict]:
  """Runs (or resumes) the federated rounds; returns :func:`fl_finish`'s models and info.

  Centers named in ``fl.holdout`` never train: they are evaluated every round as centers that
  never joined (rows marked ``held_out``) and stay out of the validation mean that ranks rounds.
  """
  holdout = held_out(fl, centers)
  held = [c for c in centers if c.name in holdout]
  centers = [c for c in centers if c.name not in holdout]
  run, server, clients = fl_setup(exp, fl, checkpoint_cfg, reference_params, centers, workdir)
  sim = stack_centers(centers)
  bar = exp.progress(fl.rounds, f'fl {fl.algorithm}', run.start) if exp.progress else None
  for r in range(run.start + 1, fl.rounds + 1):
    server, clients, round_summary = fl_round(exp, run, centers, sim, r, server, clients, log,
                                              held)
    if bar is not None:
      bar.update(1)
      bar.set_postfix(round=r, loss=f'{round_summary["loss"]:.3f}',
                      acc=f'{round_summary["test_accuracy"]:.3f}')
  if bar is not None:
    bar.close()
  return fl_finish(run, server)
