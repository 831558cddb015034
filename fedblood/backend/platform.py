"""Per-backend choices made once: XLA flags before JAX starts, and the compute dtype.

Usage::

  import fedblood                           # applies the XLA flags (before any JAX computation)
  from fedblood.backend import platform
  dtype = platform.compute_dtype('auto')    # bfloat16 on GPU/TPU, float32 on CPU
  rewrite = platform.gradient_rewrite()     # CPU: xla_cpu.fast_gradients; else no rewrite

Backend workarounds are decided here and handed to the code that needs them as parameters
(``rewrite`` of the algorithm builders and ``base.local_sgd``, ``compiler_options`` of
``simulate.build_round``), so a benchmark switches one off by passing another value.

The measurements behind each choice are in docs/performance.md.
"""

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fedblood.backend import xla_cpu

# XLA flags fedblood adds on every backend, each only when the user's XLA_FLAGS does not set
# that flag (importing fedblood applies them: fedblood/__init__.py). YNN's 'dot' fusion instead
# of XLA:CPU's default YNN convolutions: faster FL rounds and VGG16 steps, never slower where
# measured (bench/bench_round.py --xla_options; the numbers are in docs/performance.md).
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
  :mod:`fedblood.backend.numerics`).

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
  float32 master weights, see :class:`fedblood.model.models.VGG`) and float32 on CPU, where XLA
  ran bfloat16 VGG16 steps no faster than float32 ones (docs/performance.md).
  """
  if name not in DTYPES:
    raise ValueError(f'model.dtype must be one of {DTYPES}, got {name!r}')
  if name == 'auto':
    return jnp.dtype(jnp.bfloat16 if is_accelerator(backend) else jnp.float32)
  return jnp.dtype(name)


def no_rewrite(grad_fn: Callable) -> Callable:
  """The gradient as JAX emits it (the ``rewrite`` that switches the CPU workaround off)."""
  return grad_fn


def gradient_rewrite(backend: Optional[str] = None) -> Callable:
  """How local training re-emits its gradients on ``backend`` (default: JAX's default backend).

  CPU: :func:`fedblood.backend.xla_cpu.fast_gradients`. Inside the ``fori_loop`` of local
  steps XLA:CPU would run convolution gradients as naive loops and max-pool gradients
  serially (docs/performance.md). Other backends: :func:`no_rewrite`.
  """
  return xla_cpu.fast_gradients if (backend or jax.default_backend()) == 'cpu' else no_rewrite
