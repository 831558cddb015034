"""The training augmentation's cost, RandConv (``data.augment.rand_conv``) on and off.

Usage (prints a table, then one JSON line; --out also writes the JSON)::

  python bench/bench_augment.py          # configs/wbc.py's augmentation, 32 images of 64 px
  python bench/bench_augment.py --tiny   # smoke check: 32 px, a few calls

Candidates, timed round-robin in one process (bench_step.interleaved), each one jitted call of
``fedblood.data.augment`` on a batch of 32 uint8-range images as a local step draws them:

- ``recipe``: configs/wbc.py's ``data.augment`` (flips, quarter turns, colour jitter);
- ``rand_conv``: the same with ``rand_conv=0.5``, the random convolution as fedblood computes it
  (channels first, one multiply-add per tap, input and output channel over whole planes);
- ``rand_conv grouped``: the same draw computed by one grouped ``lax.conv_general_dilated``
  with the batch as groups, the obvious way to write it (not used: slower on XLA:CPU);
- ``step frozen 3``: for scale, one FL local step of configs/wbc.py's model (VGG16 gap, width
  1/8, blocks 1-3 frozen) on such a batch, which the augmentation runs in front of.

Checked: the two RandConv forms give the same images (within 1e-4).
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repository's fedblood

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_step  # noqa: E402
from configs import wbc  # noqa: E402
from fedblood.model import models  # noqa: E402

augment_lib = sys.modules['fedblood.data.augment']


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true', help='32 px, a few calls')
  parser.add_argument('--steps', type=int, default=40, help='timed turns per candidate')
  parser.add_argument('--out', default=None, help='also write the JSON line here')
  args = parser.parse_args(argv)
  if args.tiny:
    args.steps = 3
  return args


def grouped_correlate(x, kernels):
  """``augment_lib._correlate`` as one grouped convolution (the batch as groups)."""
  batch, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode='reflect')
  stacked = padded.transpose(1, 2, 0, 3).reshape(1, height + 6, width + 6, batch * 3)
  kernel = kernels.transpose(1, 2, 3, 0, 4).reshape(7, 7, 3, batch * 3)
  out = jax.lax.conv_general_dilated(stacked, kernel, (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     feature_group_count=batch)
  return out.reshape(height, width, batch, 3).transpose(2, 0, 1, 3)


def augmentation(cfg, correlate=None):
  """A jitted ``(rng, images) -> images`` of ``cfg``, RandConv's correlation by ``correlate``."""
  def fn(rng, images):
    if correlate is None:
      return augment_lib.augment(rng, images, cfg)
    own = augment_lib._correlate  # pylint: disable=protected-access
    augment_lib._correlate = correlate  # pylint: disable=protected-access
    try:  # traced once, here: the jitted program keeps this correlation
      return augment_lib.augment(rng, images, cfg)
    finally:
      augment_lib._correlate = own  # pylint: disable=protected-access
  return jax.jit(fn)


def main(argv=None):
  args = parse_args(argv)
  config = wbc.get_config()
  size = 32 if args.tiny else config.data.image_size
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (32, size, size, 3)), jnp.float32) / 255
  recipe = config.data.augment
  with_rand_conv = recipe.copy_and_resolve_references()
  with_rand_conv.rand_conv = 0.5
  fns = {'recipe': augmentation(recipe), 'rand_conv': augmentation(with_rand_conv),
         'rand_conv grouped': augmentation(with_rand_conv, grouped_correlate)}
  key = jax.random.key(3)
  outs = {name: np.asarray(fn(key, images)) for name, fn in fns.items()}
  same = float(np.abs(outs['rand_conv'] - outs['rand_conv grouped']).max())
  candidates = {name: (lambda fn=fn: fn(key, images).block_until_ready())
                for name, fn in fns.items()}
  model = models.VGG16(num_classes=5, head='gap', width=config.model.width)
  batch = bench_step.random_batch(rng, size)
  compiled, step_args, _ = bench_step.compile_step(model, 3, batch)
  candidates['step frozen 3'] = bench_step.jax_candidate(compiled, step_args)
  times = bench_step.interleaved(candidates, args.steps)
  step = times['step frozen 3']
  print('| candidate | ms per call | / recipe | / FL local step |')
  print('|---|---|---|---|')
  for name, seconds in times.items():
    print(f'| {name} | {1e3 * seconds:.2f} | {seconds / times["recipe"]:.2f} | '
          f'{seconds / step:.2f} |')
  print(f'RandConv forms agree within {same:.1e}; grouped / fedblood\'s: '
        f'{times["rand_conv grouped"] / times["rand_conv"]:.2f}x')
  if same > 1e-4:
    raise SystemExit(f'the two RandConv forms differ by {same}')
  record = dict(bench='augment', image_size=size, batch=32, devices=str(jax.devices()[0]),
                ms={name: 1e3 * s for name, s in times.items()}, max_difference=same)
  bench_step.emit_record(record, args.out)
  return record


if __name__ == '__main__':
  main()
