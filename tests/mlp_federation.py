"""A tiny MLP federation for the round's tests (test_simulate, test_vectorized, test_dp).

A frozen first layer, a trained hidden layer and head, noise drawn from the step rng, on a
few padded centers of different sizes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedblood import algorithms
from fedblood.core import simulate

SIZES = (5, 12, 9)
NMAX, DIM, CLASSES = 16, 6, 3
ALL = np.ones(len(SIZES), bool)
CONFIGS = {
    'fed_dyn': dict(algorithm='fed_dyn', lr=0.1, alpha=0.05, weight_decay=1e-3),
    'fed_avg': dict(algorithm='fed_avg', lr=0.1, server_momentum=0.5),
    'fed_prox': dict(algorithm='fed_prox', lr=0.1, mu=0.1),
    'scaffold': dict(algorithm='scaffold', lr=0.1),
}


def mlp_centers(sizes=SIZES, nmax=NMAX, seed=0):
  rng = np.random.default_rng(seed)
  x = np.zeros((len(sizes), nmax, DIM), np.float32)
  y = np.zeros((len(sizes), nmax), np.int32)
  for k, n in enumerate(sizes):
    x[k, :n] = rng.normal(size=(n, DIM)) + k
    y[k, :n] = rng.integers(0, CLASSES, n)
  return simulate.Centers({'x': jnp.asarray(x), 'y': jnp.asarray(y)},
                          jnp.asarray(sizes, jnp.int32))


def mlp_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  frozen = {'embed': {'kernel': jax.random.normal(k1, (DIM, 8)) / 3}}
  trainable = {'hidden': {'kernel': jax.random.normal(k2, (8, 8)) / 3},
               'head': {'kernel': jax.random.normal(k3, (8, CLASSES)) / 3,
                        'bias': jnp.zeros(CLASSES)}}
  return trainable, frozen


TRACES = []


def mlp_loss(trainable, frozen, batch, rng):
  TRACES.append(1)  # runs at trace time only: counts (re)compilations
  h = jnp.tanh(batch['x'] @ frozen['embed']['kernel'])
  h = jnp.tanh(h @ trainable['hidden']['kernel'])
  h = h * (1 + 0.1 * jax.random.normal(rng, h.shape))  # dropout-like use of the step rng
  logits = h @ trainable['head']['kernel'] + trainable['head']['bias']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])
  mask = batch['mask']
  acc = jnp.sum((jnp.argmax(logits, -1) == batch['y']) * mask) / jnp.sum(mask)
  return jnp.sum(ce * mask) / jnp.sum(mask), {'accuracy': acc}


def cached_round(name, execution, devices=None):
  """One algorithm and round_fn per (name, execution): XLA compiles are the slow part here."""
  return _cached_round(name, execution, devices)


@functools.lru_cache(maxsize=None)
def _cached_round(name, execution, devices):
  alg = algorithms.build(CONFIGS[name])
  return alg, simulate.build_round(alg, mlp_loss, batch_size=4, local_epochs=2,
                                   execution=execution, devices=devices)


def run_rounds(name, execution, rounds=3, centers=None, actives=None, frozen=None, devices=None):
  alg, round_fn = cached_round(name, execution, devices)
  trainable, frozen0 = mlp_params()
  frozen = frozen0 if frozen is None else frozen
  centers = mlp_centers() if centers is None else centers
  server, clients = alg.init(trainable, len(centers.sizes))
  history = []
  for r in range(rounds):
    active = ALL if actives is None else actives[r]
    server, clients, metrics = round_fn(server, clients, frozen, centers, active,
                                        jax.random.key(42), r)
    history.append(metrics)
  return alg, server, clients, history


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)
