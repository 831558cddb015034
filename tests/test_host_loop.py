"""The 'host' execution: local steps as a host loop of one jitted step, same results as 'loop'."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedblood import simulate
from fedblood.algorithms import base

SIZES = (5, 12, 9)
NMAX, DIM, CLASSES = 16, 6, 3


def _centers():
  rng = np.random.default_rng(0)
  x = np.zeros((len(SIZES), NMAX, DIM), np.float32)
  y = np.zeros((len(SIZES), NMAX), np.int32)
  for k, n in enumerate(SIZES):
    x[k, :n] = rng.normal(size=(n, DIM)) + k
    y[k, :n] = rng.integers(0, CLASSES, n)
  return simulate.Centers({'x': jnp.asarray(x), 'y': jnp.asarray(y)},
                          jnp.asarray(SIZES, jnp.int32))


def _params():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  frozen = {'embed': jax.random.normal(k1, (DIM, 8)) / 3}
  trainable = {'hidden': jax.random.normal(k2, (8, 8)) / 3,
               'head': jax.random.normal(k3, (8, CLASSES)) / 3}
  return trainable, frozen


def _loss(trainable, frozen, batch, rng):
  h = jnp.tanh(jnp.tanh(batch['x'] @ frozen['embed']) @ trainable['hidden'])
  h = h * (1 + 0.1 * jax.random.normal(rng, h.shape))  # uses the step rng, like dropout
  logits = h @ trainable['head']
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch['y'][:, None], 1)[:, 0]
  mask = batch['mask']
  return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1.0), {}


def _body_closing_over(scale):
  def body(i, carry):
    x, total = carry
    return x * 0.5 + scale * i, total + jnp.sum(x)
  return body


def test_host_fori_loop_matches_lax_fori_loop_and_reuses_its_step():
  start = (jnp.ones(4), jnp.float32(0))
  # A closed-over array is lifted out of the step as an argument, not baked in as a constant:
  # new values of the same shape reuse the compiled step.
  for n, scale in ((7, jnp.arange(4.0)), (3, jnp.full(4, 3.0, jnp.float32))):
    body = _body_closing_over(scale)
    got = base.host_fori_loop(n, body, start)
    if n == 7:
      compiled = len(base._HOST_STEPS)  # pylint: disable=protected-access
    for w, g in zip(jax.lax.fori_loop(0, n, body, start), got):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
  assert len(base._HOST_STEPS) == compiled  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(got[0]), [7.625] * 4)  # 1 -> 0.5 -> 3.25 -> 7.625


@pytest.mark.parametrize('algorithm', ['fed_dyn', 'scaffold', 'fed_prox'])
def test_host_round_equals_loop_round(algorithm):
  results = {}
  for execution in ('loop', 'host'):
    cfg = ml_collections.ConfigDict(dict(algorithm=algorithm, lr=0.1, alpha=0.05, mu=0.1,
                                         weight_decay=1e-3, batch_size=4, local_epochs=2,
                                         execution=execution))
    algo, round_fn = simulate.build(cfg, _loss)
    trainable, frozen = _params()
    server, clients = algo.init(trainable, len(SIZES))
    active = jnp.asarray([True, False, True])  # an inactive center keeps its state
    for r in (1, 2):
      server, clients, metrics = round_fn(server, clients, frozen, _centers(), active,
                                          jax.random.key(3), jnp.int32(r))
    results[execution] = (server, clients, metrics)
  for want, got in zip(jax.tree.leaves(results['loop']), jax.tree.leaves(results['host'])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert list(np.asarray(results['host'][2]['num_steps'])) == [4, 0, 6]  # 2 epochs of ceil(n/4)
