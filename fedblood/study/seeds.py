"""Seed and fold sweeps: the study once per seed (``<workdir>/seed=S``) or per fold of a
stratified k-fold split (``<workdir>/fold=I``), then one aggregate report.

::

  python launch.py --config configs/wbc.py --seeds 0-4 --workdir /tmp/wbc5            # in turn
  python launch.py --config configs/wbc.py --seeds 0-4 --vectorize --workdir /tmp/wbc5
  python launch.py --config configs/wbc.py --folds 5 --workdir /tmp/wbc5f   # every image tested

``--folds K`` runs fold ``i`` = 0..K-1 with ``data.folds=K``, ``data.fold=i`` and
``seed = config.seed + i``: across the K runs every image of every center is a test image
exactly once, and each run also draws its own seed, so the spread over folds holds both the
split's and the training's variance (``folds_report.md``).

Each seed's sub-workdir is an ordinary run: rerunning the command skips finished seeds and
resumes the others; :mod:`fedblood.reporting.aggregate` writes the aggregate.

``vectorize``: the federated stage of all unfinished seeds runs as ONE program over a
leading seed axis (:mod:`fedblood.core.vectorized`); the reference models are trained
seed by seed before it, and Table 2, the baselines and each report after it, by the
ordinary :func:`fedblood.study.train.run`, which finds the federated rounds checkpointed.
Each seed's numbers equal its own sequential run's to float rounding (not bit for bit:
batching changes the rounding of the convolutions). Seeds whose federated stage was
interrupted at different rounds are first brought, one at a time, to the latest one.
"""

import json
import logging
from pathlib import Path
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedblood import data, privacy
from fedblood.core import rounds, simulate
from fedblood.core import vectorized
from fedblood.reporting import aggregate, sweep_table
from fedblood.rundir import runlog
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import driver, experiment, sweep, train
from fedblood.study.stages import fl as fl_lib
from fedblood.study.stages.reference import reference_stage


MAX_SEEDS = 1000      # seeds in one --seeds (each is a whole study)
SEED_LIMIT = 2 ** 32  # config.seed is a uint32 (jax.random.key)


def parse_seeds(text: str, flag: str = '--seeds') -> list[int]:
  """``'0-4'`` -> ``[0, 1, 2, 3, 4]``; also ``'0,3,7'`` and ``'0-2,9'``; distinct, >= 0.

  At most :data:`MAX_SEEDS` seeds, each below 2^32, checked before any range is expanded.
  """
  seeds = []
  for part in str(text).split(','):
    match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
    if not match:
      raise ValueError(f"{flag} {text!r}: expected e.g. '0-4' or '0,3,7', got {part!r}")
    first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
    if last < first:
      raise ValueError(f'{flag} {text!r}: range {part!r} runs backwards')
    if last >= SEED_LIMIT:
      raise ValueError(f'{flag} {text!r}: seed {last} is not below 2^32 ({SEED_LIMIT})')
    if len(seeds) + last - first + 1 > MAX_SEEDS:
      raise ValueError(f'{flag} {text!r}: more than {MAX_SEEDS} seeds (each is a whole study)')
    seeds += range(first, last + 1)
  duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
  if duplicates:
    raise ValueError(f'{flag} {text!r}: seeds {duplicates} appear twice')
  return seeds


MAX_FOLDS = 100


def check_folds(folds) -> int:
  """``--folds K``: an integer in [2, MAX_FOLDS]."""
  if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= MAX_FOLDS:
    raise ValueError(f'--folds {folds!r}: expected a number of folds from 2 to {MAX_FOLDS}')
  return folds


def fold_ids(folds: int, only=None) -> list[int]:
  """The folds a ``--folds K`` study runs: all K, or ``only`` (``--only_folds``: '0-2', '0,3' or a
  list) among them, in order: a study can run some folds now and the rest later."""
  check_folds(folds)
  if only is None:
    return list(range(folds))
  ids = parse_seeds(only, '--only_folds') if isinstance(only, str) else [int(i) for i in only]
  outside = [i for i in ids if i >= folds]
  if not ids or outside:
    raise ValueError(f'--only_folds {only!r}: folds {outside} do not exist in --folds {folds} '
                     f'(0 to {folds - 1})')
  return sorted(ids)


