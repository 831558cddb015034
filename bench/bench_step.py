"""Throughput of one local training step of VGG16: images/s, GFLOP/s, MFU, memory, torch ratio.

Usage (one command; prints a table, then one JSON line)::

  python bench/bench_step.py --quick     # VGG16 gap head, frozen 3, 64 px, float32: ~1 min (CPU)
  python bench/bench_step.py             # gap/fc x frozen 0/3 x 64/128/224 px x float32/bfloat16
  python bench/bench_step.py --sizes 64 --width 0.25 --batch 32 --frozen 3   # the CPU study's step
  python bench/bench_step.py --variants ynn:default,ynn:none   # other XLA:CPU options to compare

The step is the one a center runs inside a federated round: fedblood's classifier loss on uint8
images (blocks 1..frozen an argument, not differentiated), its gradient as local SGD takes it
(``fedblood.algorithms.base.gradient``: on CPU re-emitted by ``xla_cpu.fast_gradients``), then
fedblood's local optimizer (global-norm clipping, weight decay, SGD), jitted with the trainable
params donated.

Every configuration's candidates are compiled, warmed up, then timed INTERLEAVED (candidate A,
B, C, A, B, C, ...) and the medians compared, so the load of a shared machine hits all alike:

* ``jax``: the step as fedblood compiles it (importing fedblood applies its XLA flags,
  fedblood.backend.flags.XLA_FLAGS, unless XLA_FLAGS sets them);
* ``jax[<variant>]``: the same step compiled with other XLA options (``jax.jit``'s
  ``compiler_options``, which act exactly like the XLA_FLAGS of the same name for that one
  program); on CPU by default ``ynn:default``, XLA's own default (YNN convolutions and dots),
  i.e. the step without fedblood's ``--xla_cpu_experimental_ynn_fusion_type=dot``;
* ``torch``: the same network and step in torch (channels_last, float32, same thread count),
  when torch is installed: the outside reference; the table's ratio is jax / torch images/s.

Peak: the measured dense matmul GFLOP/s of the backend per dtype (a jitted 2048^3 (CPU) or
8192^3 (accelerator) ``x @ y``, best of 10, measured once before the grid); ``--peak_tflops``
adds a nominal dense bfloat16 peak (989 for an H100) for the bfloat16 rows. MFU = the step's
model FLOPs (:func:`model_flops`: the convolutions and matrix products of its jaxpr, counted the
same way on every backend) / its median time / peak. XLA's cost analysis of the compiled step is
kept as ``xla_gflops`` but is not used: on GPU it does not count the convolutions XLA hands to
cuDNN (0.37 GFLOP per image there against 51.5 on CPU for the same step). Memory: XLA's memory analysis of the compiled step
(arguments + outputs + temporaries - donated aliases), and the device's peak bytes in use where
the backend reports it (GPU/TPU).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np

from fedblood.algorithms import base
from fedblood.backend import flags, platform
from fedblood.model import classifier, models, partition

# Named XLA options a candidate can be compiled with (compiler_options of jax.jit).
VARIANTS = {
    'ynn:dot': {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'},
    'ynn:none': {'xla_cpu_experimental_ynn_fusion_type': ''},
    'ynn:default': {'xla_cpu_experimental_ynn_fusion_type':
                    'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'},
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='gap head, frozen 3, 64 px, float32')
  parser.add_argument('--sizes', type=int, nargs='+', default=[64, 128, 224])
  parser.add_argument('--heads', nargs='+', default=['gap', 'fc'])
  parser.add_argument('--frozen', type=int, nargs='+', default=[0, 3])
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
  parser.add_argument('--batch', type=int, default=None, help='default: 8 on CPU, 64 elsewhere')
  parser.add_argument('--width', type=float, default=1.0, help='VGG16 width multiplier')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per candidate')
  parser.add_argument('--variants', default=None,
                      help=f'comma-separated XLA option sets of {sorted(VARIANTS)}; default: '
                      "'ynn:default' on CPU, none elsewhere; '' for none")
  parser.add_argument('--no_torch', action='store_true', help='skip the torch reference')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='nominal dense bfloat16 peak (H100: 989): MFU of the bfloat16 rows')
  args = parser.parse_args(argv)
  cpu = jax.default_backend() == 'cpu'
  if args.quick:
    args.sizes, args.heads, args.frozen, args.dtypes = [64], ['gap'], [3], ['float32']
  args.batch = args.batch or (8 if cpu else 64)
  if args.variants is None:
    args.variants = 'ynn:default' if cpu else ''
  args.variants = [v for v in args.variants.split(',') if v]
  unknown = set(args.variants) - set(VARIANTS)
  if unknown:
    parser.error(f'unknown --variants {sorted(unknown)}; known: {sorted(VARIANTS)}')
  return args


def interleaved(candidates: dict, steps: int, *, block: int = 1, untimed_s: float = 0.0) -> dict:
  """Median seconds per call of each blocking ``fn`` in ``candidates``, timed round-robin.

  Each turn first calls one candidate untimed for ``untimed_s`` seconds (at least once when
  > 0), then times ``block`` calls back to back, then moves to the next candidate. The untimed
  calls matter when frameworks mix: torch's OpenMP threads keep spinning after a call and, on
  a 2-core machine, took the cores from the next candidate (XLA's layers timed right after
  torch's ran up to 1.9x slower than alone; bench_layers.py). Sleeping instead made every
  first call cold on this VM.
  """
  for fn in candidates.values():
    fn()  # warm-up (first run after compile: allocations, caches)
  times = {name: [] for name in candidates}
  for _ in range(steps):
    for name, fn in candidates.items():
      if untimed_s:
        until = time.perf_counter() + untimed_s
        fn()
        while time.perf_counter() < until:
          fn()
      for _ in range(block):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def interleaved_rounds(runs: dict, frozen, centers, active, key, rounds: int) -> dict:
  """Median seconds of ``rounds`` FL rounds of each run, timed interleaved after its first.

  ``runs``: ``{name: {'fn': round_fn, 'state': (server, clients)}}`` whose first (compiling)
  round already ran as round 0. Round r of every run, then round r + 1, ...; each run's
  ``'state'`` advances, and its ``'times'`` and last ``'metrics'`` are added.
  """
  for r in range(1, rounds + 1):
    for rec in runs.values():
      start = time.perf_counter()
      *rec['state'], rec['metrics'] = rec['fn'](*rec['state'], frozen, centers, active, key, r)
      jax.block_until_ready(rec['state'])
      rec.setdefault('times', []).append(time.perf_counter() - start)
  return {name: float(np.median(rec['times'])) for name, rec in runs.items()}


def emit_record(record: dict, out=None) -> None:
  """Prints the benchmark's JSON line, and writes it to ``out`` as well when given."""
  line = json.dumps(record)
  print(line)
  if out:
    with open(out, 'w') as f:
      f.write(line + '\n')


def matmul_peak(dtype, n: int, steps: int = 10) -> float:
  """Measured dense matmul GFLOP/s of ``dtype``: the best of ``steps`` timed ``x @ y``."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float('inf')
  for _ in range(steps):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e9


def he_init(model, size: int, seed: int = 0):
  """He-normal params from numpy: model.init compiles for tens of seconds on CPU at full width."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
  rng = np.random.default_rng(seed)
  def init(s):
    if len(s.shape) == 1:
      return jnp.zeros(s.shape, s.dtype)
    fan_in = np.prod(s.shape[:-1])
    return jnp.asarray(rng.normal(size=s.shape, scale=np.sqrt(2 / fan_in)), s.dtype)
  return jax.tree.map(init, shapes)


def _sub_jaxprs(params):
  for v in params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def _taps(size, lhs_dilation, pad, kernel, rhs_dilation, stride, out) -> int:
  """(output, kernel tap) pairs of one spatial dim whose input is a real element (not padding
  or a dilation hole): a transposed convolution's padded taps do no work."""
  pos = (np.arange(out)[:, None] * stride + np.arange(kernel)[None, :] * rhs_dilation) - pad[0]
  real = (pos >= 0) & (pos <= (size - 1) * lhs_dilation) & (pos % lhs_dilation == 0)
  return int(real.sum())


def _conv_flops(eqn) -> float:
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p['dimension_numbers']
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  taps = 1
  for i in range(len(lhs_spec) - 2):
    taps *= _taps(lhs[lhs_spec[i + 2]], p['lhs_dilation'][i], p['padding'][i],
                  rhs[rhs_spec[i + 2]], p['rhs_dilation'][i], p['window_strides'][i],
                  out[out_spec[i + 2]])
  return 2.0 * out[out_spec[0]] * out[out_spec[1]] * rhs[rhs_spec[1]] * taps


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lhs_contract])
    else:
      subs = [_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)]
      if name == 'cond':
        total += max(subs, default=0.0)
      else:  # a scan's body runs `length` times; anything else (pjit, custom_vjp, ...) once
        total += sum(subs) * (eqn.params['length'] if name == 'scan' else 1)
  return total


