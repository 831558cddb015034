"""Stage (c): ``fl.rounds`` federated rounds from the reference model (or from scratch,
``fl.init``), every center evaluated.

:func:`fl_stage` runs them through the round driver (:mod:`fedblood.study.driver`), giving it the
simulated round (:mod:`fedblood.core.rounds`) and the local evaluation; :func:`fl_setup` opens a
run's rounds (the vectorised seed sweep, :mod:`fedblood.study.seeds`, opens one per seed). Each takes
the run's :class:`fedblood.study.experiment.Experiment` and the fields of ``config.fl`` /
``config.checkpoint`` it reads.
"""

from pathlib import Path

import jax
import jax.numpy as jnp

from fedblood import privacy
from fedblood.core import rounds, simulate
from fedblood.model import metrics
from fedblood.study import budgets as budgets_lib, driver
from fedblood.study.experiment import STAGE, Experiment


def held_out(holdout, names) -> tuple:
  """The names in ``fl.holdout`` (centers that never join FL or the pooled baseline), checked.

  ``names``: the centers, reference first.
  """
  holdout = tuple(holdout or ())
  unknown = [h for h in holdout if h not in names]
  if unknown:
    raise ValueError(f'config fl.holdout={holdout!r}: no center named {unknown}; the centers '
                     f'are {list(names)}')
  if names[0] in holdout:
    raise ValueError(f'config fl.holdout={holdout!r}: the reference center {names[0]!r} '
                     'cannot be held out')
  return holdout


INITS = ('reference', 'scratch')  # fl.init: where the federated rounds start


def start_params(exp: Experiment, fl, reference_params):
  """The full parameters round 1 starts from: the reference model's, or with
  ``fl.init='scratch'`` the fresh ones of the run's seed (:attr:`Experiment.init`, where the
  reference and the pooled model from scratch start too)."""
  return exp.init() if fl.get('init', 'reference') == 'scratch' else reference_params


def fl_template(exp: Experiment, fl, reference_params, num_centers: int, dp_plan=None):
  """``(algorithm, round_fn, state template, frozen)`` of the FL stage, from the config alone."""
  trainable, frozen = exp.split(start_params(exp, fl, reference_params))
  algorithm, round_fn = rounds.compiled(rounds.spec(exp.loss, fl, dp_plan))
  server, clients = algorithm.init(trainable, num_centers)
  state = {'server': server, 'clients': clients,
           'rng': jax.random.key_data(jax.random.fold_in(exp.key, STAGE['fl']))}
  return algorithm, round_fn, state, frozen


def fl_setup(exp: Experiment, fl, checkpoint_cfg, reference_params, centers, workdir: Path):
  """``(driver.Run, round_fn, frozen, (server, clients))``, restored if checkpointed."""
  sizes = {c.name: len(c.train.labels) for c in centers}
  dp_plan = privacy.plan(fl, sizes)
  algorithm, round_fn, state, frozen = fl_template(exp, fl, reference_params, len(centers),
                                                   dp_plan)
  mngr, state, start, _ = driver.open_run(workdir, state, checkpoint_cfg.keep)
  eval_name = driver.eval_model_name(fl.get('eval_model', 'server'),
                                     algorithm.eval_params(state['server']))
  part_key = jax.random.fold_in(exp.key, STAGE['participation'])
  draw = lambda r: driver.participation(fl.get('participation', 1.0), part_key, r, len(centers))
  epsilons = None
  if dp_plan is not None:
    draw = budgets_lib.within(dp_plan, budgets_lib.of(fl), draw)
    epsilons = lambda r: privacy.epsilons(dp_plan, _steps_taken(dp_plan, draw, r))
  ckpt = driver.Checkpoints(mngr, checkpoint_cfg.get('every', 1), state['rng'],
                            {'centers': list(sizes), 'eval_model': eval_name,
                             'algorithm': fl.algorithm, 'params': exp.summary(reference_params)})
  run = driver.Run(tuple(sizes), fl.rounds, start, eval_name, algorithm.eval_params, draw,
                   epsilons, ckpt)
  return run, round_fn, frozen, (state['server'], state['clients'])