def fold_dir(workdir, fold: int) -> Path:
  return Path(workdir) / f'fold={fold}'


def _fold_restores(config, folds: int, ids) -> list:
  """``reference.restore`` per fold: a ``--folds`` study's root gives each fold its own fold's
  reference (a reference trained on another fold's split has seen this fold's test images)."""
  restore = config.reference.get('restore', '') if 'reference' in config else ''
  root = Path(restore) if restore else None
  if root is None:
    return [None] * len(ids)
  if not fold_dir(root, ids[0]).is_dir():
    if workdir_lib.read_config(root) is not None:  # one fedblood run: trained on another split
      raise ValueError(f'reference.restore={restore!r} is one run, whose reference trained on '
                       'images that some fold tests: with --folds, restore from a --folds '
                       f'{folds} study (each fold gets its own fold\'s reference)')
    return [None] * len(ids)  # a weights file or checkpoint trained elsewhere: every fold's
  now = workdir_lib.config_dict(config).get('data') or {}  # as config.json holds it
  for i in ids:
    saved = (workdir_lib.read_config(fold_dir(root, i)) or {}).get('data') or {}
    split = saved.get('folds'), saved.get('fold')
    if split != (folds, i):
      raise ValueError(
          f'reference.restore={restore!r} is a folds study whose {fold_dir(root, i).name} is '
          f'{"fold %s of %s" % (split[1], split[0]) if split[0] else "missing or not a fold"}, '
          f'not fold {i} of {folds}: its reference may have trained on this fold\'s test '
          f'images; restore from a study of --folds {folds}')
    for key in workdir_lib.SPLIT_KEYS:  # the same K folds of the same images
      if saved.get(key) != now.get(key):
        raise ValueError(f'reference.restore={restore!r}: its {fold_dir(root, i).name} split '
                         f'the images with data.{key}={saved.get(key)!r}, this run with '
                         f'{now.get(key)!r}: its reference may have trained on this '
                         "fold's test images")
  return [str(fold_dir(root, i)) for i in ids]


def fold_runs(config, workdir, folds: int, only=None) -> tuple[list, list]:
  """``(configs, workdirs)`` of the runs of :func:`run_folds`: every fold, or ``only`` those.

  ``reference.restore`` naming a ``--folds`` study (a folder of ``fold=I`` runs) restores fold
  ``i``'s reference in fold ``i``: the FL comparison of ``get_sweep`` over folds, without
  training the references again.
  """
  ids = fold_ids(folds, only)
  restores = _fold_restores(config, folds, ids)
  points = [{'data.folds': folds, 'data.fold': i, 'seed': int(config.seed) + i,
             **({'reference.restore': restore} if restore else {})}
            for i, restore in zip(ids, restores)]
  if int(config.seed) + folds - 1 >= SEED_LIMIT:
    raise ValueError(f'--folds {folds}: fold seeds config.seed + i reach 2^32')
  return [sweep.apply(config, p) for p in points], [fold_dir(workdir, i) for i in ids]


def seed_runs(config, workdir, seeds) -> tuple[list, list]:
  """``(configs, workdirs)`` of the runs of :func:`run` over ``seeds``."""
  if len(seeds) < 1:
    raise ValueError('--seeds: no seed given')
  return [sweep.apply(config, {'seed': s}) for s in seeds], [seed_dir(workdir, s) for s in seeds]


