"""Times one federated round of a narrow VGG16 over centers of unequal sizes, per execution.

Every execution ('vmap', 'loop', 'unroll', and 'shard' when there is more than one
device) runs in this one process on the same data and state, so the ratios are
measured side by side. Prints a table and one JSON line.

Usage::

  python bench/bench_round.py                                    # defaults below
  python bench/bench_round.py --sizes 40,40,40,40,40 --width 0.25 --image_size 64
  python bench/bench_round.py --xla_flag=--xla_cpu_experimental_ynn_fusion_type=dot
      # runs the benchmark twice in child processes, without and with the XLA flag
  XLA_FLAGS=--xla_force_host_platform_device_count=5 python bench/bench_round.py  # + 'shard'
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedblood import algorithms, models, partition, simulate


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='24,40,64,16,96', help='training images per center')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--width', type=float, default=0.25, help='VGG16 width multiplier')
  parser.add_argument('--frozen_blocks', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--local_epochs', type=int, default=1)
  parser.add_argument('--algorithm', default='fed_dyn', choices=algorithms.NAMES)
  parser.add_argument('--executions', default='vmap,loop,unroll,shard')
  parser.add_argument('--rounds', type=int, default=3, help='timed rounds after the first')
  parser.add_argument('--xla_flag', default='', help='compare runs without / with this XLA flag')
  return parser.parse_args(argv)


def he_init(model, image_size, seed=0):
  """He-normal params from numpy (model.init compiles for seconds on CPU; timing is unaffected)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
  rng = np.random.default_rng(seed)
  init = lambda s: (rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))
                    if len(s.shape) > 1 else np.zeros(s.shape))
  return jax.tree.map(lambda s: jnp.asarray(init(s), s.dtype), shapes['params'])


def make_centers(sizes, image_size, num_classes=5, seed=0):
  rng = np.random.default_rng(seed)
  nmax = max(sizes)
  images = rng.integers(0, 256, (len(sizes), nmax, image_size, image_size, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (len(sizes), nmax)).astype(np.int32)
  return simulate.Centers({'image': jnp.asarray(images), 'label': jnp.asarray(labels)},
                          jnp.asarray(sizes, jnp.int32))


def time_execution(args, execution, model, trainable, frozen, centers):
  cfg = dict(algorithm=args.algorithm, lr=0.01, alpha=0.01, mu=0.01, weight_decay=1e-3)
  alg = algorithms.build(cfg)
  round_fn = simulate.build_round(alg, simulate.classifier_loss(model),
                                  batch_size=args.batch_size, local_epochs=args.local_epochs,
                                  execution=execution)
  server, clients = alg.init(trainable, len(centers.sizes))
  active = np.ones(len(centers.sizes), bool)
  key = jax.random.key(0)
  start = time.perf_counter()
  server, clients, metrics = round_fn(server, clients, frozen, centers, active, key, 0)
  jax.block_until_ready((server, clients))
  first = time.perf_counter() - start
  times = []
  for r in range(1, args.rounds + 1):
    start = time.perf_counter()
    server, clients, metrics = round_fn(server, clients, frozen, centers, active, key, r)
    jax.block_until_ready((server, clients))
    times.append(time.perf_counter() - start)
  steps = int(np.sum(metrics['num_steps']))
  return dict(first_s=first, round_s=statistics.median(times), steps=steps,
              loss=float(np.mean(metrics['loss'])))


def run(args):
  sizes = [int(s) for s in args.sizes.split(',')]
  model = models.VGG16(width=args.width, head='gap', num_classes=5)
  params = he_init(model, args.image_size)
  trainable, frozen = partition.split(params, partition.frozen_block_rules(args.frozen_blocks))
  centers = make_centers(sizes, args.image_size)
  executions = [e for e in args.executions.split(',') if e != 'shard' or jax.device_count() > 1]
  results = {e: time_execution(args, e, model, trainable, frozen, centers) for e in executions}
  base = results.get('loop') or next(iter(results.values()))
  print(f'{args.algorithm}, VGG16 width {args.width}, {args.image_size} px, sizes {sizes}, '
        f'batch {args.batch_size}, {args.local_epochs} local epoch(s), '
        f'{jax.device_count()} device(s), XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(f'| execution | first round (compile+run) s | round s | speed vs loop | steps |')
  print('|---|---|---|---|---|')
  for e, r in results.items():
    print(f'| {e} | {r["first_s"]:.2f} | {r["round_s"]:.3f} | {base["round_s"] / r["round_s"]:.2f}x '
          f'| {r["steps"]} |')
  record = dict(bench='round', algorithm=args.algorithm, sizes=sizes, width=args.width,
                image_size=args.image_size, batch_size=args.batch_size,
                local_epochs=args.local_epochs, devices=jax.device_count(),
                xla_flags=os.environ.get('XLA_FLAGS', ''), results=results)
  print(json.dumps(record))
  return record


def compare_flag(args, argv):
  """Runs this script twice, without and with ``args.xla_flag``, and prints the round-time ratios."""
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
  else:
    run(args)


if __name__ == '__main__':
  main()
