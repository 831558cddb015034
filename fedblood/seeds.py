"""Seed sweeps: the study once per seed, each in ``<workdir>/seed=S``, then one aggregate report.

::

  python launch.py --config configs/wbc.py --seeds 0-4 --workdir /tmp/wbc5            # in turn
  python launch.py --config configs/wbc.py --seeds 0-4 --vectorize --workdir /tmp/wbc5

Each seed's sub-workdir is an ordinary run (config.json with its ``seed``, report.md,
checkpoints...): rerunning the command skips finished seeds and resumes the others.
The aggregate (``seeds_report.md``, ``seeds_summary.csv`` / ``.json``, the banded
figure) is written by :mod:`fedblood.aggregate`.

``vectorize``: the federated stage of all unfinished seeds runs as ONE program over a
leading seed axis (:mod:`fedblood.vectorized`); the reference models are trained
seed by seed before it, and Table 2, the baselines and each report after it, by the
ordinary :func:`fedblood.train.run`, which finds the federated rounds checkpointed.
Each seed's numbers equal its own sequential run's to float rounding (not bit for bit:
batching changes the rounding of the convolutions). Seeds whose federated stage was
interrupted at different rounds are first brought, one at a time, to the latest one.
"""

import functools
import json
from pathlib import Path
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedblood import aggregate, algorithms, data, experiment, runlog, sweep, train, vectorized
from fedblood import workdir as workdir_lib
from fedblood.stages import fl as fl_lib
from fedblood.stages.reference import reference_stage


MAX_SEEDS = 1000      # seeds in one --seeds (each is a whole study)
SEED_LIMIT = 2 ** 32  # config.seed is a uint32 (jax.random.key)


def parse_seeds(text: str) -> list[int]:
  """``'0-4'`` -> ``[0, 1, 2, 3, 4]``; also ``'0,3,7'`` and ``'0-2,9'``; distinct, >= 0.

  At most :data:`MAX_SEEDS` seeds, each below 2^32, checked before any range is expanded.
  """
  seeds = []
  for part in str(text).split(','):
    match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
    if not match:
      raise ValueError(f"--seeds {text!r}: expected e.g. '0-4' or '0,3,7', got {part!r}")
    first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
    if last < first:
      raise ValueError(f'--seeds {text!r}: range {part!r} runs backwards')
    if last >= SEED_LIMIT:
      raise ValueError(f'--seeds {text!r}: seed {last} is not below 2^32 ({SEED_LIMIT})')
    if len(seeds) + last - first + 1 > MAX_SEEDS:
      raise ValueError(f'--seeds {text!r}: more than {MAX_SEEDS} seeds (each is a whole study)')
    seeds += range(first, last + 1)
  duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
  if duplicates:
    raise ValueError(f'--seeds {text!r}: seeds {duplicates} appear twice')
  return seeds


def seed_dir(workdir, seed: int) -> Path:
  return Path(workdir) / sweep.point_name({'seed': seed})