def run_folds(config, workdir, folds: int, only=None) -> Path:
  """Runs (or resumes) each fold of a ``folds``-fold split (or the folds ``only`` names);
  returns ``folds_report.md``, over every fold finished in ``workdir`` (:func:`finished_folds`)."""
  ids = fold_ids(folds, only)
  configs, dirs = fold_runs(config, workdir, folds, ids)
  _run_all(configs, dirs, Path(workdir), {'folds': folds, 'fold_ids': ids}, 'folds_timing.json')
  done = finished_folds(config, workdir, folds, ids)
  return aggregate.write(workdir, done, [fold_dir(workdir, i) for i in done], label='fold')


def finished_folds(config, workdir, folds: int, ids) -> list[int]:
  """``ids`` and every other fold finished in ``workdir`` with the config this study gives it, in
  order; a finished fold of other overrides stays out, with a warning naming it."""
  done = set(ids)
  for i in set(range(folds)) - done:
    fold = fold_dir(workdir, i)
    if workdir_lib.path(fold, workdir_lib.RESULTS).exists():
      try:
        workdir_lib.check_config(fold_runs(config, workdir, folds, [i])[0][0], fold, write=False)
        done.add(i)
      except ValueError as e:  # the first differing field, or why its reference does not fit
        logging.warning('%s has finished with another config (%s): left out of the report',
                        fold, (str(e).split('\n') + [''])[1].strip() or e)
  return sorted(done)


def run_sweep(config, config_file: str, workdir, *, seeds=None, folds: int | None = None,
              only_folds=None) -> Path:
  """Every point of ``config_file``'s ``get_sweep()`` over ``seeds`` or ``folds``, then one table.

  Point ``p`` is an ordinary ``--seeds`` / ``--folds`` study in ``<workdir>/<p>`` (resumable),
  over ``only_folds`` of the folds if given;
  every point and every one of its runs is checked before any trains. Returns
  ``sweep_<seed|fold>s.md`` (:mod:`fedblood.reporting.sweep_table`).
  """
  if (seeds is None) == (folds is None):
    raise ValueError('run_sweep: give seeds or folds, not both')
  workdir = Path(workdir)
  points = sweep.points(config, config_file)
  for p in points:  # a run's workdir of another config: refused before any work
    for cfg, d in zip(*(fold_runs(p['config'], workdir / p['name'], folds, only_folds) if folds
                        else seed_runs(p['config'], workdir / p['name'], seeds))):
      workdir_lib.check_config(cfg, d, write=False)
  for p in points:
    if folds:
      run_folds(p['config'], workdir / p['name'], folds, only_folds)
    else:
      run(p['config'], workdir / p['name'], seeds)
  return sweep_table.write(workdir, points, 'fold' if folds else 'seed')


def _run_all(configs, dirs, workdir: Path, timing: dict, timing_file: str) -> None:
  """Each unfinished run in turn (a run's workdir of another config refused before any);
  ``timing`` (with ``runs_s`` added) goes to ``<workdir>/<timing_file>``."""
  for cfg, d in zip(configs, dirs):
    workdir_lib.check_config(cfg, d)
  started, todo = time.time(), [
      (cfg, d) for cfg, d in zip(configs, dirs)
      if not workdir_lib.path(d, workdir_lib.RESULTS).exists()]
  for cfg, d in todo:
    train.run(cfg, d)
  timing['runs_s'] = time.time() - started
  workdir.mkdir(parents=True, exist_ok=True)
  if todo or not (workdir / timing_file).exists():  # a rerun that trains nothing keeps the
    (workdir / timing_file).write_text(json.dumps(timing, indent=1))  # time of the one that did


def seed_dir(workdir, seed: int) -> Path:
  return Path(workdir) / sweep.point_name({'seed': seed})


