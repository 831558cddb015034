"""Times one federated round of VGG16 over 5 centers of unequal sizes, per execution, side by side.

Every execution ('vmap', 'loop', 'unroll', 'auto', and 'shard' when there are several devices)
is built and compiled in this one process on the same data and starting state; then the timed
rounds are INTERLEAVED (round r of every execution, then round r+1, ...) and the medians
compared, so the load of a shared machine hits all alike. Prints a table and one JSON line.

Usage::

  python bench/bench_round.py --quick      # 32 px, 240 images, batch 16
  python bench/bench_round.py              # the CPU study's model (configs/wbc.py: VGG16 gap
                                           # width 0.25, 64 px, frozen 3, batch 32) on 437
                                           # images (the study's center sizes / 100)
  python bench/bench_round.py --devices 5  # 5 host devices: adds 'shard'
  python bench/bench_round.py --plain_gradients  # adds 'loop' without the CPU gradient rewrites
  python bench/bench_round.py --xla_options ynn:default  # adds 'loop' without fedblood's XLA flag
  python bench/bench_round.py --xla_flag=--xla_cpu_experimental_ynn_fusion_type=dot
      # runs the benchmark twice in child processes, without and with the XLA flag
"""

import argparse
import json
import os
import subprocess
import sys
import time

# The study's center sizes (training images), scaled down by --scale.
STUDY_SIZES = (10298, 14514, 2513, 5000, 11353)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='--sizes 24,40,64,16,96 --image_size 32 --batch_size 16')
  parser.add_argument('--sizes', default=None,
                      help="training images per center (default: the study's sizes / 100)")
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--width', type=float, default=0.25, help='VGG16 width multiplier')
  parser.add_argument('--head', default='gap', choices=('gap', 'fc'))
  parser.add_argument('--frozen_blocks', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--local_epochs', type=int, default=1)
  parser.add_argument('--algorithm', default='fed_dyn')
  parser.add_argument('--executions', default='vmap,loop,unroll,shard,auto')
  parser.add_argument('--rounds', type=int, default=3, help='timed rounds after the first')
  parser.add_argument('--devices', type=int, default=0,
                      help='host (CPU) devices to create, for shard; 0 = leave XLA_FLAGS alone')
  parser.add_argument('--xla_flag', default='', help='compare runs without / with this XLA flag')
  parser.add_argument('--xla_options', default='',
                      help="comma-separated option sets of bench_step.VARIANTS (e.g. 'ynn:default', "
                      "XLA's own default): adds 'loop[<set>]', 'loop' compiled with them")
  parser.add_argument('--plain_gradients', action='store_true',
                      help="add 'loop[plain gradients]': 'loop' without the CPU gradient "
                      'rewrites of fedblood.backend.xla_cpu (what they buy)')
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes = args.sizes or '24,40,64,16,96'
    args.image_size, args.batch_size = 32, 16
  args.sizes = [int(s) for s in (args.sizes or ','.join(
      str(round(n / 100)) for n in STUDY_SIZES)).split(',')]
  return args


def run(args):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedblood import algorithms  # pylint: disable=g-import-not-at-top
  from fedblood.model import classifier, models, partition
  from fedblood.backend import platform
  from fedblood.core import simulate
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_step  # pylint: disable=g-import-not-at-top

  model = models.VGG16(width=args.width, head=args.head, num_classes=5)
  params = bench_step.he_init(model, args.image_size)
  trainable, frozen = partition.split(params, partition.frozen_block_rules(args.frozen_blocks))
  rng = np.random.default_rng(0)
  nmax, num = max(args.sizes), len(args.sizes)
  size = args.image_size
  centers = simulate.Centers(
      {'image': jax.numpy.asarray(rng.integers(0, 256, (num, nmax, size, size, 3), np.uint8)),
       'label': jax.numpy.asarray(rng.integers(0, 5, (num, nmax)).astype(np.int32))},
      jax.numpy.asarray(args.sizes, jax.numpy.int32))
  cfg = dict(algorithm=args.algorithm, lr=0.01, alpha=0.01, mu=0.01, weight_decay=1e-3)
  alg = algorithms.build(cfg)
  plain_alg = algorithms.build(cfg, rewrite=platform.no_rewrite)  # without the CPU rewrites
  loss_fn = classifier.classifier_loss(model)
  executions = [e for e in args.executions.split(',') if e != 'shard' or jax.device_count() > 1]
  active, key = np.ones(num, bool), jax.random.key(0)

  options = [o for o in args.xla_options.split(',') if o]
  executions += [f'loop[{o}]' for o in options] + ['loop[plain gradients]'] * args.plain_gradients
  runs = {}
  for e in executions:  # build + first round (compile and run) of each execution
    option = e[len('loop['):-1] if e[len('loop['):-1] in options else None
    round_fn = simulate.build_round(
        plain_alg if e.endswith('[plain gradients]') else alg, loss_fn,
        batch_size=args.batch_size, local_epochs=args.local_epochs, execution=e.split('[')[0],
        compiler_options=bench_step.VARIANTS[option] if option else None)
    state = alg.init(trainable, num)
    start = time.perf_counter()
    *state, metrics = round_fn(*state, frozen, centers, active, key, 0)
    jax.block_until_ready(state)
    runs[e] = dict(fn=round_fn, state=state, first_s=time.perf_counter() - start,
                   steps=int(np.sum(metrics['num_steps'])))
    print(f'{e}: first round (compile + run) {runs[e]["first_s"]:.1f} s', flush=True)
  round_s = bench_step.interleaved_rounds(runs, frozen, centers, active, key, args.rounds)
  results = {e: dict(first_s=rec['first_s'], round_s=round_s[e], steps=rec['steps'],
                     loss=float(np.mean(rec['metrics']['loss'])),
                     images_per_s=sum(args.sizes) * args.local_epochs / round_s[e])
             for e, rec in runs.items()}
  if 'auto' in runs:
    results['auto']['chose'] = runs['auto']['fn'].resolved(centers).execution
  base = results.get('loop') or next(iter(results.values()))
  for r in results.values():
    r['speed_vs_loop'] = base['round_s'] / r['round_s']
  print(f'{args.algorithm}, VGG16 {args.head} width {args.width}, {size} px, frozen '
        f'{args.frozen_blocks}, sizes {args.sizes}, batch {args.batch_size}, {args.local_epochs} '
        f'local epoch(s), {jax.device_count()} {jax.default_backend()} device(s), jax '
        f'{jax.__version__}, load {os.getloadavg()[0]:.2f}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print('| execution | first round (compile+run) s | round s | img/s | speed vs loop | local steps |')
  print('|---|---|---|---|---|---|')
  for e, r in results.items():
    name = f'auto ({r["chose"]})' if e == 'auto' else e
    print(f'| {name} | {r["first_s"]:.1f} | {r["round_s"]:.2f} | {r["images_per_s"]:.1f} | '
          f'{r["speed_vs_loop"]:.2f}x | {r["steps"]} |')
  record = dict(bench='round', algorithm=args.algorithm, sizes=args.sizes, width=args.width,
                head=args.head, image_size=size, frozen_blocks=args.frozen_blocks,
                batch_size=args.batch_size, local_epochs=args.local_epochs,
                backend=jax.default_backend(), devices=jax.device_count(), jax=jax.__version__,
                load_avg=os.getloadavg()[0], xla_flags=os.environ.get('XLA_FLAGS', ''),
                results=results)
  print(json.dumps(record))
  return record


def compare_flag(args, argv):
  """Runs this script twice, without and with ``args.xla_flag``; prints the round-time ratios."""
  child_argv = [a for a in argv if not a.startswith('--xla_flag')]
  records = []
  for flag in ('', args.xla_flag):
    flags = ' '.join(f for f in (os.environ.get('XLA_FLAGS', ''), flag) if f)
    proc = subprocess.run([sys.executable, __file__, *child_argv], capture_output=True, text=True,
                          env=dict(os.environ, XLA_FLAGS=flags), check=True)
    print(proc.stdout, end='')
    records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  without, with_ = (r['results'] for r in records)
  ratios = {e: without[e]['round_s'] / with_[e]['round_s'] for e in without if e in with_}
  print(f'speed-up from {args.xla_flag}: ' + ', '.join(f'{e} {v:.2f}x' for e, v in ratios.items()))
  print(json.dumps(dict(bench='round_xla_flag', flag=args.xla_flag, speedup=ratios)))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.xla_flag:
    compare_flag(args, argv)
    return
  # Before JAX starts (run() imports fedblood, which adds its own flags): host devices.
  if args.devices:
    os.environ['XLA_FLAGS'] = ' '.join(
        [os.environ.get('XLA_FLAGS', ''), f'--xla_force_host_platform_device_count={args.devices}'])
  run(args)


if __name__ == '__main__':
  main()
