"""Convolutions in XLA:CPU's canonical layout, so its fast kernels run them inside loops too.

XLA:CPU runs a convolution with its library kernels (Eigen / YNNPACK) only in the canonical
layout: input ``NHWC``, kernel ``HWIO``, output ``NHWC``. Gradients of convolutions come out of
JAX's transpose rules in other layouts (``b01f_01oi->b01f`` for the input gradient,
``f01b_i01o->01bf`` for the kernel gradient); XLA's ConvCanonicalization pass adds the
transposes that fix them, but only in a program's entry computation. Inside a while loop --
every ``lax.fori_loop`` / ``lax.scan`` of local steps -- they stay as they are and fall back to
a naive loop nest: on 2 cores a VGG16 step ran ~25x slower inside a ``fori_loop`` than alone
(jax 0.10.2; jax-ml/jax#12868; docs/performance.md).

:func:`canonical_convs` traces a function and re-emits it with every convolution transposed
into the canonical layout (explicit transposes of its operands and result, as the XLA pass
would add), so the loop body runs the same kernels as a single step. The maths is unchanged;
results agree to float rounding.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

_CONV = core.primitives.conv_general_dilated_p
_INLINED = {core.primitives.jit_p, core.primitives.closed_call_p}


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


def _eval(jaxpr, consts, args):
  """Evaluates ``jaxpr`` on the current trace, re-emitting convolutions canonically."""
  env = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive is _CONV:
      outs = [canonical_conv(*invals, **eqn.params)]
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


def canonical_convs(fn: Callable) -> Callable:
  """``fn`` (positional pytree arguments) with its convolutions in the canonical layout.

  Use it on what runs inside a loop on CPU, e.g. ``canonical_convs(jax.grad(loss))``.
  Convolutions nested in control flow or custom-derivative calls inside ``fn`` are left
  as they are (a gradient has none: they are already differentiated out).
  """
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped
