"""Per-backend choices made once: XLA flags before JAX starts, and the compute dtype.

Usage::

  import fedblood                           # applies the XLA flags (before any JAX computation)
  from fedblood import platform
  dtype = platform.compute_dtype('auto')    # bfloat16 on GPU/TPU, float32 on CPU

The measurements behind each choice are in docs/performance.md.
"""

import os
from typing import Optional

import jax
import jax.numpy as jnp

# XLA flags fedblood adds on every backend, each only when the user's XLA_FLAGS does not set
# that flag (importing fedblood applies them: fedblood/__init__.py). Measured on 2 AMD EPYC
# cores, jax 0.10.2, in one process (bench/bench_round.py --xla_options, docs/performance.md):
# YNN's 'dot' fusion instead of XLA:CPU's default YNN convolutions ran the CPU study's FL round
# 1.1-1.3x faster and VGG16 steps 1.0-1.4x faster (64-224 px, widths 0.25-1), never slower.
# A CPU-compiler flag: GPU and TPU programs are unaffected.
XLA_FLAGS: tuple = ('--xla_cpu_experimental_ynn_fusion_type=dot',)

_APPLIED: list = []
OFF_ENV = 'FEDBLOOD_XLA_FLAGS'  # '0': importing fedblood adds no XLA flag

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def apply_xla_flags(flags=None, environ=None) -> list:
  """Adds ``flags`` (default :data:`XLA_FLAGS`) to ``XLA_FLAGS``, never overriding the user's.

  XLA reads ``XLA_FLAGS`` once, when JAX first initialises a backend: call this before any
  JAX computation. A flag whose name the user already set is left alone.

  ``FEDBLOOD_XLA_FLAGS=0`` in the environment adds none (a second numerics path, see
  :mod:`fedblood.numerics`).

  Returns:
    The flags added.
  """
  flags = XLA_FLAGS if flags is None else flags
  environ = os.environ if environ is None else environ
  if environ.get(OFF_ENV) == '0':
    return []
  current = environ.get('XLA_FLAGS', '')
  present = {f.split('=')[0] for f in current.split()}
  added = [f for f in flags if f.split('=')[0] not in present]
  if added:
    environ['XLA_FLAGS'] = ' '.join([current] * bool(current) + added)
    if environ is os.environ:
      _APPLIED.extend(added)
  return added


def applied_flags() -> list:
  """The flags :func:`apply_xla_flags` added to this process's ``XLA_FLAGS``."""
  return list(_APPLIED)


def is_accelerator(backend: Optional[str] = None) -> bool:
  """Whether ``backend`` (default: JAX's default backend) is a GPU or TPU."""
  return (backend or jax.default_backend()) in ('gpu', 'cuda', 'rocm', 'tpu')


def compute_dtype(name: str = 'auto', backend: Optional[str] = None) -> jnp.dtype:
  """The model's computation dtype from a config value (``model.dtype``).

  ``'auto'`` is bfloat16 on GPU/TPU (their matrix units' native format; the params stay
  float32 master weights, see :class:`fedblood.models.VGG`) and float32 on CPU, where XLA
  ran bfloat16 VGG16 steps no faster than float32 ones (docs/performance.md).
  """
  if name not in DTYPES:
    raise ValueError(f'model.dtype must be one of {DTYPES}, got {name!r}')
  if name == 'auto':
    return jnp.dtype(jnp.bfloat16 if is_accelerator(backend) else jnp.float32)
  return jnp.dtype(name)