def run(config, workdir, seeds, vectorize: bool = False) -> Path:
  """Runs (or resumes) every seed, then writes the aggregate; returns ``seeds_report.md``."""
  workdir = Path(workdir)
  configs, dirs = seed_runs(config, workdir, seeds)
  execution = config.fl.get('execution', 'auto')
  if vectorize and execution not in vectorized.SWEEP_EXECUTIONS:
    raise ValueError(f'--vectorize: fl.execution must be one of {vectorized.SWEEP_EXECUTIONS}, '
                     f'got {execution!r}')
  if vectorize and privacy.enabled(config.fl):
    raise ValueError(f'--vectorize: fl.dp.mode={config.fl.dp.mode!r} is not vectorized; run the '
                     'seeds without --vectorize')
  if vectorize and config.fl.get('holdout'):
    raise ValueError(f'--vectorize: fl.holdout={tuple(config.fl.holdout)!r} is not supported by '
                     'the vectorized sweep; run the seeds without --vectorize')
  for cfg, d in zip(configs, dirs):  # a seed's workdir of another config: refused before any work
    workdir_lib.check_config(cfg, d)
  todo = [i for i, d in enumerate(dirs) if not workdir_lib.path(d, workdir_lib.RESULTS).exists()]
  timing = {'vectorize': bool(vectorize), 'seeds': list(seeds)}
  if vectorize and len(todo) > 1:
    started = time.time()
    fl_vectorized([configs[i] for i in todo], [dirs[i] for i in todo])
    timing['vectorized_fl_s'] = time.time() - started
  _run_all(configs, dirs, workdir, timing, 'seeds_timing.json')
  return aggregate.write(workdir, seeds, dirs)


def fl_vectorized(configs, workdirs) -> None:
  """Reference models seed by seed, then the federated rounds of all of them as one program.

  Leaves each workdir as :func:`fedblood.study.train.run` would at the end of its FL stage
  (config.json, metrics.jsonl rows, reference and FL checkpoints). Seeds resumed at different
  rounds first catch up, each with its own round, to the latest one.
  """
  centers = data.load_centers(configs[0].data)
  exps, runs, states, logs, frozens, keys = [], [], [], [], [], []
  for cfg, workdir in zip(configs, workdirs):
    workdir_lib.check_config(cfg, workdir)
    logs.append(runlog.logger(workdir))
    exps.append(experiment.build(cfg))
    reference, _ = reference_stage(exps[-1], cfg.reference, centers[0], workdir, logs[-1])
    run, round_fn, frozen, state = fl_lib.fl_setup(exps[-1], cfg.fl, cfg.checkpoint, reference,
                                                   centers, workdir)
    runs.append(run)
    states.append(state)
    frozens.append(frozen)
    keys.append(jax.random.fold_in(exps[-1].key, experiment.STAGE['fl']))
  sim = simulate.pad_centers([c.train for c in centers], None,
                             rounds.prior_classes(configs[0].fl, exps[0].model.num_classes))
  _, sweep_fn = rounds.compiled(rounds.spec(exps[0].loss, configs[0].fl), 'sweep')
  stacked_frozen, stacked_keys = vectorized.stack(frozens), jnp.stack(keys)

  # The seeds' configs differ in the seed only: one spec, so one (cached) round_fn for all.
  def train_round(r, members, actives, member_states):
    if len(members) < len(runs):  # catching up: each seed's own round
      return [fl_lib.single_round(round_fn, frozens[i], sim, keys[i])(r, [i], [a], [s])[0]
              for i, a, s in zip(members, actives, member_states)]
    server = vectorized.stack([s for s, _ in member_states])
    clients = vectorized.stack([c for _, c in member_states])
    server, clients, round_metrics = sweep_fn(server, clients, stacked_frozen, sim,
                                              np.stack(actives), stacked_keys, jnp.int32(r))
    num = len(runs)
    return list(zip(vectorized.unstack(server, num), vectorized.unstack(clients, num),
                    vectorized.unstack(round_metrics, num), actives))

  evaluates = [fl_lib.evaluator(exp, run, frozen, centers)
               for exp, run, frozen in zip(exps, runs, frozens)]
  driver.drive(runs, states, train_round, evaluates, logs)
  for run, workdir in zip(runs, workdirs):
    run.ckpt.mngr.close()
    runlog.close(workdir)
