"""Throughput of one local training step of VGG16: images/s, GFLOP/s, MFU, memory, torch ratio.

Usage (each configuration is compiled once, warmed up, then timed over --steps steps):

  python bench/bench_step.py                                  # the default grid below
  python bench/bench_step.py --sizes 128 --heads gap --frozen 3 --batch 16 --torch
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot python bench/bench_step.py ...

The step is what a center runs inside a federated round: forward, cross-entropy, gradient of the
trainable subtree only (blocks 1..frozen are an argument, not differentiated), global-norm clipping
and an SGD update, jitted with the params buffers donated.

Peak: the machine's measured float32 (and bfloat16) matmul GFLOP/s (a 2048^3 jnp.dot timed the same
way); MFU = achieved / peak, achieved = XLA's cost-analysis FLOPs of the compiled step / its time.
Memory: XLA's memory analysis of the compiled step (arguments + outputs + temporaries - aliased).
The torch reference (when torch is installed) runs the same step in the same process with
channels_last and the same thread count; its ratio is JAX images/s / torch images/s.
Prints a table and one JSON line.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedblood import models, partition


def _time(fn, steps: int) -> float:
  """Median seconds of ``steps`` calls of ``fn`` (which blocks), after one warm-up call."""
  fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def matmul_peak(dtype, n: int = 2048, steps: int = 5) -> float:
  """Measured dense matmul GFLOP/s for ``dtype`` on the default backend."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  sec = _time(lambda: f(a, a).block_until_ready(), steps)
  return 2 * n ** 3 / sec / 1e9


def jax_step(head: str, frozen: int, size: int, batch: int, dtype, steps: int, width: float):
  """Times one jitted training step; returns a dict of measurements."""
  model = models.VGG16(num_classes=5, head=head, width=width, dtype=dtype)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, 3)), jnp.float32)
  y = jnp.arange(batch) % 5
  params = model.init(jax.random.key(0), x[:1])['params']
  trainable, frozen_params = partition.split(params, partition.frozen_block_rules(frozen))
  tx = optax.chain(optax.clip_by_global_norm(10.0), optax.sgd(0.01))
  opt_state = tx.init(trainable)

  def step(trainable, opt_state, frozen_params, x, y, rng):
    def loss_fn(p):
      logits = model.apply({'params': partition.merge(p, frozen_params)}, x, train=True,
                           rngs={'dropout': rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  jitted = jax.jit(step, donate_argnums=(0, 1))
  rng = jax.random.key(1)
  compiled = jitted.lower(trainable, opt_state, frozen_params, x, y, rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  mem = compiled.memory_analysis()
  mem_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes) if mem is not None else float('nan')
  state = {'p': trainable, 'o': opt_state}

  def run():
    state['p'], state['o'], loss = compiled(state['p'], state['o'], frozen_params, x, y, rng)
    loss.block_until_ready()

  sec = _time(run, steps)
  return dict(images_per_s=batch / sec, step_s=sec, gflops=flops / 1e9,
              gflop_per_s=flops / sec / 1e9, memory_mb=mem_bytes / 2 ** 20)


def torch_step(head: str, frozen: int, size: int, batch: int, steps: int, width: float):
  """The same step in torch (channels_last, float32) as the outside reference."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  layers, cin, blocks = [], 3, []
  for num_convs, cout in zip((2, 2, 3, 3, 3), models.STAGE_CHANNELS):
    block = []
    cout = models.scaled(cout, width)
    for _ in range(num_convs):
      block += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
      cin = cout
    block.append(nn.MaxPool2d(2))
    blocks.append(nn.Sequential(*block))
  layers = blocks
  if head == 'gap':
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 5)]
  else:
    units = models.scaled(models.FC_UNITS, width)
    feat = cin * (size // 32) ** 2
    layers += [nn.Flatten(), nn.Linear(feat, units), nn.ReLU(), nn.Dropout(),
               nn.Linear(units, units), nn.ReLU(), nn.Dropout(), nn.Linear(units, 5)]
  net = nn.Sequential(*layers).to(memory_format=torch.channels_last)
  for block in blocks[:frozen]:
    for p in block.parameters():
      p.requires_grad_(False)
  trainable = [p for p in net.parameters() if p.requires_grad]
  opt = torch.optim.SGD(trainable, lr=0.01)
  x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
  y = torch.arange(batch) % 5
  loss_fn = nn.CrossEntropyLoss()

  def run():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 10.0)
    opt.step()

  sec = _time(run, steps)
  return dict(images_per_s=batch / sec, step_s=sec)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[64, 128, 224])
  parser.add_argument('--heads', nargs='+', default=['gap', 'fc'])
  parser.add_argument('--frozen', type=int, nargs='+', default=[0, 3])
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--torch', action='store_true', help='also time the torch reference')
  args = parser.parse_args()

  backend = jax.default_backend()
  peaks = {d: matmul_peak(jnp.dtype(d)) for d in args.dtypes}
  print(f'backend={backend} devices={jax.device_count()} XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print('matmul peak GFLOP/s: ' + ', '.join(f'{d} {p:.1f}' for d, p in peaks.items()))
  header = (f'{"head":4} {"frz":>3} {"px":>4} {"dtype":8} {"img/s":>8} {"GFLOP/s":>8} {"MFU":>6} '
            f'{"mem MB":>8} {"torch img/s":>11} {"jax/torch":>9}')
  print(header)
  print('-' * len(header))
  rows = []
  for head in args.heads:
    for frozen in args.frozen:
      for size in args.sizes:
        for dtype in args.dtypes:
          r = jax_step(head, frozen, size, args.batch, jnp.dtype(dtype), args.steps, args.width)
          r.update(head=head, frozen=frozen, size=size, dtype=dtype, batch=args.batch,
                   width=args.width, mfu=r['gflop_per_s'] / peaks[dtype])
          if args.torch and dtype == 'float32':
            t = torch_step(head, frozen, size, args.batch, args.steps, args.width)
            r['torch_images_per_s'] = t['images_per_s']
            r['jax_over_torch'] = r['images_per_s'] / t['images_per_s']
          rows.append(r)
          print(f'{head:4} {frozen:>3} {size:>4} {dtype:8} {r["images_per_s"]:8.1f} '
                f'{r["gflop_per_s"]:8.1f} {r["mfu"]:6.1%} {r["memory_mb"]:8.0f} '
                f'{r.get("torch_images_per_s", float("nan")):11.1f} '
                f'{r.get("jax_over_torch", float("nan")):9.2f}', flush=True)
  print(json.dumps(dict(bench='step', backend=backend, xla_flags=os.environ.get('XLA_FLAGS', ''),
                        matmul_peak_gflops=peaks, rows=rows)))


if __name__ == '__main__':
  main()
