r"""The real-center study deployed on Flower against the same study simulated: equal, and how long.

  python bench/deploy_study.py --workdir /tmp/deploy_study                 # configs/wbc.py, 100 rounds
  python bench/deploy_study.py --workdir /tmp/ds --rounds 2 --overrides "data.image_size=32"

Three runs of one config (baselines off), in ``--workdir``:

1. ``reference/``: the simulated study with 1 FL round, for its reference model (trained at the
   reference center as ``launch.py`` trains it);
2. ``simulated/``: the study from that reference, ``--rounds`` FL rounds, simulated;
3. ``deployed/``: the same config on a Flower federation on this machine: a SuperLink with TLS
   and node authentication, one registered ``fedblood-supernode`` per center whose
   ``data-root`` holds that center's folder only (a link to ``<data.root>/<center>``), and the
   ServerApp.

Then it compares the last FL checkpoints (max relative difference over every array of the
server state, the clients' states and the key), the ``fl`` rows of metrics.jsonl (equal or
not) and results.json's tables, and prints the wall time of each run's FL stage and one JSON
line (also written to ``compare.json``). Each run resumes: the same command again continues
where it stopped.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedblood import data  # pylint: disable=g-import-not-at-top
from fedblood.deploy import credentials, local, wire  # pylint: disable=g-import-not-at-top
from fedblood.rundir import checkpoint_listing  # pylint: disable=g-import-not-at-top
from fedblood.study import train  # pylint: disable=g-import-not-at-top

CONFIG = str(Path(__file__).resolve().parents[1] / 'configs' / 'wbc.py')
TABLES = ('centers', 'before', 'after', 'after_models', 'after_last', 'selection', 'confusion',
          'train_sizes')


def fl_state(workdir: Path):
  """(step, arrays) of the latest FL checkpoint of ``workdir``."""
  return checkpoint_listing.stored_state(workdir / 'checkpoints' / 'fl')


def max_rel_diff(a, b) -> float:
  """max over leaves of max|a - b| / max|a|."""
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             / max(float(np.max(np.abs(np.asarray(x)))), 1e-30)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def fl_rows(workdir: Path) -> list:
  rows = map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
  return [r for r in rows if r['stage'] == 'fl']


def seconds(workdir: Path, key: str) -> float | None:
  timing = workdir / 'timing.json'
  return json.loads(timing.read_text()).get(key) if timing.exists() else None


def deploy(root: Path, config, spec: str, overrides: str, rounds: int) -> float:
  """The deployed run in ``root/deployed``; returns its wall seconds (this call's)."""
  centers = data.load_centers(config.data)
  overrides += ' data.centers=(' + ','.join(repr(c.name) for c in centers) + ',)'
  t0 = time.time()
  with local.Federation(root / "fed", tls=True, auth=True) as fed:
    fed.start_superlink()
    for c in centers:
      own = root / 'site_data' / c.name  # this site's data-root: its own center only
      own.mkdir(parents=True, exist_ok=True)
      if not (own / c.name).exists():
        (own / c.name).symlink_to(Path(config.data.root).absolute() / c.name)
      private, public = credentials.make_node_key(fed.root, c.name)
      fed.register(public)
      fed.start_supernode(c.name, {'center': c.name, 'state-dir': str(root / 'sites' / c.name),
                                   'data-source': 'folder', 'data-root': str(own)}, key=private)
    out = fed.run({'config': spec, 'overrides': overrides, 'workdir': str(root / 'deployed'),
                   'connect-timeout': 600.0, 'round-timeout': 600.0}, timeout=60 * rounds + 3600)
  if out['status'] != 'finished:completed':
    raise RuntimeError(f"deployed run: {out['status']}\n{out['log'][-3000:]}")
  return time.time() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, type=Path)
  parser.add_argument('--config', default=CONFIG)
  parser.add_argument('--rounds', type=int, default=100)
  parser.add_argument('--overrides', default='', help="extra 'field=value ...' for every run")
  args = parser.parse_args()
  root = args.workdir.absolute()
  path, sep, arg = args.config.partition(':')
  spec = str(Path(path).absolute()) + sep + arg  # the ServerApp runs in another folder
  base = f'baselines.local_only=False baselines.pooled=False {args.overrides}'.strip()
  os.environ.setdefault('TFDS_DATA_DIR', str(root / 'tfds'))
  train.run(wire.load_config(spec, f'{base} fl.rounds=1'), root / 'reference')
  overrides = f"{base} fl.rounds={args.rounds} reference.restore='{root / 'reference'}'"
  config = wire.load_config(spec, overrides)
  t0 = time.time()
  train.run(config, root / 'simulated')
  simulated_s = time.time() - t0
  deployed_s = deploy(root, config, spec, overrides, args.rounds)
  (step_s, sim), (step_d, dep) = fl_state(root / 'simulated'), fl_state(root / 'deployed')
  res_s, res_d = (json.loads((root / w / 'results.json').read_text())
                  for w in ('simulated', 'deployed'))
  cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True)
  out = {'bench': 'deploy_study', 'config': spec, 'overrides': overrides, 'rounds': args.rounds,
         'steps': [step_s, step_d], 'max_rel_diff': max_rel_diff(sim, dep),
         'metrics_rows_equal': fl_rows(root / 'simulated') == fl_rows(root / 'deployed'),
         'tables_equal': {k: res_s[k] == res_d[k] for k in TABLES},
         'fl_stage_s': {'simulated': seconds(root / 'simulated', 'fl_s'),  # the FL rounds
                        'deployed': seconds(root / 'deployed', 'total_s')},  # the whole run
         'this_call_s': {'simulated': simulated_s, 'deployed': deployed_s},
         'cpu': cpu.stdout.split(':')[-1].strip(), 'cores': os.cpu_count()}
  (root / 'compare.json').write_text(json.dumps(out, indent=1))
  print(json.dumps(out))
  if not (out['max_rel_diff'] == 0 and out['metrics_rows_equal'] and all(out['tables_equal'].values())):
    sys.exit('deploy_study: the deployed study differs from the simulated one')


if __name__ == '__main__':
  main()