def model_flops(fn, *args) -> float:
  """FLOPs of ``fn(*args)``'s convolutions and matrix products (2 per multiply-add).

  Counted on the traced jaxpr, so the number is the program's and not a backend's: XLA's cost
  analysis on GPU leaves out the convolutions it hands to cuDNN. A convolution counts only the
  taps that meet a real input element, as XLA:CPU's cost analysis does (a gradient's padded or
  dilated taps multiply zeros). Elementwise work is not counted (the usual "model FLOPs" of
  MFU). A while loop's body is counted once.
  """
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def random_batch(rng, size: int, n: int = 32) -> dict:
  """A local step's batch of ``n`` random uint8 images of ``size`` px, labels 0-4 in turn."""
  return {'image': jnp.asarray(rng.integers(0, 256, (n, size, size, 3), np.uint8)),
          'label': jnp.arange(n, dtype=jnp.int32) % 5, 'mask': jnp.ones(n, jnp.float32)}


def compile_step(model, frozen_blocks: int, batch: dict, options=None):
  """``(compiled, args, info)`` of one local step; ``compiled(*args)`` -> (params, loss)."""
  params = he_init(model, batch['image'].shape[1])
  trainable, frozen = partition.split(params, partition.frozen_block_rules(frozen_blocks))
  loss_fn = classifier.classifier_loss(model)
  tx = base.local_tx(lr=0.01, max_grad_norm=10.0, weight_decay=1e-3)

  def make_step(rewrite):
    grad_fn = base.gradient(loss_fn, rewrite)

    def step(trainable, frozen, batch, rng):
      grads, aux = grad_fn(trainable, frozen, batch, rng)
      updates, _ = tx.update(grads, tx.init(trainable), trainable)  # stateless chain
      return jax.tree.map(jnp.add, trainable, updates), aux['accuracy']
    return step

  # What local_sgd differentiates with (the platform's rewrite: on CPU xla_cpu.fast_gradients).
  step = make_step(platform.gradient_rewrite())
  rng = jax.random.key(1)
  # Model FLOPs from JAX's own gradient: the CPU rewrite's custom VJP also computes the input
  # gradient of the first trainable layer, which XLA then drops as unused.
  flops = model_flops(make_step(platform.no_rewrite), trainable, frozen, batch, rng)
  lowered = jax.jit(step, donate_argnums=0).lower(trainable, frozen, batch, rng)
  compiled = lowered.compile(options) if options else lowered.compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  mem_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes) if mem is not None else float('nan')
  info = dict(gflops=flops / 1e9, xla_gflops=float((cost or {}).get('flops', 0.0)) / 1e9,
              memory_mb=mem_bytes / 2 ** 20,
              params=partition.count(trainable), frozen_params=partition.count(frozen))
  return compiled, [trainable, frozen, batch, rng], info


