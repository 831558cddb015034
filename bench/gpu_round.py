"""The paper-scale federated round on one accelerator: images/s, MFU, projected 100 rounds.

The study's setting: 5 centers of 10,298 / 14,514 / 2,513 / 5,000 / 11,353 training images,
224 px, VGG16 with the classic fc head, blocks 1-3 frozen, FedDyn, batch 64, 1 local epoch,
bfloat16 compute (``model.dtype='auto'`` on an accelerator) with float32 master weights.
The images are random uint8 generated ON the device (nothing is shipped; ~11 GB at full size).

Usage (writes the JSON record to --out as well as printing it)::

  python bench/gpu_round.py --quick --out $OUT/gpu_round.json   # sizes / 20: ~3-4 min on an H100
  python bench/gpu_round.py --executions loop --out $OUT/full.json  # the full study sizes
  python bench/gpu_round.py --quick --tiny                      # CPU smoke check: seconds

Measured, in order: (1) one isolated local step (the round's step, timed alone: the issue's
">= 40% MFU" target), (2) for each execution (default 'loop', what ``'auto'`` runs on one device,
and 'vmap'), the first round (compile + run) and then ``--rounds`` timed rounds, interleaved.
FLOPs: the step's model FLOPs (bench_step.model_flops, the same count on every backend) x the
steps the round runs (padded no-op steps of 'vmap' not counted: MFU is of useful work).
Peaks: ``--peak_tflops`` (default 989, an H100's dense bfloat16) and the measured 8192^3 matmul
of the compute dtype. The projection of 100 rounds x 1 local epoch at the study's sizes is
100 x 43,678 images / the round's images/s.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_round  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedblood import algorithms  # pylint: disable=g-import-not-at-top,wrong-import-position
from fedblood.backend import platform
from fedblood.core import batches, simulate
from fedblood.model import classifier, models, partition

STUDY_SIZES = bench_round.STUDY_SIZES  # the study's center sizes


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help="the study's sizes / 20")
  parser.add_argument('--tiny', action='store_true',
                      help='CPU smoke check: width 1/16, 32 px, sizes / 1000, batch 4')
  parser.add_argument('--scale', type=float, default=None, help='center sizes x this')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--head', default='fc', choices=('fc', 'gap'))
  parser.add_argument('--frozen_blocks', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--dtype', default='auto', help="model.dtype: 'auto' = bfloat16 on GPU/TPU")
  parser.add_argument('--executions', default='loop,vmap')
  parser.add_argument('--rounds', type=int, default=2, help='timed rounds after the first')
  parser.add_argument('--peak_tflops', type=float, default=989.0,
                      help='nominal dense peak of the compute dtype (H100 SXM bf16: 989)')
  parser.add_argument('--out', default=None, help='also write the JSON record here')
  args = parser.parse_args(argv)
  if args.tiny:
    args.width, args.image_size, args.batch_size = 1 / 16, 32, 4
  if args.scale is None:
    args.scale = 1 / 1000 if args.tiny else 1 / 20 if args.quick else 1.0
  args.sizes = [max(1, round(n * args.scale)) for n in STUDY_SIZES]
  return args


def make_centers(sizes, image_size: int, seed: int = 0) -> simulate.Centers:
  """Random uint8 images and labels generated on the device, one center at a time."""
  nmax, num = max(sizes), len(sizes)
  shape = (nmax, image_size, image_size, 3)
  fill = jax.jit(lambda images, key, k: images.at[k].set(jax.random.bits(key, shape, jnp.uint8)),
                 donate_argnums=0)
  key = jax.random.key(seed)
  images = jnp.zeros((num,) + shape, jnp.uint8)
  for k in range(num):
    images = fill(images, jax.random.fold_in(key, k), k)
  labels = jax.random.randint(jax.random.fold_in(key, num), (num, nmax), 0, 5, jnp.int32)
  return simulate.Centers({'image': images, 'label': labels}, jnp.asarray(sizes, jnp.int32))


def main(argv=None):
  args = parse_args(argv)
  dtype = platform.compute_dtype(args.dtype)
  backend, device = jax.default_backend(), jax.devices()[0].device_kind
  model = models.VGG16(num_classes=5, head=args.head, width=args.width, dtype=dtype)
  print(f'{device} ({backend}), jax {jax.__version__}, {dtype.name}, VGG16 {args.head} width '
        f'{args.width}, {args.image_size} px, frozen {args.frozen_blocks}, sizes {args.sizes}, '
        f'batch {args.batch_size}', flush=True)
  record = dict(bench='gpu_round', backend=backend, device=device, jax=jax.__version__,
                dtype=dtype.name, head=args.head, width=args.width, image_size=args.image_size,
                frozen_blocks=args.frozen_blocks, batch_size=args.batch_size, sizes=args.sizes,
                peak_tflops=args.peak_tflops)

  # (1) the isolated step: model FLOPs (bench_step.model_flops) and its own throughput.
  n = 8192 if platform.is_accelerator(backend) else 1024
  record['matmul_peak_tflops'] = bench_step.matmul_peak(dtype, n) / 1e3
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.integers(0, 256, (args.batch_size, args.image_size,
                                                      args.image_size, 3), np.uint8)),
           'label': jnp.arange(args.batch_size, dtype=jnp.int32) % 5,
           'mask': jnp.ones(args.batch_size, jnp.float32)}
  start = time.perf_counter()
  compiled, call_args, info = bench_step.compile_step(model, args.frozen_blocks, batch)
  step_compile_s = time.perf_counter() - start
  step_s = bench_step.interleaved({'step': bench_step.jax_candidate(compiled, call_args)},
                                  10)['step']
  step_tflop = info['gflops'] / 1e3
  record['step'] = dict(compile_s=step_compile_s, step_s=step_s, tflop=step_tflop,
                        images_per_s=args.batch_size / step_s,
                        mfu=step_tflop / step_s / args.peak_tflops,
                        mfu_measured_peak=step_tflop / step_s / record['matmul_peak_tflops'],
                        xla_memory_gb=info['memory_mb'] / 1024)
  del compiled, call_args
  print(f'step: {record["step"]["images_per_s"]:.0f} img/s, {step_tflop:.2f} TFLOP/step, '
        f'MFU {record["step"]["mfu"]:.1%} of {args.peak_tflops:g} TFLOP/s '
        f'({record["step"]["mfu_measured_peak"]:.1%} of the measured '
        f'{record["matmul_peak_tflops"]:.3g} TFLOP/s matmul), compile {step_compile_s:.0f} s', flush=True)

  # (2) the round, per execution, interleaved after each one's first (compiling) round.
  start = time.perf_counter()
  centers = make_centers(args.sizes, args.image_size)
  jax.block_until_ready(centers)
  record['data_s'] = time.perf_counter() - start
  params = bench_step.he_init(model, args.image_size)
  trainable, frozen = partition.split(params, partition.frozen_block_rules(args.frozen_blocks))
  alg = algorithms.fed_dyn(lr=0.01, alpha=0.01, weight_decay=1e-3, max_grad_norm=10.0)
  loss_fn = classifier.classifier_loss(model)
  active, key = np.ones(len(args.sizes), bool), jax.random.key(0)
  steps = batches.local_steps(args.sizes, args.batch_size, 1)
  runs = {}
  for e in args.executions.split(','):
    round_fn = simulate.build_round(alg, loss_fn, batch_size=args.batch_size, local_epochs=1,
                                    execution=e)
    state = alg.init(trainable, len(args.sizes))
    start = time.perf_counter()
    *state, _ = round_fn(*state, frozen, centers, active, key, 0)
    jax.block_until_ready(state)
    runs[e] = dict(fn=round_fn, state=state, first_s=time.perf_counter() - start)
    print(f'{e}: first round (compile + run) {runs[e]["first_s"]:.1f} s, device peak '
          f'{(bench_step.device_peak_mb() or float("nan")) / 2 ** 10:.1f} GB', flush=True)
  medians = bench_step.interleaved_rounds(runs, frozen, centers, active, key, args.rounds)
  images = sum(args.sizes)
  record['rounds'] = {}
  for e, rec in runs.items():
    round_s = medians[e]
    ips = images / round_s
    record['rounds'][e] = dict(
        first_s=rec['first_s'], round_s=round_s, images_per_s=ips,
        mfu=step_tflop * sum(steps) / round_s / args.peak_tflops,
        projected_100_rounds_min=100 * sum(STUDY_SIZES) / ips / 60)
  peak_mb = bench_step.device_peak_mb()
  record['device_peak_gb'] = peak_mb / 2 ** 10 if peak_mb is not None else None
  base = record['rounds'].get('loop', next(iter(record['rounds'].values())))
  print('| execution | first round s | round s | img/s | MFU (useful) | vs loop | '
        '100 study rounds, min |')
  print('|---|---|---|---|---|---|---|')
  for e, r in record['rounds'].items():
    print(f'| {e} | {r["first_s"]:.1f} | {r["round_s"]:.2f} | {r["images_per_s"]:.0f} | '
          f'{r["mfu"]:.1%} | {base["round_s"] / r["round_s"]:.2f}x | '
          f'{r["projected_100_rounds_min"]:.1f} |')
  bench_step.emit_record(record, args.out)


if __name__ == '__main__':
  main()
