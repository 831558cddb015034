"""The federated round driver: everything about a round but the training and the evaluation.

The simulation (:func:`fedblood.study.stages.fl.fl_stage`), the vectorised seeds
(:func:`fedblood.study.seeds.fl_vectorized`) and the deployed server (:func:`fedblood.deploy.server.run`)
all run their rounds through :func:`drive`. They say how to train and evaluate a round:

* ``train_round(r, members, actives, states) -> [(server, clients, metrics, active)]``: round
  ``r`` of the runs ``members`` (indices), ``actives[i]`` the centers :func:`participation`
  drew for run ``members[i]``; ``active`` the centers that did train (a deployed site may not
  answer). ``metrics``: ``[C]`` arrays ``loss`` and ``accuracy``.
* ``evaluate(r, server) -> {center: (test summary, val summary or {})}``: the centers of
  ``Run.names`` that could be evaluated, then any held-out center (rows marked ``held_out``).

and the driver owns the rest, identically for the three: the participation draw, the
finiteness checks, the ``metrics.jsonl`` rows (and TensorBoard), the round summary, the Orbax
checkpoints (each ``checkpoint.every`` rounds and the last, ranked by the mean validation
accuracy so the best step is kept), the progress hook and the final models.
"""

import math
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedblood.rundir import checkpoint, runlog
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import centralized

EVAL_MODELS = ('server', 'active_mean', 'swa_server', 'swa_active_mean')  # swa_: fl.swa_start
BEST_METRIC = 'val_accuracy'
# fl.select: which round Table 2 reports ('val': the best mean validation accuracy; 'last').
SELECT_RULES = ('val', 'last')


def participation(fraction: float, key, round_index: int, num: int) -> np.ndarray:
  """Active centers of round ``r``: ``ceil(fraction * num)``, drawn from ``fold_in(key, r)``."""
  if not 0 < fraction <= 1:
    raise ValueError(f'fl.participation must be in (0, 1], got {fraction}')
  count = max(1, math.ceil(fraction * num))
  if count == num:
    return np.ones(num, bool)
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, round_index), num))
  active = np.zeros(num, bool)
  active[order[:count]] = True
  return active


def eval_model_name(requested: str, available) -> str:
  """``fl.eval_model``, checked; 'server' for algorithms whose only model is the server's."""
  if requested not in EVAL_MODELS:
    raise ValueError(f'fl.eval_model must be one of {EVAL_MODELS}, got {requested!r}')
  swa = requested.startswith('swa_')
  if swa and not any(name.startswith('swa_') for name in available):
    raise ValueError(f'fl.eval_model={requested!r} evaluates the models averaged over rounds: '
                     'set fl.swa_start to the first round averaged (0 turns averaging off)')
  # FedAvg / FedProx / SCAFFOLD have one model: their server model IS the average.
  return requested if requested in available else 'swa_server' if swa else 'server'


class Checkpoints(NamedTuple):
  """Where and when a run's rounds are committed."""
  mngr: Any            # orbax CheckpointManager keeping the last `keep` and the best
  every: int           # checkpoint.every: each `every` rounds, and the last
  rng: Any             # the state's 'rng' entry (stored for completeness)
  meta: dict           # constant part of each step's meta: centers, eval_model, algorithm, ...


class Run(NamedTuple):
  """One run's federated rounds, from :func:`open_run`."""
  names: tuple         # the training centers; client k is names[k]
  rounds: int          # fl.rounds
  start: int           # the last committed round (0: none)
  eval_name: str
  eval_params: Callable  # server state -> {model name: trainable params}
  draw: Callable       # r -> bool[C], the participation of round r
  epsilons: Callable | None  # r -> each center's DP epsilon after r rounds (fl.dp runs)
  ckpt: Checkpoints


def open_run(workdir: Path, template: dict, keep: int):
  """``(mngr, state, start, meta)``: the FL checkpoints, restored; rows past ``start`` dropped.

  ``template``: ``{'server', 'clients', 'rng'}``; ``meta``: the restored step's ({} if none).
  """
  mngr = checkpoint.manager(workdir_lib.checkpoints(workdir, workdir_lib.FL), keep=keep,
                            best_metric=BEST_METRIC)
  state, start, meta = template, 0, {}
  restored = checkpoint.restore_latest(mngr, template)
  if restored is not None:
    state, meta = restored
    start = meta['round']
  runlog.truncate(workdir, 'fl', start)
  return mngr, state, start, meta


def _check(run: Run, r: int, active, losses, params) -> None:
  last_good = f'round {r - 1} in {run.ckpt.mngr.directory}' if r > 1 else 'the reference model'
  for k, name in enumerate(run.names):
    if active[k]:
      centralized.check_finite(float(losses[k]), f'fl round {r}, center {name!r}', last_good)
  if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params)):
    raise FloatingPointError(f'fl round {r}: the {run.eval_name} model has non-finite parameters '
                             f'after aggregation. Stopped; the last good checkpoint is kept: '
                             f'{last_good}.')


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


def rows(run: Run, r: int, active, round_metrics, evals: dict) -> list:
  """The round's rows: each evaluated training center in order, then the held-out ones."""
  losses, accs = np.asarray(round_metrics['loss']), np.asarray(round_metrics['accuracy'])
  epsilons = run.epsilons(r) if run.epsilons is not None else None
  out = [fl_row(r, name, run.eval_name, active[k], losses[k], accs[k], *evals[name],
                epsilons[k] if epsilons else None)
         for k, name in enumerate(run.names) if name in evals]
  return out + [held_row(r, name, run.eval_name, *tv) for name, tv in evals.items()
                if name not in run.names]


