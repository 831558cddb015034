"""Cost of DP-SGD's local step against the plain one: same model, batch and process, interleaved.

Usage (one command; prints a table, then one JSON line)::

  python bench/bench_dp.py                    # configs/wbc.py's model (VGG16 gap, width 1/8,
                                              # 64 px, blocks 1-3 frozen), batch 32
  python bench/bench_dp.py --quick            # 32 px, width 1/16, batch 8
  python bench/bench_dp.py --microbatches 32,16,8,4 --plain_gradients   # + DP without the
                                              # CPU gradient rewrites (mb=4)

Each candidate is ``fedblood.algorithms.base.local_sgd`` over ``--steps`` local steps (the
``fori_loop`` a center runs in a round, CPU gradient rewrites included), jitted, on the same
``--batch`` real-shaped images every step:

* ``plain``: the mean-loss gradient of the batch (today's path, ``fl.dp.mode='off'``);
* ``dp[mb=M]``: DP-SGD on a Poisson sample holding exactly the same ``--batch`` images
  (the expected size), per-example gradients in chunks of ``M`` examples (``fl.dp.microbatch``),
  clipped, noised.

The candidates are compiled, then timed round-robin (plain, dp, ..., plain, dp, ...) and the
medians compared as a ratio to ``plain``, so the load of a shared machine hits all alike;
the machine (CPU model) and ``uptime`` are printed with the results.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from fedblood.algorithms import base, dp  # pylint: disable=wrong-import-position
from fedblood.backend import platform
from fedblood.model import classifier, models, partition  # pylint: disable=wrong-import-position


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='32 px, width 1/16, batch 8')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--width', type=float, default=0.125)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--frozen_blocks', type=int, default=3)
  parser.add_argument('--microbatches', default='', help='comma-separated; default: batch, batch/4')
  parser.add_argument('--dtype', default='float32',
                      help="compute dtype: float32 (configs/wbc.py), bfloat16 or 'auto'")
  parser.add_argument('--steps', type=int, default=4, help='local steps per timed call')
  parser.add_argument('--repeats', type=int, default=5, help='timed calls per candidate')
  parser.add_argument('--plain_gradients', action='store_true',
                      help="add 'dp[mb=M, no rewrite]' for the last M: DP-SGD without the CPU "
                      'gradient rewrites of fedblood.backend.xla_cpu (what they buy)')
  args = parser.parse_args(argv)
  if args.quick:
    args.image_size, args.width, args.batch = 32, 0.0625, 8
  mbs = args.microbatches or f'{args.batch},{max(1, args.batch // 4)}'
  args.microbatches = [int(m) for m in mbs.split(',')]
  return args


def machine() -> dict:
  def run(cmd):
    try:
      return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
      return '?'
  return {'cpu': run("lscpu | grep 'Model name' | sed 's/.*: *//'") or jax.devices()[0].device_kind,
          'uptime': run('uptime'), 'backend': jax.default_backend()}


def model_of(args):
  """configs/wbc.py's model at ``--width`` (tests/test_bench.py checks the two agree), built
  here so that the benchmark runs where tensorflow-datasets (imported by configs/) is not."""
  return models.VGG16(num_classes=5, head='gap', width=args.width, input_norm='per_image',
                      conv_init='he', dtype=platform.compute_dtype(args.dtype))


def candidates(args):
  """``{name: blocking fn}`` of the plain and DP local steps, plus per-candidate info."""
  model = model_of(args)
  params = bench_step.he_init(model, args.image_size)
  trainable, frozen = partition.split(params, partition.frozen_block_rules(args.frozen_blocks))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.integers(0, 256, (args.batch, args.image_size,
                                                     args.image_size, 3), np.uint8)),
           'label': jnp.asarray(rng.integers(0, 5, args.batch), jnp.int32),
           'mask': jnp.ones(args.batch, jnp.float32)}
  classifier_loss = classifier.classifier_loss(model)
  hyper = dict(lr=0.01, max_grad_norm=10.0, weight_decay=1e-3)

  # Frozen params and the batch are arguments (never constants XLA could fold).
  def plain(p, frozen, batch, key):
    loss_fn = lambda q, b, r: classifier_loss(q, frozen, b, r)
    return base.local_sgd(p, loss_fn, lambda s: batch, args.steps, key, **hyper)

  def private(mb, rewrite=None):
    cfg = dp.DpSgd(clip=1.0, noise_multiplier=1.0, expected_batch=args.batch, microbatch=mb)
    pad = -args.batch % mb

    def run(p, frozen, batch, key):
      loss_fn = lambda q, b, r: classifier_loss(q, frozen, b, r)
      rows = {k: jnp.concatenate([v, jnp.zeros((pad,) + v.shape[1:], v.dtype)])
              for k, v in batch.items()}
      fetch = lambda j: {k: jax.lax.dynamic_slice_in_dim(v, j * mb, mb) for k, v in rows.items()}
      sample = dp.PoissonSample(jnp.int32(args.batch), fetch)  # exactly the plain batch
      return base.local_sgd(p, loss_fn, lambda s: sample, args.steps, key, dp=cfg,
                            rewrite=rewrite, **hyper)
    return run

  fns = {'plain': plain, **{f'dp[mb={m}]': private(m) for m in args.microbatches}}
  if args.plain_gradients:
    fns[f'dp[mb={args.microbatches[-1]}, no rewrite]'] = private(args.microbatches[-1],
                                                                 platform.no_rewrite)
  out, info = {}, {}
  call_args = (trainable, frozen, batch, jax.random.key(0))
  for name, fn in fns.items():
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*call_args).compile()
    mem = compiled.memory_analysis()
    info[name] = {'compile_s': time.perf_counter() - start,
                  'temp_mb': (mem.temp_size_in_bytes / 2 ** 20) if mem is not None else None}

    def run(compiled=compiled):
      jax.block_until_ready(compiled(*call_args))
    out[name] = run
  info['trainable_params'] = partition.count(trainable)
  return out, info


def main(argv=None):
  args = parse_args(argv)
  fns, info = candidates(args)
  before = machine()
  times = bench_step.interleaved(fns, args.repeats)
  after = machine()['uptime']
  print(f"machine: {before['cpu']} ({before['backend']}); load before: {before['uptime']}; "
        f'after: {after}')
  print(f'VGG16 width {args.width}, {args.image_size} px, frozen {args.frozen_blocks}, batch '
        f"{args.batch}, {info['trainable_params']} trainable params, {args.steps} local steps "
        'per call')
  print(f"{'candidate':<24} {'s/step':>8} {'ratio':>6} {'temp MiB':>9}")
  for name, t in times.items():
    temp = info[name]['temp_mb']
    print(f"{name:<24} {t / args.steps:8.4f} {t / times['plain']:6.2f} "
          f"{temp if temp is not None else float('nan'):9.1f}")
  print(json.dumps({'args': vars(args), 'machine': before, 'uptime_after': after,
                    's_per_step': {k: v / args.steps for k, v in times.items()},
                    'ratio_to_plain': {k: v / times['plain'] for k, v in times.items()},
                    'info': info}))


if __name__ == '__main__':
  main()
