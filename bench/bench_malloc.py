"""glibc malloc's thresholds as ``import fedblood`` sets them, against glibc's defaults.

Usage (prints a table, then one JSON line; --out also writes the JSON)::

  python bench/bench_malloc.py          # configs/wbc.py's model: VGG16 gap, width 1/8, 64 px
  python bench/bench_malloc.py --tiny   # smoke check: 32 px, width 1/16, a few calls
  python bench/bench_malloc.py --workloads 'step frozen 0'   # one workload

XLA:CPU allocates each program's buffers with malloc. With glibc's defaults a block over the
dynamic mmap threshold (at most 32 MiB) is mapped afresh, and freed memory at the top of the heap
is given back to the kernel, so every call of a program with buffers of a few MiB maps and
zero-fills them again (page faults, kernel time). ``import fedblood`` fixes the thresholds above
such buffers (``fedblood.backend.flags.tune_malloc``); ``FEDBLOOD_MALLOC=0`` leaves the defaults.

Three workloads of the CPU study, each timed in child processes, ``tuned`` (fedblood's settings)
and ``default`` (``FEDBLOOD_MALLOC=0``) ALTERNATING (tuned, default, tuned, default, ...), so
the load of a shared machine hits both alike; per workload the median seconds per call over
every child's calls, and per child the median page faults of a call and the kernel's share of
its CPU time:

- ``step frozen 0``: one local SGD step (batch 32) that trains every block: the reference fit's,
  the scratch baselines';
- ``step frozen 3``: the same with blocks 1-3 frozen: FL's local step, the from-reference fits';
- ``eval tta``: a chunk of 128 images under test-time averaging (1024 views): validation.

Malloc's settings move where buffers live, not what is computed: both give the same numbers
(checked here: each child's losses).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repository's fedblood

# Importing fedblood (bench_step does) applies its settings, malloc's unless FEDBLOOD_MALLOC=0.
import bench_step  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
# pylint: disable=g-import-not-at-top,wrong-import-position
from fedblood.backend import flags  # noqa: E402
from fedblood.model import classifier, models, partition  # noqa: E402

WORKLOADS = ('step frozen 0', 'step frozen 3', 'eval tta')
VARIANTS = {'tuned': {}, 'default': {'FEDBLOOD_MALLOC': '0'}}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true', help='32 px, width 1/16, a few calls')
  parser.add_argument('--calls', type=int, default=60, help='timed calls per child')
  parser.add_argument('--children', type=int, default=3, help='child processes per variant')
  parser.add_argument('--workloads', default=','.join(WORKLOADS),
                      help=f'comma-separated, of {WORKLOADS}')
  parser.add_argument('--out', default=None, help='also write the JSON line here')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.workloads = [w for w in args.workloads.split(',') if w]
  unknown = set(args.workloads) - set(WORKLOADS)
  if unknown:
    parser.error(f'--workloads: unknown {sorted(unknown)}; known: {WORKLOADS}')
  if args.tiny:
    args.calls, args.children = 10, 1
  return args


def workload(name: str, tiny: bool):
  """``(fn, check)``: one blocking call of the workload, and a number it computes."""
  size, width = (32, 1 / 16) if tiny else (64, 1 / 8)
  rng = np.random.default_rng(0)
  if name.startswith('step'):
    model = models.VGG16(num_classes=5, head='gap', width=width)
    batch = bench_step.random_batch(rng, size)
    compiled, args, _ = bench_step.compile_step(model, int(name.split()[-1]), batch)
    out = {}

    def step():
      args[0], out['acc'] = compiled(*args)
      out['acc'].block_until_ready()
    return step, lambda: float(jax.tree.leaves(args[0])[0].sum())
  model = models.VGG16(num_classes=5, head='gap', width=width, tta=True)  # 8 views an image
  params = bench_step.he_init(model, size)
  trainable, frozen = partition.split(params, partition.frozen_block_rules(3))
  predict = classifier.make_predict(model, 128)
  images = jnp.asarray(rng.integers(0, 256, (128, size, size, 3), np.uint8))
  out = {}

  def evaluate():
    out['logits'] = predict(trainable, frozen, images)
    out['logits'].block_until_ready()
  return evaluate, lambda: float(out['logits'].sum())


def child(name: str, calls: int, tiny: bool) -> dict:
  """Runs in a child process: seconds per call, page faults and kernel share of ``calls``."""
  fn, check = workload(name, tiny)
  for _ in range(3):  # compiled, and the heap grown to its working size
    fn()
  before, times, faults = resource.getrusage(resource.RUSAGE_SELF), [], []
  for _ in range(calls):
    start, start_faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
  after = resource.getrusage(resource.RUSAGE_SELF)
  user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
  return dict(times=times, faults_per_call=float(np.median(faults)),
              sys_share=system / max(user + system, 1e-9), check=check(),
              malloc=flags.applied_malloc())


def child_env(environ, variant: str) -> dict:
  """``environ`` as a ``variant`` child gets it: without the user's malloc thresholds
  (``MALLOC_*_`` and ``GLIBC_TUNABLES``' malloc entries), with which fedblood sets none."""
  env = {k: v for k, v in environ.items()
         if k != flags.MALLOC_ENV and k not in flags.USER_MALLOC_ENV}
  tunables = ':'.join(t for t in env.pop('GLIBC_TUNABLES', '').split(':')
                      if t and not t.startswith(flags._TUNABLES))  # pylint: disable=protected-access
  return {**env, **({'GLIBC_TUNABLES': tunables} if tunables else {}), **VARIANTS[variant]}


def run_child(name: str, variant: str, args) -> dict:
  cmd = [sys.executable, __file__, '--child', name, '--calls', str(args.calls)]
  out = subprocess.run(cmd + ['--tiny'] * args.tiny, env=child_env(os.environ, variant),
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    print(json.dumps(child(args.child, args.calls, args.tiny)))
    return None
  if flags._glibc() is None:  # pylint: disable=protected-access
    raise SystemExit('bench_malloc: this Python\'s C library is not glibc (macOS, musl...): '
                     'fedblood leaves malloc as it is there, so there is nothing to compare')
  rows = []
  print('| workload | default s | tuned s | default / tuned | faults per call (default, tuned) '
        '| kernel share of CPU (default, tuned) | same numbers |')
  print('|---|---|---|---|---|---|---|')
  for name in args.workloads:
    runs = {v: [] for v in VARIANTS}
    for _ in range(args.children):
      for variant in VARIANTS:  # alternating children
        runs[variant].append(run_child(name, variant, args))
    assert runs['tuned'][0]['malloc'] and not runs['default'][0]['malloc'], runs
    sec = {v: float(np.median([t for r in rs for t in r['times']])) for v, rs in runs.items()}
    faults = {v: float(np.median([r['faults_per_call'] for r in rs])) for v, rs in runs.items()}
    share = {v: float(np.median([r['sys_share'] for r in rs])) for v, rs in runs.items()}
    same = len({r['check'] for rs in runs.values() for r in rs}) == 1
    row = dict(workload=name, seconds=sec, ratio=sec['default'] / sec['tuned'],
               faults_per_call=faults, sys_share=share, same_numbers=same)
    rows.append(row)
    print(f"| {name} | {sec['default']:.4f} | {sec['tuned']:.4f} | {row['ratio']:.2f}x | "
          f"{faults['default']:.0f}, {faults['tuned']:.0f} | "
          f"{share['default']:.0%}, {share['tuned']:.0%} | {'yes' if same else 'NO'} |")
  record = dict(bench='malloc', tiny=args.tiny, calls=args.calls, children=args.children,
                cpu_count=os.cpu_count(), rows=rows)
  bench_step.emit_record(record, args.out)
  return record


if __name__ == '__main__':
  main()
