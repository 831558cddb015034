"""Gradients re-emitted in the forms XLA:CPU runs fast, inside loops too (jax 0.10.2).

Two slow paths of XLA:CPU hit every local step of a VGG (measured on 2 cores, see
docs/performance.md):

* Convolutions run on its library kernels (Eigen / YNNPACK) only in the canonical layout:
  input ``NHWC``, kernel ``HWIO``, output ``NHWC``. Gradients of convolutions come out of JAX's
  transpose rules in other layouts (``b01f_01oi->b01f`` for the input gradient,
  ``f01b_i01o->01bf`` for the kernel gradient). XLA's ConvCanonicalization pass adds the
  transposes that fix them, but only in a program's entry computation: inside a while loop
  -- every ``lax.fori_loop`` of local steps -- they fall back to a naive loop nest, and a
  VGG16 step runs many times slower than alone (jax-ml/jax#12868; docs/performance.md).
* The gradient of a max-pool is a ``select_and_scatter_add``, which XLA:CPU runs as a serial
  loop nest, several times slower than torch's for VGG's 2x2 pools (docs/performance.md).

:func:`fast_gradients` traces a function and re-emits it with every convolution transposed
into the canonical layout (explicit transposes of its operands and result, as the XLA pass
would add), and every non-overlapping max-pool gradient as a dense first-argmax mask (the
element XLA's ``select`` keeps: the first maximum of the window in row-major order). Same
maths: results agree with XLA's own to float rounding.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

_CONV = lax.conv_general_dilated_p
_POOL_GRAD = lax.select_and_scatter_add_p
# Call primitives whose bodies are re-emitted inline (names differ across JAX versions).
_INLINED = {p for p in (getattr(core.primitives, name, None)
                        for name in ('jit_p', 'pjit_p', 'closed_call_p')) if p is not None}


def canonical_dimension_numbers(num_spatial: int) -> lax.ConvDimensionNumbers:
  """NHWC / HWIO / NHWC (for any number of spatial dimensions)."""
  n = num_spatial
  feature_last = (0, n + 1, *range(1, n + 1))
  return lax.ConvDimensionNumbers(lhs_spec=feature_last, rhs_spec=(n + 1, n, *range(n)),
                                  out_spec=feature_last)


def canonical_conv(lhs, rhs, *, dimension_numbers, **params):
  """``conv_general_dilated_p`` in the canonical layout, same result as the original layout."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  canonical = canonical_dimension_numbers(len(lhs_spec) - 2)
  if tuple(dimension_numbers) == tuple(canonical):
    return _CONV.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
  # Spatial dimensions keep their order, so strides, padding and dilations stay valid; batch
  # and feature keep their roles, so feature/batch group counts do too.
  lhs = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  rhs = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  out = _CONV.bind(lhs, rhs, dimension_numbers=canonical, **params)
  return jnp.transpose(out, np.argsort((out_spec[0], *out_spec[2:], out_spec[1])))


def pool_gradient(source, operand, *, select_prim, window_dimensions, window_strides, padding):
  """``select_and_scatter_add_p`` (a max-pool's gradient); dense when windows do not overlap.

  Scatters ``source`` (one value per window) onto the first maximum of each window of
  ``operand``; other cases (overlapping or padded windows, min-pools) are bound as they are.
  """
  shape, dims = operand.shape, tuple(window_dimensions)
  dense = (select_prim is lax.ge_p and dims == tuple(window_strides)
           and all(tuple(p) == (0, 0) for p in padding)
           and all(s % d == 0 for s, d in zip(shape, dims)))
  if not dense:
    return _POOL_GRAD.bind(source, operand, select_prim=select_prim,
                           window_dimensions=window_dimensions, window_strides=window_strides,
                           padding=padding)
  rank, outer = len(shape), tuple(s // d for s, d in zip(shape, dims))
  # [n0*d0, n1*d1, ...] -> [n0, n1, ..., d0*d1*...]: each window's elements in row-major order.
  split = [x for n, d in zip(outer, dims) for x in (n, d)]
  to_windows = [*range(0, 2 * rank, 2), *range(1, 2 * rank, 2)]
  windows = jnp.transpose(operand.reshape(split), to_windows).reshape(outer + (-1,))
  first_max = jnp.argmax(windows, axis=-1)[..., None]
  out = jnp.where(jnp.arange(windows.shape[-1]) == first_max, source[..., None],
                  jnp.zeros((), source.dtype))
  return jnp.transpose(out.reshape(outer + dims), np.argsort(to_windows)).reshape(shape)


_REWRITES = {_CONV: canonical_conv, _POOL_GRAD: pool_gradient}


def _eval(jaxpr, consts, args):
  """Evaluates ``jaxpr`` on the current trace with :data:`_REWRITES` applied."""
  env = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive in _REWRITES:
      outs = [_REWRITES[eqn.primitive](*invals, **eqn.params)]
    elif eqn.primitive in _INLINED:
      closed = eqn.params.get('jaxpr') or eqn.params['call_jaxpr']
      closed = closed if hasattr(closed, 'consts') else core.ClosedJaxpr(closed, ())
      outs = _eval(closed.jaxpr, closed.consts, invals)
    else:
      bind_params = eqn.primitive.get_bind_params(eqn.params)
      # Older JAX returned (subfuns, params), newer the params alone (as jax.core.eval_jaxpr).
      subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, core.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def fast_gradients(fn: Callable) -> Callable:
  """``fn`` (positional pytree arguments) re-emitted with the rewrites above.

  Use it on what runs inside a loop on CPU, e.g. ``fast_gradients(jax.grad(loss))``.
  Operations nested in control flow or custom-derivative calls inside ``fn`` are left as
  they are (a gradient has none around its convolutions and pools: they are differentiated out).
  """
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped
