"""The vectorized sweep round: each point equals its own run of simulate's round.

Tiny MLP of mlp_federation.py (frozen first layer, noise from the step rng), 3 centers of
different sizes, 3 sweep points with their own params, keys and participation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedblood import algorithms
from fedblood.core import vectorized
from mlp_federation import ALL, CONFIGS, cached_round, mlp_centers, mlp_loss, mlp_params

# Float tolerance of a point against its own run (batching changes the rounding).
RTOL, ATOL = 1e-5, 1e-6
K = 3
ACTIVES = [np.stack([ALL, [True, False, True], [False, True, True]]),
           np.stack([[True, True, False], ALL, [False, False, True]]),
           np.stack([ALL, ALL, ALL])]


@functools.lru_cache(maxsize=None)
def sweep_round(name, execution):
  alg = algorithms.build(CONFIGS[name])
  return alg, vectorized.build_sweep_round(alg, mlp_loss, batch_size=4, local_epochs=2,
                                           execution=execution)


def points():
  """K (trainable, frozen, key) triples: every point starts elsewhere and draws its own keys."""
  return [(*mlp_params(seed=i), jax.random.key(100 + i)) for i in range(K)]


def separate_runs(name):
  """Each point alone through simulate's 'vmap' round: ``[(server, clients, [metrics])]``."""
  alg, round_fn = cached_round(name, 'vmap')
  out = []
  for i, (trainable, frozen, key) in enumerate(points()):
    server, clients = alg.init(trainable, 3)
    history = []
    for r, active in enumerate(ACTIVES):
      server, clients, metrics = round_fn(server, clients, frozen, mlp_centers(), active[i], key,
                                          r)
      history.append(metrics)
    out.append((server, clients, history))
  return out


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize('name,execution', [('fed_dyn', 'auto'), ('scaffold', 'vmap')])
def test_each_sweep_point_equals_its_own_run(name, execution):
  want = separate_runs(name)
  alg, round_fn = sweep_round(name, execution)
  pts = points()
  states = [alg.init(t, 3) for t, _, _ in pts]
  server = vectorized.stack([s for s, _ in states])
  clients = vectorized.stack([c for _, c in states])
  frozen = vectorized.stack([f for _, f, _ in pts])
  keys = jnp.stack([k for _, _, k in pts])
  history = []
  for r, active in enumerate(ACTIVES):
    server, clients, metrics = round_fn(server, clients, frozen, mlp_centers(), active, keys, r)
    history.append(metrics)
  want_execution = 'loop' if execution == 'auto' else execution
  assert round_fn.resolved(mlp_centers()).execution == want_execution
  for i, (w_server, w_clients, w_history) in enumerate(want):
    got = (vectorized.unstack(server, K)[i], vectorized.unstack(clients, K)[i],
           [vectorized.unstack(m, K)[i] for m in history])
    diff = max_diff(got, (w_server, w_clients, w_history))
    print(f'{name} {execution} point {i}: max |diff| {diff:.2e}')
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), got,
                 (w_server, w_clients, w_history))
    # Participation is the point's own: inactive centers' metrics are zero, steps exact.
    for r, active in enumerate(ACTIVES):
      np.testing.assert_array_equal(got[2][r]['num_steps'], np.where(active[i], [4, 6, 6], 0))
  # The points really differ (different starts and keys), so equality above is not trivial.
  assert max_diff(vectorized.unstack(server, K)[0], vectorized.unstack(server, K)[1]) > 1e-2


def test_stack_unstack_roundtrip_and_bad_inputs():
  trees = [{'a': jnp.full((2,), i), 'b': (jnp.float32(i),)} for i in range(3)]
  stacked = vectorized.stack(trees)
  assert stacked['a'].shape == (3, 2) and stacked['b'][0].shape == (3,)
  for got, want in zip(vectorized.unstack(stacked, 3), trees):
    jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(ValueError, match='fl.execution must be one of'):
    vectorized.build_sweep_round(algorithms.build(CONFIGS['fed_avg']), mlp_loss, batch_size=4,
                                 local_epochs=1, execution='shard')
  alg, round_fn = sweep_round('fed_avg', 'loop')
  server, clients = alg.init(mlp_params()[0], 3)
  with pytest.raises(ValueError, match=r'active must be bool \[K, C=3\]'):
    round_fn(server, clients, mlp_params()[1], mlp_centers(), ALL, jax.random.key(0), 0)