def run(config, workdir, seeds, vectorize: bool = False) -> Path:
  """Runs (or resumes) every seed, then writes the aggregate; returns ``seeds_report.md``."""
  workdir = Path(workdir)
  if len(seeds) < 1:
    raise ValueError('--seeds: no seed given')
  execution = config.fl.get('execution', 'auto')
  if vectorize and execution not in vectorized.SWEEP_EXECUTIONS:
    raise ValueError(f'--vectorize: fl.execution must be one of {vectorized.SWEEP_EXECUTIONS}, '
                     f'got {execution!r}')
  if vectorize and config.fl.get('dp') is not None and config.fl.dp.mode != 'off':
    raise ValueError(f'--vectorize: fl.dp.mode={config.fl.dp.mode!r} is not vectorized; run the '
                     'seeds without --vectorize')
  if vectorize and config.fl.get('holdout'):
    raise ValueError(f'--vectorize: fl.holdout={tuple(config.fl.holdout)!r} is not supported by '
                     'the vectorized sweep; run the seeds without --vectorize')
  configs = [sweep.apply(config, {'seed': s}) for s in seeds]
  dirs = [seed_dir(workdir, s) for s in seeds]
  for cfg, d in zip(configs, dirs):  # a seed's workdir of another config: refused before any work
    workdir_lib.check_config(cfg, d)
  todo = [i for i, d in enumerate(dirs) if not workdir_lib.path(d, workdir_lib.RESULTS).exists()]
  timing = {'vectorize': bool(vectorize), 'seeds': list(seeds)}
  if vectorize and len(todo) > 1:
    started = time.time()
    fl_vectorized([configs[i] for i in todo], [dirs[i] for i in todo])
    timing['vectorized_fl_s'] = time.time() - started
  started = time.time()
  for i in todo:
    train.run(configs[i], dirs[i])
  timing['runs_s'] = time.time() - started
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'seeds_timing.json').write_text(json.dumps(timing, indent=1))
  return aggregate.write(workdir, seeds, dirs)


@functools.lru_cache(maxsize=4)
def _sweep_round(loss, settings: ml_collections.FrozenConfigDict):
  fl = settings.as_configdict()
  return vectorized.build_sweep_round(algorithms.build(fl), loss, batch_size=fl.batch_size,
                                      local_epochs=fl.local_epochs,
                                      execution=fl.get('execution', 'auto'))


def fl_vectorized(configs, workdirs) -> None:
  """Reference models seed by seed, then the federated rounds of all of them as one program.

  Leaves each workdir as :func:`fedblood.train.run` would at the end of its FL stage
  (config.json, metrics.jsonl rows, reference and FL checkpoints).
  """
  config = configs[0]
  centers = data.load_centers(config.data)
  exps, runs, servers, clients, logs = [], [], [], [], []
  for cfg, workdir in zip(configs, workdirs):
    workdir_lib.check_config(cfg, workdir)
    logs.append(runlog.logger(workdir))
    exps.append(experiment.build(cfg))
    reference, _ = reference_stage(exps[-1], cfg.reference, centers[0], workdir, logs[-1])
    fl_run, server, client = fl_lib.fl_setup(exps[-1], cfg.fl, cfg.checkpoint, reference, centers,
                                             workdir)
    runs.append(fl_run)
    servers.append(server)
    clients.append(client)
  sim = fl_lib.stack_centers(centers)
  top = max(r.start for r in runs)
  for i, (exp, fl_run) in enumerate(zip(exps, runs)):  # resumed at different rounds: catch up
    for r in range(fl_run.start + 1, top + 1):
      servers[i], clients[i], _ = fl_lib.fl_round(exp, fl_run, centers, sim, r, servers[i],
                                                  clients[i], logs[i])
  round_fn = _sweep_round(exps[0].loss, fl_lib.round_settings(config.fl))
  num = len(runs)
  server, client = vectorized.stack(servers), vectorized.stack(clients)
  frozen = vectorized.stack([r.frozen for r in runs])
  keys = jnp.stack([r.fl_key for r in runs])
  for r in range(top + 1, config.fl.rounds + 1):
    active = np.stack([fl_lib.participation(fl_run.fl, fl_run.part_key, r, len(centers))
                       for fl_run in runs])
    server, client, round_metrics = round_fn(server, client, frozen, sim, active, keys,
                                             jnp.int32(r))
    per_server, per_client = vectorized.unstack(server, num), vectorized.unstack(client, num)
    per_metrics = vectorized.unstack(round_metrics, num)
    for i, (exp, fl_run) in enumerate(zip(exps, runs)):
      fl_lib.fl_after_round(exp, fl_run, centers, r, active[i], per_server[i], per_client[i],
                            per_metrics[i], logs[i])
  for fl_run, workdir in zip(runs, workdirs):
    fl_run.mngr.close()
    runlog.close(workdir)
