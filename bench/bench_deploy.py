r"""Wall time per FL round deployed on Flower (localhost) against the simulation's, in one run.

  python bench/bench_deploy.py               # demo smoke study (3 centers, 32 px), 3 rounds x 2
  python bench/bench_deploy.py --rounds 4 --reps 1 --width 0.125
  python bench/bench_deploy.py --config configs/wbc.py --rounds 5 --reps 1   # 4 real centers
  python bench/bench_deploy.py --worker off  # one ClientApp process per message, no warm worker
  python bench/bench_deploy.py --supernode flower  # Flower's SuperNode as shipped (3 s pulls)

With ``--config configs/wbc.py`` each SuperNode reads its own center from the config's
``data.root`` (node config ``data-source='folder' data-root=...``), as a site would.

Same config, model and data on both sides: the simulated round is ``fl_stage``'s (the
jitted round, every center evaluated, a checkpoint); the deployed round is the ServerApp's
(train requests, the server step, every site evaluating, a checkpoint) with one SuperLink and
one SuperNode per center on 127.0.0.1, insecure (TLS costs are not the point here). The
simulated runs go first, before the federation starts (its idle processes poll), then the
deployed ones, ``--reps`` times each, in this process; round 1 (compiles) is reported apart
from the steady rounds 2.. . Prints a markdown table and one JSON line.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedblood import data
from fedblood.deploy import local, wire  # pylint: disable=g-import-not-at-top
from fedblood.rundir import checkpoint, runlog  # pylint: disable=g-import-not-at-top
from fedblood.study import experiment
from fedblood.study.stages.fl import fl_stage  # pylint: disable=g-import-not-at-top
from fedblood.study.stages.reference import load_reference  # pylint: disable=g-import-not-at-top

CONFIG = str(Path(__file__).resolve().parents[1] / 'configs' / 'demo.py') + ':smoke'


def simulated_rounds(config, centers, workdir: Path) -> list[float]:
  """Per-round wall times of ``fl_stage`` (each round ends with its last center's row)."""
  exp = experiment.build(config)
  ref, _ = load_reference(config.reference.restore, exp)
  workdir.mkdir(parents=True)
  log, marks = runlog.logger(workdir, tensorboard=False), [time.time()]

  def timed(row):
    log(row)
    if row['center'] == centers[-1].name:
      marks.append(time.time())

  fl_stage(exp, config.fl, config.checkpoint, ref, centers, workdir, timed)
  return [b - a for a, b in zip(marks, marks[1:])]


def deployed_rounds(fed, spec: str, overrides: str, workdir: Path) -> list[float]:
  out = fed.run({'config': spec, 'overrides': overrides, 'workdir': str(workdir),
                 'connect-timeout': 600.0, 'round-timeout': 600.0}, timeout=3600)
  if out['status'] != 'finished:completed':
    raise RuntimeError(out['log'][-3000:])
  text = (workdir / 'deploy.log').read_text()
  return [float(s) for s in re.findall(r'round \d+: done, ([0-9.]+) s', text)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--reps', type=int, default=2)
  parser.add_argument('--width', type=float, default=None,
                      help='model.width (default: the config\'s; 0.0625 for the demo)')
  parser.add_argument('--config', default=CONFIG, help='a config file[:arg]')
  parser.add_argument('--worker', choices=('on', 'off'), default='on',
                      help='the sites\' warm worker (node config worker=...)')
  parser.add_argument('--supernode', choices=sorted(local.SUPERNODES), default='fedblood',
                      help="'fedblood': Flower's SuperNode pulling every 0.1 s (fedblood-supernode);"
                           " 'flower': as shipped, 3 s between empty pulls")
  args = parser.parse_args()
  if args.width is None and args.config == CONFIG:
    args.width = 0.0625
  path, sep, arg = args.config.partition(':')
  args.config = str(Path(path).absolute()) + sep + arg  # the ServerApp runs in another folder
  root = Path(tempfile.mkdtemp(prefix='bench_deploy_'))
  os.environ.setdefault('TFDS_DATA_DIR', str(root / 'tfds'))
  overrides = (f'fl.rounds={args.rounds} baselines.local_only=False baselines.pooled=False '
               f"reference.restore='{root / 'ref'}'"
               + (f' model.width={args.width}' if args.width is not None else ''))
  config = wire.load_config(args.config, overrides)
  mngr = checkpoint.manager(root / 'ref')
  checkpoint.save(mngr, 0, {'params': experiment.build(config).init()},
                  {'kind': 'reference model'})
  mngr.close()
  centers = data.load_centers(config.data)
  if config.data.source != 'synthetic':  # the server has no images: it is told the centers
    overrides += ' data.centers=(' + ','.join(repr(c.name) for c in centers) + ',)'
    config = wire.load_config(args.config, overrides)
  sim, dep = [], []
  try:
    # The simulated rounds first, on a quiet machine: a federation's idle processes (SuperNodes
    # asking for work 10 times a second, the SuperLink answering) would slow them down.
    for rep in range(args.reps):
      sim.append(simulated_rounds(config, centers, root / f'sim{rep}'))
    with local.Federation(root / 'fed', supernode=args.supernode) as fed:
      fed.start_superlink()
      for k, c in enumerate(centers):
        node = {'center': c.name, 'state-dir': str(root / f'site{k}'), 'worker': args.worker}
        if config.data.source == 'folder':
          node.update({'data-source': 'folder', 'data-root': config.data.root})
        fed.start_supernode(f'site{k}', node)
      for rep in range(args.reps):
        dep.append(deployed_rounds(fed, args.config, overrides, root / f'dep{rep}'))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  steady = lambda runs: sorted(t for run in runs for t in run[1:])
  median = lambda xs: xs[len(xs) // 2] if xs else float('nan')
  s1, d1 = median(sorted(r[0] for r in sim)), median(sorted(r[0] for r in dep))
  s, d = median(steady(sim)), median(steady(dep))
  cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True)
  load = subprocess.run('uptime', capture_output=True, text=True).stdout.strip()
  print(f'machine: {cpu.stdout.strip()}; load: {load}')
  print(f'{args.config}: {len(centers)} centers {[len(c.train.labels) for c in centers]} train '
        f'images, VGG16 width {config.model.width}, {config.data.image_size} px, {args.rounds} '
        f'rounds x {args.reps} reps, simulated first, site worker {args.worker}, '
        f'{args.supernode} SuperNode\n')
  print('| round | simulated s | deployed s | deployed / simulated |\n|---|---|---|---|')
  print(f'| 1 (compiles) | {s1:.2f} | {d1:.2f} | {d1 / s1:.1f}x |')
  print(f'| 2.. (median) | {s:.2f} | {d:.2f} | {d / s:.1f}x |')
  print(json.dumps({'bench': 'deploy', 'config': args.config, 'worker': args.worker,
                    'supernode': args.supernode,
                    'simulated_round_s': s, 'deployed_round_s': d,
                    'ratio': d / s, 'first_round_ratio': d1 / s1, 'simulated': sim,
                    'deployed': dep, 'load': load}))


if __name__ == '__main__':
  main()
