"""The study, one command: reference model, Table 1, federated fine-tuning, Table 2, baselines.

``run(config, workdir)`` runs the stages in order; each is resumable, so the
same command in the same workdir picks up where a previous run stopped::

  (a) reference   centralized training on the reference center (or restore it
                  from ``reference.restore``), early-stopped on its validation split
  (b) Table 1     the reference model on every center's test split
  (c) fl          ``fl.rounds`` federated rounds, every center evaluated each round
  (d) Table 2     the final federated model(s) on every center's test split
  baselines       local-only training per center and pooled centralized training; with
                  ``baselines.personalize`` each center also fine-tunes the federated and
                  the pooled model on its own data

The stages live in :mod:`fedblood.study.stages`; each takes the run's
:class:`fedblood.study.experiment.Experiment` (model, partition, loss, evaluation: built once from
the config) and its own sub-config. The workdir's files: :mod:`fedblood.rundir.workdir`.

Before anything is written the whole config is checked (:mod:`fedblood.study.validate`), then the
workdir is locked for the run (:mod:`fedblood.rundir.lock`), the centers are loaded and checked
(every center needs a training and a test image), and only then is config.json written.

Determinism: every random stream derives from ``config.seed`` by ``fold_in``
(stage, then epoch or round), and rows of ``metrics.jsonl`` are written before
the checkpoint that commits them and dropped on resume when no checkpoint
committed them, so a run killed at any point and resumed ends bit-identical to
an uninterrupted one.
"""

import time
from pathlib import Path

from fedblood import data
from fedblood.backend import numerics
from fedblood.model import metrics, partition
from fedblood.reporting import report
from fedblood.rundir import lock, runlog
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import experiment, priors, validate
from fedblood.study.stages.baselines import baselines_stage
from fedblood.study.stages.fl import fl_stage, held_out
from fedblood.study.stages.reference import reference_stage


def study_results(title, algorithm, rounds, names, before, after_models, eval_name, baselines,
                  reference_info, train_sizes, *, after_last=None, selection=None) -> dict:
  """The results dict of a study (results.json) from full per-center metrics.

  ``title``, ``algorithm``, ``rounds``: ``config.title`` (default 'fedblood run'),
  ``config.fl.algorithm``, ``config.fl.rounds``.
  ``before``: ``{center: metrics}`` of the reference model; ``after_models``:
  ``{model: {center: metrics}}`` of the round ``fl.select`` picked (Table 2); ``baselines``:
  ``{name: {center: metrics}}``; ``after_last``: ``{center: metrics}`` of the last round's
  evaluated model and ``selection`` (:func:`fedblood.study.driver.selection`), when known.
  """
  after = after_models[eval_name]
  summarize = lambda per: {c: metrics.summary(m) for c, m in per.items()}
  out = {
      'title': title, 'centers': names, 'reference': names[0],
      'classes': list(metrics.CLASSES), 'algorithm': algorithm,
      'rounds': rounds, 'eval_model': eval_name,
      'before': summarize(before), 'after': summarize(after),
      'after_models': {name: summarize(per) for name, per in after_models.items()},
      'baselines': {name: summarize(per) for name, per in baselines.items()},
      'confusion': {'before': {c: m['confusion'] for c, m in before.items()},
                    'after': {c: m['confusion'] for c, m in after.items()}},
      'details': {'before': before, 'after': after, **baselines},
      'reference_training': reference_info,
      'train_sizes': train_sizes,
  }
  if selection is not None:
    out['selection'] = selection
  if after_last is not None:
    out['after_last'] = summarize(after_last)
    out['details']['after_last'] = after_last
  return out


def _add_held_out(results: dict, exp, config, model, round_index: int, held: list) -> None:
  """Centers that never joined: named, and Table 2 once more with each one's class priors
  re-estimated by EM on its own images (:func:`fedblood.study.priors.held_out`)."""
  results['held_out'] = [c.name for c in held]
  em, results['priors_em'] = priors.held_out(exp, config, round_index, *model, held)
  results['after_em'] = {c: metrics.summary(m) for c, m in em.items()}
  results['details']['after_em'] = em


# ------------------------------------------------------------------------------------------ run
def run(config, workdir) -> dict:
  """Runs (or resumes) the whole study in ``workdir``; returns the results dict."""
  workdir = Path(workdir)
  validate.check(config)  # before anything is written: a rejected setting can be corrected
  with lock.hold(workdir), numerics.applied(config.get('numerics')):
    workdir_lib.check_config(config, workdir, write=False)
    return _run(config, workdir)


def _run(config, workdir: Path) -> dict:
  started = time.time()
  times = {}
  centers = data.load_centers(config.data)
  data.require_splits(centers)
  # The held-out names are checked before config.json is written.
  holdout = held_out(config.fl.get('holdout', ()), [c.name for c in centers])
  workdir_lib.check_config(config, workdir)
  times['data_s'] = time.time() - started
  names = [c.name for c in centers]
  exp = experiment.build(config)
  log = runlog.logger(workdir)
  tests = {c.name: c.test for c in centers}

  t = time.time()
  reference_params, reference_info = reference_stage(exp, config.reference, centers[0], workdir,
                                                     log)
  times['reference_s'] = time.time() - t
  before = exp.evaluate_splits(reference_params, tests)

  t = time.time()
  fl_models, fl_info = fl_stage(exp, config.fl, config.checkpoint, reference_params, centers,
                                workdir, log)
  times['fl_s'] = time.time() - t
  on_tests = lambda trainable, frozen: {c: exp.evaluate(trainable, frozen, split)
                                        for c, split in tests.items()}
  after_models = {name: on_tests(*model) for name, model in fl_models.items()}
  last = (after_models[fl_info['eval_model']] if fl_info['selection']['round'] == config.fl.rounds
          else on_tests(*fl_info['last']))

  t = time.time()
  baselines = baselines_stage(exp, config.baselines, reference_params, centers, workdir, log,
                              scratch_frozen_blocks=config.reference.frozen_blocks,
                              holdout=holdout,
                              fl_params=partition.merge(*fl_models[fl_info['eval_model']]),
                              reference_recipe=(None if 'restored_from' in reference_info
                                                else config.reference))
  times['baselines_s'] = time.time() - t

  results = study_results(config.get('title', 'fedblood run'), config.fl.algorithm,
                          config.fl.rounds, names, before, after_models, fl_info['eval_model'],
                          baselines, reference_info,
                          {c.name: int(len(c.train.labels)) for c in centers},
                          after_last=last, selection=fl_info['selection'])
  if 'privacy' in fl_info:
    results['privacy'] = fl_info['privacy']
  if holdout:
    _add_held_out(results, exp, config, fl_models[fl_info['eval_model']],
                  fl_info['selection']['round'], [c for c in centers if c.name in holdout])
  path = numerics.describe(config.get('numerics'))
  if path:
    results['numerics'] = path
  times['total_s'] = time.time() - started
  # Timing differs between an interrupted and an uninterrupted run; it lives apart from metrics.
  workdir_lib.write_results(workdir, results, times)
  report.write_report(workdir, {**results, 'wall_time_s': times['total_s']})
  runlog.close(workdir)
  return results
