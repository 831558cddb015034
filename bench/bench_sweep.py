"""K seeds' federated rounds as ONE vectorized program against K sequential runs, side by side.

Usage (prints a table, then one JSON line; --out also writes the JSON)::

  python bench/bench_sweep.py                # the CPU study's round (configs/wbc.py: VGG16 gap
                                             # width 1/8, 64 px, frozen 3, batch 32, FedDyn, its 4
                                             # centers' training sizes), 4 seeds
  python bench/bench_sweep.py --seeds 8      # what bench/gpu_check.sh runs on a GPU
  python bench/bench_sweep.py --tiny         # smoke check: 32 px, width 1/16, small centers

Both candidates train the same K points (their own params, round keys and participation,
here all centers active) on the same random uint8 centers: 'sequential' calls
``simulate.build_round``'s round once per seed (execution 'auto', what a run uses), 'vectorized'
calls ``vectorized.build_sweep_round``'s round once for all K. After each one's first
(compiling) round, rounds are timed INTERLEAVED (sequential round r, vectorized round r, ...)
and the medians compared, so the load of a shared machine hits both alike. At the end, the
largest difference between a vectorized point and its sequential run (float rounding) is
printed too.
"""

import argparse
import os
import platform as host_platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedblood import algorithms  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedblood.backend import platform
from fedblood.core import simulate, vectorized
from fedblood.model import classifier, models, partition

