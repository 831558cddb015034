"""Where a VGG16 step's time goes: every 3x3 convolution layer alone, XLA against torch.

Usage (one command; prints a table, then one JSON line)::

  python bench/bench_layers.py        # the CPU study's VGG16: width 0.25, 64 px, batch 32
  python bench/bench_layers.py --width 1 --size 128 --batch 8
  python bench/bench_layers.py --variants ynn:default,ynn:none   # XLA:CPU options per layer

For each convolution layer of VGG16 (its input size, in and out channels at ``--width``), one
jitted program per candidate computes ``relu(conv(x, w) + b)`` (forward), and the forward with
its gradients (``fwd+grad``: the weight gradient, and the input gradient except for the first
layer, as a training step needs them). Candidates, timed interleaved (bench_step.interleaved):

* ``jax``: as fedblood compiles it (its XLA flags; on CPU the gradient through
  ``fedblood.backend.xla_cpu.fast_gradients``, as local SGD takes it);
* ``jax[<variant>]``: the same programs compiled with other XLA options (bench_step.VARIANTS);
* ``torch``: ``relu(conv2d)`` in channels_last float32 with the same thread count (skipped when
  torch is absent), forward under ``no_grad`` and forward + backward.

The per-layer sums show how much of bench_step's jax/torch ratio the convolution kernels
explain (the rest is pooling, the head, the loss and the optimizer).
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import bench_step
from fedblood.algorithms import base
from fedblood.backend import platform
from fedblood.model import models  # importing fedblood applies its XLA flags


def layer_shapes(width: float, size: int):
  """``[(block, hw, c_in, c_out)]`` of VGG16's 13 convolutions at ``width`` and input ``size``."""
  shapes, c_in, hw = [], 3, size
  stages = zip(models.VGG16.keywords['stages'], models.STAGE_CHANNELS)
  for block, (convs, channels) in enumerate(stages, start=1):
    c_out = models.scaled(channels, width)
    for _ in range(convs):
      shapes.append((block, hw, c_in, c_out))
      c_in = c_out
    hw //= 2
  return shapes


def jax_programs(hw, c_in, c_out, batch, first: bool, options=None):
  """Blocking calls ``(forward, fwd+grad)`` of one layer, compiled with XLA ``options``."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, hw, hw, c_in)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) * np.sqrt(2 / (9 * c_in)), jnp.float32)
  b = jnp.zeros((c_out,), jnp.float32)

  def forward(w, b, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.nn.relu(y + b)

  # Differentiated: the weights, and the input unless this is the first layer (the image).
  def loss(diff, x):
    (w, b), x = diff if not first else (diff, x)
    return jnp.mean(jnp.square(forward(w, b, x))), {}

  diff = (w, b) if first else ((w, b), x)
  grad_fn = base.gradient(loss, platform.gradient_rewrite())
  options = options or {}
  fwd = jax.jit(forward).lower(w, b, x).compile(compiler_options=options)
  grad = jax.jit(grad_fn).lower(diff, x).compile(compiler_options=options)
  return (lambda: jax.block_until_ready(fwd(w, b, x)),
          lambda: jax.block_until_ready(grad(diff, x)))


def torch_programs(hw, c_in, c_out, batch, first: bool):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
  x = torch.randn(batch, c_in, hw, hw).contiguous(memory_format=torch.channels_last)
  x.requires_grad_(not first)

  def fwd():
    with torch.no_grad():
      torch.relu(conv(x))

  def grad():
    conv.zero_grad(set_to_none=True)
    torch.relu(conv(x)).square().mean().backward()
  return fwd, grad


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--width', type=float, default=0.25)
  parser.add_argument('--size', type=int, default=64)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=20, help='timed calls per candidate')
  parser.add_argument('--variants', default='',
                      help=f'comma-separated, of {sorted(bench_step.VARIANTS)}')
  parser.add_argument('--no_torch', action='store_true')
  args = parser.parse_args(argv)
  variants = [v for v in args.variants.split(',') if v]
  unknown = set(variants) - set(bench_step.VARIANTS)
  if unknown:
    parser.error(f'unknown --variants {sorted(unknown)}; known: {sorted(bench_step.VARIANTS)}')
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    torch_ok = not args.no_torch
  except ImportError:
    torch_ok = False

  names = ['jax'] + [f'jax[{v}]' for v in variants] + (['torch'] if torch_ok else [])
  print(f'backend={jax.default_backend()} jax={jax.__version__} load={os.getloadavg()[0]:.2f} '
        f'width={args.width} size={args.size} batch={args.batch} '
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  cols = ' | '.join(f'{n} fwd ms | {n} fwd+grad ms' for n in names)
  print(f'| block | px | c_in | c_out | {cols} |' + (' jax/torch fwd | jax/torch fwd+grad |'
                                                      if torch_ok else ''))
  print('|' + '---|' * (4 + 2 * len(names) + (2 if torch_ok else 0)))
  rows, totals = [], {n: [0.0, 0.0] for n in names}
  for i, (block, hw, c_in, c_out) in enumerate(layer_shapes(args.width, args.size)):
    progs = {'jax': jax_programs(hw, c_in, c_out, args.batch, i == 0)}
    for v in variants:
      progs[f'jax[{v}]'] = jax_programs(hw, c_in, c_out, args.batch, i == 0,
                                        bench_step.VARIANTS[v])
    if torch_ok:
      progs['torch'] = torch_programs(hw, c_in, c_out, args.batch, i == 0)
    cands = {}
    for n, (fwd, grad) in progs.items():
      cands[(n, 'fwd')], cands[(n, 'grad')] = fwd, grad
    secs = bench_step.interleaved(cands, args.steps, block=2,
                                   untimed_s=0.1 if torch_ok else 0)
    ms = {n: (secs[(n, 'fwd')] * 1e3, secs[(n, 'grad')] * 1e3) for n in names}
    for n in names:
      totals[n][0] += ms[n][0]
      totals[n][1] += ms[n][1]
    row = dict(block=block, px=hw, c_in=c_in, c_out=c_out, ms=ms)
    cells = ' | '.join(f'{ms[n][0]:.2f} | {ms[n][1]:.2f}' for n in names)
    ratio = ''
    if torch_ok:
      row['jax_over_torch'] = (ms['torch'][0] / ms['jax'][0], ms['torch'][1] / ms['jax'][1])
      ratio = f' {row["jax_over_torch"][0]:.2f} | {row["jax_over_torch"][1]:.2f} |'
    print(f'| {block} | {hw} | {c_in} | {c_out} | {cells} |{ratio}', flush=True)
    rows.append(row)
  cells = ' | '.join(f'**{totals[n][0]:.1f}** | **{totals[n][1]:.1f}**' for n in names)
  ratio = (f' **{totals["torch"][0] / totals["jax"][0]:.2f}** | '
           f'**{totals["torch"][1] / totals["jax"][1]:.2f}** |' if torch_ok else '')
  print(f'| all | | | | {cells} |{ratio}')
  print(json.dumps(dict(bench='layers', backend=jax.default_backend(), jax=jax.__version__,
                        load_avg=os.getloadavg()[0], width=args.width, size=args.size,
                        batch=args.batch, rows=rows, totals_ms=totals)))


if __name__ == '__main__':
  main()