def jax_candidate(compiled, args):
  def run():
    args[0], acc = compiled(*args)
    acc.block_until_ready()
  return run


def torch_candidate(head: str, frozen: int, size: int, batch: int, width: float):
  """The same step in torch (channels_last, float32) as the outside reference."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  cin, blocks = 3, []
  for num_convs, cout in zip((2, 2, 3, 3, 3), models.STAGE_CHANNELS):
    block, cout = [], models.scaled(cout, width)
    for _ in range(num_convs):
      block += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
      cin = cout
    blocks.append(nn.Sequential(*block, nn.MaxPool2d(2)))
  if head == 'gap':
    layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 5)]
  else:
    units = models.scaled(models.FC_UNITS, width)
    layers = [nn.Flatten(), nn.Linear(cin * (size // 32) ** 2, units), nn.ReLU(), nn.Dropout(),
              nn.Linear(units, units), nn.ReLU(), nn.Dropout(), nn.Linear(units, 5)]
  net = nn.Sequential(*blocks, *layers).to(memory_format=torch.channels_last)
  for block in blocks[:frozen]:
    block.requires_grad_(False)
  trainable = [p for p in net.parameters() if p.requires_grad]
  opt = torch.optim.SGD(trainable, lr=0.01, weight_decay=1e-3)
  images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
  images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.arange(batch) % 5
  loss_fn = nn.CrossEntropyLoss()

  def run():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(images.float() / 255.0), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 10.0)
    opt.step()

  return run


def device_peak_mb():
  """The device's peak bytes in use (MiB) where the backend reports it (GPU/TPU), else None."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return peak / 2 ** 20 if peak is not None else None


