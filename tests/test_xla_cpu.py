"""Tests for fedblood.backend.xla_cpu: same values, fast forms of gradients inside loops."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedblood.backend import xla_cpu

CANONICAL = 'b01f_01io->b01f'


def all_canonical(labels):
  """Batch first, feature last; kernel spatial, in, out (any number of spatial dims)."""
  return labels and all(re.fullmatch(r'b(\d+)f_\1io->b\1f', l) for l in labels)


def conv_labels(fn, *args):
  """The set of XLA ``dim_labels`` of the convolutions in ``fn``'s compiled program."""
  return set(re.findall(r'dim_labels=([^ ,}]+)', jax.jit(fn).lower(*args).compile().as_text()))


def rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize('lhs_shape,rhs_shape,dims,kwargs', [
    ((2, 9, 9, 4), (3, 3, 4, 6), ('NHWC', 'HWIO', 'NHWC'), {}),
    ((2, 4, 9, 9), (6, 4, 3, 3), ('NCHW', 'OIHW', 'NCHW'), dict(window_strides=(2, 1))),
    ((9, 2, 9, 4), (4, 6, 3, 3), ('HNWC', 'IOHW', 'CHWN'), dict(rhs_dilation=(2, 1))),
    ((2, 9, 9, 4), (3, 3, 2, 6), ('NHWC', 'HWIO', 'NHWC'), dict(feature_group_count=2)),
    ((4, 9, 9, 3), (3, 3, 3, 6), ('NHWC', 'HWIO', 'NHWC'), dict(batch_group_count=2)),
    ((2, 9, 5), (3, 5, 7), ('NWC', 'WIO', 'NCW'), dict(padding='VALID')),
])
def test_canonical_conv_equals_lax_conv(lhs_shape, rhs_shape, dims, kwargs):
  lhs, rhs = rand(lhs_shape, 0), rand(rhs_shape, 1)
  kwargs = dict(dict(window_strides=(1,) * (len(lhs_shape) - 2), padding='SAME'), **kwargs)
  conv = lambda f: lambda x, w: f(x, w, dimension_numbers=dims, **kwargs)
  want = conv(lax.conv_general_dilated)(lhs, rhs)
  rewritten = xla_cpu.fast_gradients(conv(lax.conv_general_dilated))
  np.testing.assert_allclose(rewritten(lhs, rhs), want, rtol=1e-5, atol=1e-5)
  assert all_canonical(conv_labels(rewritten, lhs, rhs))


def two_convs(params, x):
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  h = max_pool(jax.nn.relu(conv(x, params['w1'])))
  h = jax.jit(lambda h, w: jnp.tanh(conv(h, w)))(h, params['w2'])  # a nested jit is inlined
  return jnp.mean(h ** 2), {'mean': jnp.mean(h)}


PARAMS = {'w1': rand((3, 3, 3, 4), 2) / 3, 'w2': rand((3, 3, 4, 4), 3) / 3}
X = rand((2, 8, 8, 3), 4)


def test_gradient_values_and_pytrees_are_unchanged():
  grad_fn = jax.grad(two_convs, has_aux=True)
  want = grad_fn(PARAMS, X)
  got = jax.jit(xla_cpu.fast_gradients(grad_fn))(PARAMS, X)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_under_vmap_too():
  grad_fn = jax.grad(two_convs, has_aux=True)
  stacked = jax.tree.map(lambda w: jnp.stack([w, -w]), PARAMS)
  want = jax.vmap(grad_fn, in_axes=(0, None))(stacked, X)
  got = jax.jit(jax.vmap(xla_cpu.fast_gradients(grad_fn), in_axes=(0, None)))(stacked, X)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_a_loop_of_gradient_steps_has_only_canonical_convolutions():
  """What XLA:CPU needs to run the loop body's convolutions with its library kernels."""
  def train(grad_fn):
    def run(params, x):
      step = lambda i, p: jax.tree.map(lambda w, g: w - 0.1 * g, p, grad_fn(p, x)[0])
      return lax.fori_loop(0, 3, step, params)
    return run

  plain = jax.grad(two_convs, has_aux=True)
  assert conv_labels(train(xla_cpu.fast_gradients(plain)), PARAMS, X) == {CANONICAL}
  # jax 0.10.2: the plain loop keeps 'b01f_01oi->b01f' and 'f01b_i01o->01bf' (naive kernels)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.jit(train(xla_cpu.fast_gradients(plain)))(PARAMS, X),
               jax.jit(train(plain))(PARAMS, X))


def max_pool(x, window=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding='VALID'):
  return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)


@pytest.mark.parametrize('shape,window,strides,padding', [
    ((2, 8, 8, 3), (1, 2, 2, 1), (1, 2, 2, 1), 'VALID'),    # VGG's pools: dense form
    ((2, 9, 6, 3), (1, 3, 2, 1), (1, 3, 2, 1), 'VALID'),    # other non-overlapping windows
    ((2, 8, 8, 3), (1, 3, 3, 1), (1, 2, 2, 1), 'VALID'),    # overlapping: XLA's own
    ((2, 7, 7, 3), (1, 2, 2, 1), (1, 2, 2, 1), 'SAME'),     # padded: XLA's own
])
def test_pool_gradient_equals_xla_even_with_ties(shape, window, strides, padding):
  # Few distinct values: most windows hold tied maxima, and the first one gets the gradient.
  x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape), jnp.float32)
  weights = rand(max_pool(x, window, strides, padding).shape, 1)
  grad = jax.grad(lambda x: jnp.sum(max_pool(x, window, strides, padding) * weights))
  np.testing.assert_array_equal(jax.jit(xla_cpu.fast_gradients(grad))(x), jax.jit(grad)(x))


def test_dense_pool_gradient_has_no_scatter():
  """XLA:CPU lowers select-and-scatter to a serial scatter; the dense form has none."""
  x = rand((2, 8, 8, 3), 0)
  grad = jax.grad(lambda x: jnp.sum(max_pool(x) ** 2))
  scatters = lambda f: re.findall(r'= \S+ (?:select-and-)?scatter\(',
                                  jax.jit(f).lower(x).compile().as_text())
  assert scatters(grad)
  assert not scatters(xla_cpu.fast_gradients(grad))
