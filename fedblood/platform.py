"""Per-backend choices made once: XLA flags before JAX starts, and the compute dtype.

Usage::

  from fedblood import platform
  platform.apply_xla_flags()          # before the first JAX computation (launch.py, bench/)
  dtype = platform.compute_dtype('auto')   # bfloat16 on GPU/TPU, float32 on CPU

The measurements behind each choice are in docs/performance.md.
"""

import os
from typing import Optional

import jax
import jax.numpy as jnp

# XLA flags fedblood adds on every backend, each only when the user's XLA_FLAGS does not set
# that flag. Empty by measurement: on 2 AMD EPYC cores (jax 0.10.2) the one candidate,
# --xla_cpu_experimental_ynn_fusion_type=dot, did not speed up VGG16 steps or rounds.
XLA_FLAGS: tuple = ()

_APPLIED: list = []

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def apply_xla_flags(flags=None, environ=None) -> list:
  """Adds ``flags`` (default :data:`XLA_FLAGS`) to ``XLA_FLAGS``, never overriding the user's.

  XLA reads ``XLA_FLAGS`` once, when JAX first initialises a backend: call this before any
  JAX computation. A flag whose name the user already set is left alone.

  Returns:
    The flags added.
  """
  flags = XLA_FLAGS if flags is None else flags
  environ = os.environ if environ is None else environ
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
  computes bfloat16 convolutions slower than float32 ones (docs/performance.md).
  """
  if name not in DTYPES:
    raise ValueError(f'model.dtype must be one of {DTYPES}, got {name!r}')
  if name == 'auto':
    return jnp.dtype(jnp.bfloat16 if is_accelerator(backend) else jnp.float32)
  return jnp.dtype(name)