def measure(args, head, frozen, size, dtype, torch_ok):
  """One configuration: every candidate compiled, then timed interleaved."""
  model = models.VGG16(num_classes=5, head=head, width=args.width, dtype=jnp.dtype(dtype))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.integers(0, 256, (args.batch, size, size, 3), np.uint8)),
           'label': jnp.arange(args.batch, dtype=jnp.int32) % 5,
           'mask': jnp.ones(args.batch, jnp.float32)}
  names = ['jax'] + [f'jax[{v}]' for v in args.variants]
  options = [None] + [VARIANTS[v] for v in args.variants]
  candidates, info = {}, None
  for name, opts in zip(names, options):
    compiled, call_args, step_info = compile_step(model, frozen, batch, opts)
    info = info or step_info
    candidates[name] = jax_candidate(compiled, call_args)
  if torch_ok and dtype == 'float32':
    candidates['torch'] = torch_candidate(head, frozen, size, args.batch, args.width)
  # Mixed frameworks: untimed calls each turn absorb the other's spinning threads.
  secs = interleaved(candidates, args.steps, block=2, untimed_s=0.2 if 'torch' in candidates else 0)
  row = dict(head=head, frozen=frozen, size=size, dtype=dtype, batch=args.batch, width=args.width,
             **info, device_peak_mb=device_peak_mb(),
             images_per_s={n: args.batch / s for n, s in secs.items()})
  row['gflop_per_s'] = info['gflops'] / secs['jax']
  for v in args.variants:
    row[f'speedup[{v}]'] = secs['jax'] / secs[f'jax[{v}]']
  if 'torch' in secs:
    row['jax_over_torch'] = secs['torch'] / secs['jax']
    row['best_jax_over_torch'] = secs['torch'] / min(s for n, s in secs.items() if n != 'torch')
  return row


def main(argv=None):
  args = parse_args(argv)
  backend = jax.default_backend()
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    torch_ok = not args.no_torch
  except ImportError:
    torch_ok = False
  n = 2048 if backend == 'cpu' else 8192
  peaks = {d: matmul_peak(jnp.dtype(d), n) for d in args.dtypes}
  print(f'backend={backend} ({jax.devices()[0].device_kind}) devices={jax.device_count()} '
        f'jax={jax.__version__} load={os.getloadavg()[0]:.2f} '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print('measured matmul peak GFLOP/s: ' + ', '.join(f'{d} {p:.0f}' for d, p in peaks.items())
        + (f'; nominal {args.peak_tflops} TFLOP/s' if args.peak_tflops else ''))
  variant_cols = ''.join(f' jax[{v}] speed-up |' for v in args.variants)
  header = (f'| head | frz | px | dtype | GFLOP/img | jax img/s | GFLOP/s | MFU | XLA MB |'
            f'{variant_cols} torch img/s | jax/torch |')
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  rows = []
  for head in args.heads:
    for frozen in args.frozen:
      for size in args.sizes:
        for dtype in args.dtypes:
          r = measure(args, head, frozen, size, dtype, torch_ok)
          r['mfu_measured_peak'] = r['gflop_per_s'] / peaks[dtype]
          if args.peak_tflops and dtype == 'bfloat16':
            r['mfu_nominal_peak'] = r['gflop_per_s'] / (args.peak_tflops * 1e3)
          rows.append(r)
          ips = r['images_per_s']
          variants = ''.join(f' {r[f"speedup[{v}]"]:.2f}x |' for v in args.variants)
          print(f'| {head} | {frozen} | {size} | {dtype} | {r["gflops"] / args.batch:.2f} | '
                f'{ips["jax"]:.1f} | {r["gflop_per_s"]:.0f} | {r["mfu_measured_peak"]:.0%} | '
                f'{r["memory_mb"]:.0f} |{variants} {ips.get("torch", float("nan")):.1f} | '
                f'{r.get("jax_over_torch", float("nan")):.2f} |', flush=True)
  print(json.dumps(dict(bench='step', backend=backend, device=jax.devices()[0].device_kind,
                        jax=jax.__version__, load_avg=os.getloadavg()[0],
                        xla_flags=os.environ.get('XLA_FLAGS', ''),
                        fedblood_xla_flags=flags.applied_flags(),
                        matmul_peak_gflops=peaks, rows=rows)))


if __name__ == '__main__':
  main()