def _steps_taken(dp_plan, draw, rounds_done: int):
  # Participation is a function of the round: a resumed run recounts the mechanisms taken.
  return privacy.steps_taken(dp_plan, [draw(r) for r in range(1, rounds_done + 1)])


def privacy_info(fl, centers, run: driver.Run) -> dict:
  """``{'privacy': ...}`` of a run with ``fl.dp``, else {}."""
  dp_plan = privacy.plan(fl, {c.name: len(c.train.labels) for c in centers})
  if dp_plan is None:
    return {}
  out = privacy.summary(dp_plan, _steps_taken(dp_plan, run.draw, run.rounds),
                        fl.dp.target_epsilon)
  for name, budget in budgets_lib.of(fl).items():
    out['centers'][name]['budget'] = budget
  return {'privacy': out}


def evaluator(exp: Experiment, run: driver.Run, frozen, centers):
  """The driver's ``evaluate(r, server)``: every center's (test, val) summaries, locally."""
  # One pass over every center's images; the frozen blocks' features computed once, here.
  prepared = exp.prepare(frozen, [c.test for c in centers] + [c.val for c in centers])

  def evaluate(_, server):
    params = run.eval_params(server)[run.eval_name]
    full = exp.evaluate_prepared(params, frozen, prepared)
    tests, vals = full[:len(centers)], full[len(centers):]
    return {c.name: (metrics.summary(test), metrics.summary(val) if len(c.val.labels) else {})
            for c, test, val in zip(centers, tests, vals)}
  return evaluate


def single_round(round_fn, frozen, sim, fl_key):
  """The driver's ``train_round`` of simulated runs, each in turn."""
  def train_round(r, _, actives, states):
    out = []
    for active, (server, clients) in zip(actives, states):
      out.append((*round_fn(server, clients, frozen, sim, jnp.asarray(active), fl_key,
                            jnp.int32(r)), active))
    return out
  return train_round


def fl_stage(exp: Experiment, fl, checkpoint_cfg, reference_params, centers, workdir: Path,
             log) -> tuple[dict, dict]:
  """Runs (or resumes) the federated rounds; returns Table 2's models and the info.

  Table 2's models are those of the round ``fl.select`` picks (:func:`driver.finish`); the
  info's ``last`` holds the last round's evaluated model.

  Centers named in ``fl.holdout`` never train: they are evaluated every round as centers that
  never joined (rows marked ``held_out``) and stay out of the validation mean that ranks rounds.
  """
  holdout = held_out(fl.get('holdout', ()), [c.name for c in centers])
  trained = [c for c in centers if c.name not in holdout]
  held = [c for c in centers if c.name in holdout]
  run, round_fn, frozen, state = fl_setup(exp, fl, checkpoint_cfg, reference_params, trained,
                                          workdir)
  sim = simulate.pad_centers([c.train for c in trained], None,
                             rounds.prior_classes(fl, exp.model.num_classes))
  fl_key = jax.random.fold_in(exp.key, STAGE['fl'])
  bar = exp.progress(fl.rounds, f'fl {fl.algorithm}', run.start) if exp.progress else None

  def on_round(_, r, summary):
    bar.update(1)
    bar.set_postfix(round=r, loss=f'{summary["loss"]:.3f}', acc=f'{summary["test_accuracy"]:.3f}')

  (state,) = driver.drive([run], [state], single_round(round_fn, frozen, sim, fl_key),
                                [evaluator(exp, run, frozen, trained + held)], [log],
                                on_round=on_round if bar is not None else None)
  if bar is not None:
    bar.close()
  models_out, info = driver.finish(run, state, frozen, fl.get('select', 'val'))
  return models_out, {**info, **privacy_info(fl, trained, run)}
