"""Per-backend choices made once: XLA flags before JAX starts, and the compute dtype.

Usage::

  import fedblood                           # applies the XLA flags (fedblood.backend.flags)
  from fedblood.backend import platform
  dtype = platform.compute_dtype('auto')    # bfloat16 on GPU/TPU, float32 on CPU
  rewrite = platform.gradient_rewrite()     # CPU: xla_cpu.fast_gradients; else no rewrite

Backend workarounds are decided here and handed to the code that needs them as parameters
(``rewrite`` of the algorithm builders and ``base.local_sgd``, ``compiler_options`` of
``simulate.build_round``), so a benchmark switches one off by passing another value.

The measurements behind each choice are in docs/performance.md.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fedblood.backend import xla_cpu

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


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