def after_round(run: Run, r: int, trained, evaluate: Callable, log: Callable,
                extra_meta: dict | None = None) -> dict:
  """Checks, evaluates, logs and checkpoints round ``r``; returns the round's summary.

  ``trained``: ``(server, clients, metrics, active)`` of the round.
  """
  server, clients, round_metrics, active = trained
  losses = np.asarray(round_metrics['loss'])
  _check(run, r, active, losses, run.eval_params(server)[run.eval_name])
  round_rows = rows(run, r, active, round_metrics, evaluate(r, server))
  for row in round_rows:
    log(row)
  trained_rows = [row for row in round_rows if not row.get('held_out')]
  val = [row[BEST_METRIC] for row in trained_rows if BEST_METRIC in row]
  mean_val = float(np.mean(val)) if val else None
  summary = {'val_accuracy': mean_val,
             'test_accuracy': float(np.mean([row['accuracy'] for row in trained_rows])),
             'loss': float(np.mean(losses[active]))}
  ckpt = run.ckpt
  if r % ckpt.every == 0 or r == run.rounds:
    meta = {'kind': 'round', 'round': r, **ckpt.meta, 'metrics': summary,
            'best_metric': BEST_METRIC, **(extra_meta or {})}
    # Ranking score: ties go to the earliest round.
    checkpoint.save(ckpt.mngr, r, {'server': server, 'clients': clients, 'rng': ckpt.rng}, meta,
                    metrics={BEST_METRIC: (mean_val or 0.0) - 1e-9 * r})
  return summary


def drive(runs, states: list, train_round: Callable, evaluates, logs, *,
          on_round: Callable | None = None, extra_meta: Callable | None = None) -> list:
  """Runs every run's rounds ``start + 1 .. rounds``; returns the final ``(server, clients)``.

  ``states[i]``: run ``i``'s ``(server, clients)``; ``evaluates[i]``, ``logs[i]``: its
  ``evaluate`` and ``log(row)``. Round ``r`` trains the runs that have not committed it (runs
  resumed at different rounds catch up). ``on_round(i, r, summary)`` follows each round;
  ``extra_meta()``: more of the checkpoint's meta (the deployed federation's state).
  """
  states = list(states)
  for r in range(min(run.start for run in runs) + 1, max(run.rounds for run in runs) + 1):
    members = [i for i, run in enumerate(runs) if run.start < r <= run.rounds]
    trained = train_round(r, members, [runs[i].draw(r) for i in members],
                          [states[i] for i in members])
    for i, out in zip(members, trained):
      summary = after_round(runs[i], r, out, evaluates[i], logs[i],
                            extra_meta() if extra_meta else None)
      states[i] = out[:2]
      if on_round is not None:
        on_round(i, r, summary)
  return states


def selected_round(mngr, rule: str, last: int) -> int:
  """The round ``fl.select`` picks among the kept steps of ``mngr``; ``last``: ``fl.rounds``.

  'val': the step with the best mean validation accuracy over the training centers (read from
  each step's meta, so any manager of the directory will do; ties to the earliest round; only
  checkpointed rounds compete, see ``checkpoint.every``), or ``last`` when no step has one;
  'last': ``last``.
  """
  if rule not in SELECT_RULES:
    raise ValueError(f'fl.select must be one of {SELECT_RULES}, got {rule!r}')
  if rule == 'last':
    return last
  ranked = [(val, -step) for step in mngr.all_steps()
            if (val := checkpoint.read_meta(mngr, step).get('metrics', {}).get(BEST_METRIC))
            is not None]
  return -max(ranked)[1] if ranked else last


def select(run: Run, state, rule: str) -> tuple[dict, Any]:
  """``(selection, server)``: the round ``fl.select`` = ``rule`` picks, and its server state.

  ``selection``: results.json's ``{'rule', 'round', 'last_round'}``; ``state``: the last round's
  ``(server, clients)``, as :func:`drive` returns it (another round's is restored).
  """
  chosen = selected_round(run.ckpt.mngr, rule, run.rounds)
  selection = {'rule': rule, 'round': chosen, 'last_round': run.rounds}
  if chosen == run.rounds:
    return selection, state[0]
  template = {'server': state[0], 'clients': state[1], 'rng': run.ckpt.rng}
  restored, _ = checkpoint.restore(run.ckpt.mngr, template, chosen)
  return selection, restored['server']


def finish(run: Run, state, frozen, rule: str) -> tuple[dict, dict]:
  """Closes the run's checkpoints; ``({name: (trainable, frozen)}, info)`` of the selected round.

  ``state``: the last round's ``(server, clients)``; ``rule``: ``fl.select``. ``info['last']``:
  the last round's ``(trainable, frozen)`` of the evaluated model, ``info['selection']``: which
  round, by which rule (:func:`select`).
  """
  selection, server = select(run, state, rule)
  run.ckpt.mngr.close()
  models_out = {name: (p, frozen) for name, p in run.eval_params(server).items()}
  return models_out, {'eval_model': run.eval_name, 'rounds': run.rounds, 'selection': selection,
                      'last': (run.eval_params(state[0])[run.eval_name], frozen)}