# Training images per center of configs/wbc.py (about 65% of PBC 1497, BCCD 351, JTSC 299,
# LISC 258 images; the rest is validation and test).
WBC_SIZES = (973, 228, 194, 168)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', type=int, default=4, help='K, the sweep points')
  parser.add_argument('--tiny', action='store_true',
                      help='32 px, width 1/16, sizes 24,12,8, batch 8, 1 timed round')
  parser.add_argument('--sizes', default=None, help='training images per center (default: wbc)')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--width', type=float, default=0.125)
  parser.add_argument('--frozen_blocks', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--execution', default='auto', help='of both candidates')
  parser.add_argument('--dtype', default='float32', help="model.dtype ('auto': bf16 on GPU/TPU)")
  parser.add_argument('--rounds', type=int, default=2, help='timed rounds after the first')
  parser.add_argument('--out', default=None, help='also write the JSON record here')
  args = parser.parse_args(argv)
  if args.tiny:
    args.sizes = args.sizes or '24,12,8'
    args.image_size, args.width, args.batch_size, args.rounds = 32, 1 / 16, 8, 1
  args.sizes = [int(s) for s in args.sizes.split(',')] if args.sizes else list(WBC_SIZES)
  return args


def machine() -> dict:
  """The CPU model and the load the numbers were measured under (the machine may be shared)."""
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    name = next((l.split(':', 1)[1].strip() for l in lscpu.splitlines()
                 if l.startswith('Model name')), host_platform.processor())
  except OSError:
    name = host_platform.processor()
  return dict(cpu=name, cores=os.cpu_count(), load_avg=os.getloadavg()[0])


def main(argv=None):
  args = parse_args(argv)
  dtype = platform.compute_dtype(args.dtype)
  model = models.VGG16(num_classes=5, head='gap', width=args.width, dtype=dtype)
  num, k = len(args.sizes), args.seeds
  rng = np.random.default_rng(0)
  nmax, size = max(args.sizes), args.image_size
  centers = simulate.Centers(
      {'image': jnp.asarray(rng.integers(0, 256, (num, nmax, size, size, 3), np.uint8)),
       'label': jnp.asarray(rng.integers(0, 5, (num, nmax)).astype(np.int32))},
      jnp.asarray(args.sizes, jnp.int32))
  rules = partition.frozen_block_rules(args.frozen_blocks)
  points = [partition.split(bench_step.he_init(model, size, seed=i), rules) for i in range(k)]
  keys = [jax.random.key(100 + i) for i in range(k)]
  alg = algorithms.fed_dyn(lr=0.03, alpha=0.01, weight_decay=1e-3, max_grad_norm=10.0)
  loss_fn = classifier.classifier_loss(model)
  single = simulate.build_round(alg, loss_fn, batch_size=args.batch_size, local_epochs=1,
                                execution=args.execution)
  swept = vectorized.build_sweep_round(alg, loss_fn, batch_size=args.batch_size, local_epochs=1,
                                       execution=args.execution)
  active = np.ones(num, bool)

  def sequential(servers, clients, frozen, centers, active, key, r):
    del frozen, key
    outs = [single(servers[i], clients[i], points[i][1], centers, active, keys[i], r)
            for i in range(k)]
    return [o[0] for o in outs], [o[1] for o in outs], outs[-1][2]

  frozen_k, keys_k, active_k = vectorized.stack([f for _, f in points]), jnp.stack(keys), \
      np.stack([active] * k)

  def vectorized_round(server, clients, frozen, centers, active, key, r):
    del frozen, active, key
    return swept(server, clients, frozen_k, centers, active_k, keys_k, r)

  states = [alg.init(t, num) for t, _ in points]
  init = {'sequential': ([s for s, _ in states], [c for _, c in states]),
          'vectorized': (vectorized.stack([s for s, _ in states]),
                         vectorized.stack([c for _, c in states]))}
  runs = {}
  for name, fn in (('sequential', sequential), ('vectorized', vectorized_round)):
    start = time.perf_counter()
    *state, _ = fn(*init[name], None, centers, active, None, 0)
    jax.block_until_ready(state)
    runs[name] = dict(fn=fn, state=state, first_s=time.perf_counter() - start)
    print(f'{name}: first round (compile + run) {runs[name]["first_s"]:.1f} s', flush=True)
  del init, states
  medians = bench_step.interleaved_rounds(runs, None, centers, active, None, args.rounds)
  seq_servers = runs['sequential']['state'][0]
  vec_servers = vectorized.unstack(runs['vectorized']['state'][0], k)
  max_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for i in range(k) for a, b in zip(jax.tree.leaves(vec_servers[i]),
                                                   jax.tree.leaves(seq_servers[i]), strict=True))
  images = k * sum(args.sizes)
  record = dict(bench='sweep', seeds=k, sizes=args.sizes, image_size=size, width=args.width,
                frozen_blocks=args.frozen_blocks, batch_size=args.batch_size, dtype=dtype.name,
                backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                jax=jax.__version__, **machine(), rounds=args.rounds,
                execution={'sequential': single.resolved(centers).execution,
                           'vectorized': swept.resolved(centers).execution},
                results={n: dict(first_s=runs[n]['first_s'], sweep_round_s=medians[n],
                                 images_per_s=images / medians[n]) for n in runs},
                speedup=medians['sequential'] / medians['vectorized'],
                max_abs_diff=max_diff, load_avg_end=os.getloadavg()[0])
  print(f'{k} seeds x FedDyn, VGG16 gap width {args.width}, {size} px, frozen '
        f'{args.frozen_blocks}, sizes {args.sizes}, batch {args.batch_size}, {dtype.name}, '
        f'{record["device"]} ({record["backend"]}), {record["cpu"]}, load '
        f'{record["load_avg"]:.2f} -> {record["load_avg_end"]:.2f}')
  print('| candidate | execution | first round s | K-seed round s | img/s (all seeds) | speed-up |')
  print('|---|---|---|---|---|---|')
  for n, r in record['results'].items():
    print(f'| {n} | {record["execution"][n]} | {r["first_s"]:.1f} | {r["sweep_round_s"]:.2f} | '
          f'{r["images_per_s"]:.0f} | {medians["sequential"] / medians[n]:.2f}x |')
  print(f'vectorized vs sequential: max |diff| of the server params after {args.rounds + 1} '
        f'rounds {max_diff:.2e}')
  bench_step.emit_record(record, args.out)
  return record


if __name__ == '__main__':
  main()
