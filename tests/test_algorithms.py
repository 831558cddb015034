"""Exact properties of the federated algorithms on tiny convex problems (no simulate, no model).

The clients here are plain least-squares problems over a bare array of params,
driven through the FedAlgorithm functions directly (the "ten-line script" use).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedblood import algorithms
from fedblood.algorithms import base
from fedblood.algorithms import swa as swa_lib
from fedblood.study import driver

SIZES = np.array([33, 60, 120, 250, 400])
DIM = 5


def least_squares(sizes=SIZES, dim=DIM, seed=0):
  """Clients of very different optima and sizes, padded to the largest; and the weighted optimum."""
  rng = np.random.default_rng(seed)
  num, nmax = len(sizes), max(sizes)
  x = np.zeros((num, nmax, dim), np.float32)
  y = np.zeros((num, nmax), np.float32)
  mask = np.zeros((num, nmax), np.float32)
  for k, n in enumerate(sizes):
    w_k = rng.normal(size=dim) * 2  # client k's own optimum
    x[k, :n] = rng.normal(size=(n, dim))
    y[k, :n] = x[k, :n] @ w_k + 0.5 * rng.normal(size=n)
    mask[k, :n] = 1
  # Minimiser of sum_k n_k L_k (L_k the mean squared error of client k) = pooled least squares.
  xs, ys = x.astype(np.float64), y.astype(np.float64)
  optimum = np.linalg.solve(np.einsum('kni,knj->ij', xs, xs), np.einsum('kni,kn->i', xs, ys))
  return (jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)), optimum


def mse(params, batch, rng):
  del rng
  x, y, mask = batch
  return 0.5 * jnp.sum(mask * (x @ params - y) ** 2) / jnp.sum(mask), {}


def run(alg, data, sizes, num_rounds, local_steps, participation=1.0, dim=DIM):
  """``num_rounds`` rounds of full-batch local steps; returns (server_state, client_states)."""
  weights = algorithms.client_weights(sizes)
  num = len(sizes)

  def one_round(r, state):
    server, clients = state
    if participation < 1:
      active = jax.random.bernoulli(jax.random.fold_in(jax.random.key(1), r), participation, (num,))
    else:
      active = jnp.ones(num, bool)
    update = lambda c, w, batch: alg.client_update(
        server, c, weight=w, loss_fn=mse, batch_fn=lambda step: batch, num_steps=local_steps,
        rng=jax.random.key(0))
    local, new, _ = jax.vmap(update)(clients, weights, data)
    return alg.server_update(server, clients, local_params=local, new_client_states=new,
                             weights=weights, active=active)

  server, clients = alg.init(jnp.zeros(dim), num)
  return jax.jit(lambda s, c: jax.lax.fori_loop(0, num_rounds, one_round, (s, c)))(server, clients)


def rel_error(params, optimum):
  return float(np.linalg.norm(np.asarray(params, np.float64) - optimum) / np.linalg.norm(optimum))


# docs/feddyn.md's convex-consensus setting: alpha 0.1, lr 0.05, 50 full-batch local steps, wd 0, clipping at 10.
# Measured: FedDyn 3.3e-7 (300 rounds), 8.1e-7 (50 % participation, 600 rounds), SCAFFOLD 2.4e-7,
# FedAvg 7.6e-2; float32 rounding floors the errors near 1e-7. Tolerances: 1e-4 and > 1e-2.
CONSENSUS_TOL = 1e-4


@pytest.fixture(scope='module')
def problem():
  return least_squares()


def test_feddyn_reaches_the_weighted_optimum(problem):
  data, optimum = problem
  server, _ = run(algorithms.fed_dyn(0.05, alpha=0.1), data, SIZES, 300, 50)
  assert rel_error(server.params, optimum) < CONSENSUS_TOL
  assert rel_error(server.active_mean, optimum) < CONSENSUS_TOL


def test_feddyn_converges_with_half_participation(problem):
  data, optimum = problem
  server, _ = run(algorithms.fed_dyn(0.05, alpha=0.1), data, SIZES, 600, 50, participation=0.5)
  assert rel_error(server.params, optimum) < CONSENSUS_TOL


def test_fedavg_drifts_away(problem):
  data, optimum = problem
  server, _ = run(algorithms.fed_avg(0.05), data, SIZES, 300, 50)
  assert rel_error(server.params, optimum) > 1e-2


def test_scaffold_reaches_the_weighted_optimum(problem):
  data, optimum = problem
  server, _ = run(algorithms.scaffold(0.05), data, SIZES, 300, 50)
  assert rel_error(server.params, optimum) < CONSENSUS_TOL


def equal_optimum(data):
  """Minimiser of sum_k L_k: every client counts once whatever its size (fl.weighting='equal')."""
  x, y, mask = (np.asarray(a, np.float64) for a in data)
  n = mask.sum(1)[:, None, None]
  gram = (np.einsum('kni,knj->kij', x, x) / n).sum(0)
  return np.linalg.solve(gram, (np.einsum('kni,kn->ki', x, y) / n[:, :, 0]).sum(0))


@pytest.mark.parametrize('name', ['fed_dyn', 'scaffold'])
def test_equal_weighting_reaches_the_mean_of_the_clients_risks(problem, name):
  # fl.weighting='equal': FedDyn's alpha_k = alpha at every client and SCAFFOLD's uniform mean
  # move the fixed point from the size-weighted optimum to the minimiser of sum_k L_k.
  data, weighted = problem
  equal = equal_optimum(data)
  assert rel_error(equal, weighted) > 0.1  # the two objectives differ here
  cfg = {'fed_dyn': dict(algorithm='fed_dyn', lr=0.05, alpha=0.1),
         'scaffold': dict(algorithm='scaffold', lr=0.05)}[name]
  server, _ = run(algorithms.build({**cfg, 'weighting': 'equal'}), data, SIZES, 300, 50)
  params = server.params
  assert rel_error(params, equal) < CONSENSUS_TOL
  server, _ = run(algorithms.build({**cfg, 'weighting': 'size'}), data, SIZES, 300, 50)
  assert rel_error(server.params, weighted) < CONSENSUS_TOL


def test_equal_weighting_is_the_size_weighting_when_the_clients_are_equal():
  sizes = np.array([50, 50, 50])
  data, _ = least_squares(sizes=sizes)
  cfg = dict(algorithm='fed_avg', lr=0.05, server_momentum=0.5)
  equal, _ = run(algorithms.build({**cfg, 'weighting': 'equal'}), data, sizes, 5, 3)
  size, _ = run(algorithms.build(cfg), data, sizes, 5, 3)
  np.testing.assert_array_equal(equal.params, size.params)


def test_fl_weighting_must_be_known():
  with pytest.raises(ValueError, match=r"fl.weighting must be one of \('size', 'equal'\), got 'rows'"):
    algorithms.build(dict(algorithm='fed_avg', lr=0.1, weighting='rows'))


def test_feddyn_single_client_fixed_point_is_its_own_optimum():
  (x, y, mask), optimum = least_squares(sizes=np.array([40]))
  server, _ = run(algorithms.fed_dyn(0.05, alpha=0.1), (x, y, mask), np.array([40]), 200, 20)
  assert rel_error(server.params, optimum) < CONSENSUS_TOL


def test_fedprox_mu0_equals_fedavg(problem):
  data, _ = problem
  prox, _ = run(algorithms.fed_prox(0.05, mu=0.0), data, SIZES, 3, 10)
  avg, _ = run(algorithms.fed_avg(0.05), data, SIZES, 3, 10)
  np.testing.assert_array_equal(prox.params, avg.params)
  other, _ = run(algorithms.fed_prox(0.05, mu=0.5), data, SIZES, 3, 10)
  assert not np.array_equal(other.params, avg.params)  # mu does reach the update


def test_scaffold_first_round_equals_fedavg(problem):
  data, _ = problem
  scaf, controls = run(algorithms.scaffold(0.05), data, SIZES, 1, 10)
  avg, _ = run(algorithms.fed_avg(0.05), data, SIZES, 1, 10)
  np.testing.assert_array_equal(scaf.params, avg.params)
  assert np.abs(np.asarray(controls)).min(axis=1).max() > 0  # every client's control moved
  scaf2, _ = run(algorithms.scaffold(0.05), data, SIZES, 2, 10)
  avg2, _ = run(algorithms.fed_avg(0.05), data, SIZES, 2, 10)
  assert not np.allclose(scaf2.params, avg2.params)  # the controls act from round two


def test_feddyn_first_round_client_update_equals_fedprox_alpha_k(problem):
  """Round one (lambda = 0): FedDyn's local problem is FedProx with mu = alpha_k plus the same wd.

  Equal up to rounding while clipping is inactive (the bound is above every gradient
  norm here): FedDyn clips grad(CE) - alpha_k theta_s and decays by alpha_k after,
  FedProx clips grad(CE) + alpha_k (theta - theta_s) whole.
  """
  (x, y, mask), _ = problem
  batch = (x[1], y[1], mask[1])
  alpha, weight, wd = 0.1, 0.4, 1e-2  # alpha_k = alpha / weight = 0.25
  theta = jnp.asarray(np.random.default_rng(3).normal(size=DIM), jnp.float32)
  dyn = algorithms.fed_dyn(0.05, alpha, weight_decay=wd, max_grad_norm=1e6)
  prox = algorithms.fed_prox(0.05, mu=alpha / weight, weight_decay=wd, max_grad_norm=1e6)
  local = {}
  for name, alg in (('dyn', dyn), ('prox', prox)):
    server, clients = alg.init(theta, 1)
    client = jax.tree.map(lambda c: c[0], clients)
    local[name] = alg.client_update(server, client, weight=weight, loss_fn=mse,
                                    batch_fn=lambda s: batch, num_steps=20,
                                    rng=jax.random.key(0)).local_params
  np.testing.assert_allclose(local['dyn'], local['prox'], rtol=1e-5, atol=1e-6)
  avg = algorithms.fed_avg(0.05, weight_decay=wd, max_grad_norm=1e6)
  server, _ = avg.init(theta, 1)
  plain, _, _ = avg.client_update(server, (), weight=weight, loss_fn=mse, batch_fn=lambda s: batch,
                                  num_steps=20, rng=jax.random.key(0))
  assert np.abs(plain - local['dyn']).max() > 1e-3  # the proximal pull is not negligible


def numpy_grad(theta, x, y):
  return x.T @ (x @ theta - y) / len(y)


def clip(g, bound):
  norm = np.linalg.norm(g)
  return g * min(1.0, bound / norm)


def test_one_local_step_matches_hand_computed_sgd():
  """Two clients, one full-batch step each, then a round with only client 1 active."""
  rng = np.random.default_rng(7)
  sizes = np.array([3, 9])
  xs = [rng.normal(size=(n, 3)) for n in sizes]
  ys = [rng.normal(size=n) + 4 for n in sizes]
  theta0 = rng.normal(size=3)
  lr, wd, bound, alpha = 0.1, 0.01, 0.5, 0.3
  assert all(np.linalg.norm(numpy_grad(theta0, x, y)) > bound for x, y in zip(xs, ys))  # clips
  batches = [(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.ones(len(y)))
             for x, y in zip(xs, ys)]
  weights = sizes / sizes.sum() * 2

  def step_round(alg, server, clients, active):
    outs = [alg.client_update(server, jax.tree.map(lambda c: c[k], clients), weight=weights[k],
                              loss_fn=mse, batch_fn=lambda s: batches[k], num_steps=1,
                              rng=jax.random.key(0)) for k in range(2)]
    local, new, _ = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return alg.server_update(server, clients, local_params=local, new_client_states=new,
                             weights=weights, active=active)

  both, only1 = jnp.array([True, True]), jnp.array([False, True])

  # FedAvg: theta - lr (clip(grad) + wd theta), averaged with weights 3/12 and 9/12.
  fed_avg = algorithms.fed_avg(lr, weight_decay=wd, max_grad_norm=bound)
  server, clients = fed_avg.init(jnp.asarray(theta0, jnp.float32), 2)
  server, clients = step_round(fed_avg, server, clients, both)
  locals_ = [theta0 - lr * (clip(numpy_grad(theta0, x, y), bound) + wd * theta0)
             for x, y in zip(xs, ys)]
  np.testing.assert_allclose(server.params, 0.25 * locals_[0] + 0.75 * locals_[1], rtol=1e-5)

  # FedDyn, docs/feddyn.md's update with alpha_k = alpha / w_k, w = (0.5, 1.5).
  fed_dyn = algorithms.fed_dyn(lr, alpha, weight_decay=wd, max_grad_norm=bound)
  server, clients = fed_dyn.init(jnp.asarray(theta0, jnp.float32), 2)
  lam = [np.zeros(3), np.zeros(3)]
  theta_s = theta0
  for active in (both, only1):
    server, clients = step_round(fed_dyn, server, clients, active)
    new = {}
    for k in np.flatnonzero(np.asarray(active)):
      alpha_k = alpha / weights[k]
      g = clip(numpy_grad(theta_s, xs[k], ys[k]) + alpha_k * (lam[k] - theta_s), bound)
      new[k] = theta_s - lr * (g + (alpha_k + wd) * theta_s)
    for k, theta_k in new.items():
      lam[k] = lam[k] + theta_k - theta_s
    active_mean = np.mean(list(new.values()), axis=0)
    theta_s = active_mean + np.mean(lam, axis=0)  # stale lambda_0 stays in the mean
    np.testing.assert_allclose(server.active_mean, active_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(server.params, theta_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clients.lam, np.stack(lam), rtol=1e-5, atol=1e-6)


def test_no_active_client_leaves_the_server_unchanged(problem):
  data, _ = problem
  for alg in (algorithms.fed_avg(0.05), algorithms.fed_dyn(0.05, 0.1), algorithms.scaffold(0.05)):
    server, clients = alg.init(jnp.ones(DIM), len(SIZES))
    local = jnp.full((len(SIZES), DIM), jnp.nan)  # inactive outputs are never read
    new_clients = jax.tree.map(lambda c: jnp.full_like(c, jnp.nan), clients)
    new, kept = alg.server_update(server, clients, local_params=local,
                                  new_client_states=new_clients,
                                  weights=algorithms.client_weights(SIZES),
                                  active=jnp.zeros(len(SIZES), bool))
    jax.tree.map(np.testing.assert_array_equal, new, server)
    jax.tree.map(np.testing.assert_array_equal, kept, clients)  # inactive: states kept


def test_inactive_outputs_are_ignored_even_if_nan():
  stacked = jnp.array([[1.0, 2.0], [jnp.nan, jnp.inf], [3.0, 4.0]])
  mean, any_active = base.masked_mean(stacked, jnp.array([1.0, 5.0, 3.0]),
                                      jnp.array([True, False, True]))
  np.testing.assert_allclose(mean, [2.5, 3.5])
  assert bool(any_active)


def test_build_by_name_reads_hyperparameters_from_config():
  cfg = ml_collections.ConfigDict(dict(algorithm='fed_dyn', lr=0.1, alpha=0.01, mu=0.3,
                                       weight_decay=1e-3, max_grad_norm=10.0))
  for name in algorithms.NAMES:
    cfg.algorithm = name
    assert isinstance(algorithms.build(cfg), algorithms.FedAlgorithm)
  with pytest.raises(ValueError, match='fl.algorithm'):
    algorithms.build(dict(algorithm='fedyn', lr=0.1))
  with pytest.raises(ValueError, match='fl.alpha'):
    algorithms.build(dict(algorithm='fed_dyn', lr=0.1))
  with pytest.raises(ValueError, match='fl.mu'):
    algorithms.build(dict(algorithm='fed_prox', lr=0.1))


def test_client_weights_have_mean_one():
  np.testing.assert_allclose(algorithms.client_weights([2500, 14500]), [2500 / 8500, 14500 / 8500],
                             rtol=1e-6)


def test_builder_table_passes_each_config_key_to_its_builder(problem):
  """``fl.alpha`` (and every other key) reaches the builder's argument of the same name."""
  (x, y, mask), _ = problem
  batch = (x[1], y[1], mask[1])
  theta = jnp.ones(DIM)

  def local(alg):
    server, clients = alg.init(theta, 1)
    return alg.client_update(server, jax.tree.map(lambda c: c[0], clients), weight=0.7,
                             loss_fn=mse, batch_fn=lambda s: batch, num_steps=3,
                             rng=jax.random.key(0)).local_params

  cfg = dict(algorithm='fed_dyn', lr=0.05, alpha=0.3, weight_decay=1e-2, max_grad_norm=0.5)
  direct = algorithms.fed_dyn(lr=0.05, alpha=0.3, weight_decay=1e-2, max_grad_norm=0.5)
  np.testing.assert_array_equal(local(algorithms.build(cfg)), local(direct))
  assert np.abs(local(algorithms.build(dict(cfg, alpha=0.01))) - local(direct)).max() > 1e-4
  assert set(algorithms.BUILDERS) == set(algorithms.NAMES) == {'fed_dyn', 'fed_avg', 'fed_prox',
                                                               'scaffold'}


def test_the_gradient_rewrite_is_a_parameter(problem):
  """``rewrite`` is what local SGD differentiates with: one zeroing the gradient leaves the
  model where it started (no weight decay), the default moves it."""
  (x, y, mask), _ = problem
  batch = (x[1], y[1], mask[1])
  seen = []

  def zero_gradients(grad_fn):
    seen.append(grad_fn)
    def zeroed(*args):
      grads, aux = grad_fn(*args)
      return jax.tree.map(jnp.zeros_like, grads), aux
    return zeroed

  theta = jnp.ones(DIM)
  for rewrite, moves in ((zero_gradients, False), (None, True)):
    alg = algorithms.build(dict(algorithm='fed_prox', lr=0.05, mu=0.1), rewrite=rewrite)
    server, _ = alg.init(theta, 1)
    out = alg.client_update(server, (), weight=1.0, loss_fn=mse, batch_fn=lambda s: batch,
                            num_steps=3, rng=jax.random.key(0))
    assert bool(np.any(np.asarray(out.local_params) != 1.0)) == moves
  assert len(seen) == 1


def test_fl_alpha_reaches_fed_dyn_by_name(monkeypatch):
  # configs -> algorithms.build -> BUILDERS['fed_dyn'] -> fed_dyn(alpha=...): nothing renames it.
  seen = {}
  monkeypatch.setattr(algorithms, 'fed_dyn', lambda **kwargs: seen.update(kwargs))
  algorithms.build({'algorithm': 'fed_dyn', 'lr': 0.1, 'alpha': 0.3, 'mu': 0.5})
  assert seen['alpha'] == 0.3 and 'mu' not in seen


@pytest.mark.parametrize('key, value', [('server_lr', 0.5), ('server_momentum', 0.9)])
def test_fed_dyn_refuses_a_server_step(key, value):
  fl_cfg = {'algorithm': 'fed_dyn', 'lr': 0.1, 'alpha': 0.1, key: value}
  with pytest.raises(ValueError, match=f"fl.{key}={value}: fl.algorithm='fed_dyn' has no server"):
    algorithms.build(fl_cfg)
  algorithms.build({**fl_cfg, 'algorithm': 'fed_avg'})  # FedAvg's server has a step
  with pytest.raises(ValueError, match='fl.alpha must be > 0 for fed_dyn'):
    algorithms.build({**fl_cfg, key: {'server_lr': 1.0, 'server_momentum': 0.0}[key],
                      'alpha': 0.0})


@pytest.mark.parametrize('name', ['fed_dyn', 'fed_avg', 'fed_prox', 'scaffold'])
def test_lr_decay_runs_round_r_at_lr_times_decay_to_the_r_minus_1(problem, name):
  # fl.lr_decay: round r's local update (and SCAFFOLD's control variate, which divides by the lr)
  # is the one of a constant lr * decay**(r - 1); round 1 is at lr itself, whatever the decay.
  (x, y, mask), _ = problem
  batch = (x[2], y[2], mask[2])
  cfg = dict(algorithm=name, alpha=0.1, mu=0.1, max_grad_norm=10.0, weight_decay=1e-3)

  def update(lr, round_index, **extra):
    alg = algorithms.build(dict(cfg, lr=lr, **extra))
    server, clients = alg.init(jnp.ones(DIM), 2)
    client = jax.tree.map(lambda c: c[0] + 0.3, clients)  # a nonzero lambda_k / c_k
    out = jax.jit(lambda r: alg.client_update(
        server, client, weight=0.8, loss_fn=mse, batch_fn=lambda s: batch, num_steps=4,
        rng=jax.random.key(0), round_index=r))(jnp.int32(round_index))
    return jax.tree.leaves((out.local_params, out.client_state))

  for r in (1, 6):
    decayed = update(0.05, r, lr_decay=0.9)
    constant = update(0.05 * 0.9 ** (r - 1), r)
    for a, b in zip(decayed, constant, strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  assert np.abs(update(0.05, 6, lr_decay=0.9)[0] - update(0.05, 6)[0]).max() > 1e-3
  alg = algorithms.build(dict(cfg, lr=0.05, lr_decay=0.9))
  server, clients = alg.init(jnp.ones(DIM), 1)
  with pytest.raises(ValueError, match='lr_decay=0.9: the local lr depends on the round'):
    alg.client_update(server, jax.tree.map(lambda c: c[0], clients), weight=1.0, loss_fn=mse,
                      batch_fn=lambda s: batch, num_steps=1, rng=jax.random.key(0))


@pytest.mark.parametrize('name', ['fed_dyn', 'fed_avg', 'fed_prox'])
def test_local_momentum_is_heavy_ball_from_a_zero_buffer_every_round(problem, name):
  # fl.local_momentum m: each step v <- m v + g, p <- p - lr v on the algorithm's own
  # regularised gradient (FedDyn's linear and quadratic terms, FedProx's proximal term), with v
  # zero at the start of every client_update: nothing is carried between rounds.
  (x, y, mask), _ = problem
  batch = (x[1], y[1], mask[1])
  lr, m, steps, weight, alpha, mu, wd = 0.02, 0.7, 5, 0.8, 0.1, 0.3, 1e-3
  cfg = dict(algorithm=name, lr=lr, alpha=alpha, mu=mu, max_grad_norm=0.0, weight_decay=wd)
  start = jnp.linspace(-1.0, 1.0, DIM)

  def update(num_steps=steps, **extra):
    alg = algorithms.build(dict(cfg, **extra))
    server, clients = alg.init(start, 2)
    client = jax.tree.map(lambda c: c[0] + 0.3, clients)  # a nonzero lambda_k
    out = alg.client_update(server, client, weight=weight, loss_fn=mse,
                            batch_fn=lambda s: batch, num_steps=num_steps, rng=jax.random.key(0))
    return np.asarray(out.local_params)

  xs, ys, ms = (np.asarray(a, np.float64) for a in batch)
  theta = np.asarray(start, np.float64)
  lam = np.full(DIM, 0.3)  # the client state above

  def grad(p):  # the local objective's gradient, weight decay included
    g = xs.T @ (ms * (xs @ p - ys)) / ms.sum() + wd * p
    if name == 'fed_dyn':
      alpha_k = alpha / weight
      g = g + alpha_k * (lam - theta) + alpha_k * p
    if name == 'fed_prox':
      g = g + mu * (p - theta)
    return g

  p, v = theta.copy(), np.zeros(DIM)
  for _ in range(steps):
    v = m * v + grad(p)
    p = p - lr * v
  np.testing.assert_allclose(update(local_momentum=m), p, rtol=1e-5, atol=1e-6)
  assert np.abs(p - update()).max() > 1e-3  # momentum moved it
  # One step from a zero buffer is the plain SGD step, whatever m: the buffer starts empty.
  np.testing.assert_array_equal(update(1, local_momentum=m), update(1))
  np.testing.assert_array_equal(update(local_momentum=0.0), update())


def test_feddyn_with_local_momentum_reaches_the_weighted_optimum(problem):
  # FedDyn's fixed point does not depend on how each center solves its local problem.
  data, optimum = problem
  server, _ = run(algorithms.fed_dyn(0.01, alpha=0.1, local_momentum=0.8), data, SIZES, 300, 50)
  assert rel_error(server.params, optimum) < CONSENSUS_TOL


@pytest.mark.parametrize('momentum, says', [
    (1.0, r'fl.local_momentum must be in \[0, 1\), got 1.0'),
    (-0.1, r'fl.local_momentum must be in \[0, 1\), got -0.1'),
])
def test_local_momentum_outside_0_1_refused(momentum, says):
  for name in ('fed_dyn', 'fed_avg'):
    with pytest.raises(ValueError, match=says):
      algorithms.build(dict(algorithm=name, lr=0.05, alpha=0.1, local_momentum=momentum))


def test_scaffold_refuses_local_momentum():
  with pytest.raises(ValueError, match=r"fl.local_momentum=0.9: fl.algorithm='scaffold' runs "
                                       'plain local SGD'):
    algorithms.build(dict(algorithm='scaffold', lr=0.05, local_momentum=0.9))
  algorithms.build(dict(algorithm='scaffold', lr=0.05, local_momentum=0.0))  # the default: fine


@pytest.mark.parametrize('name', ['fed_dyn', 'fed_avg'])
def test_swa_averages_each_model_over_the_rounds_from_start_and_trains_as_without(problem, name):
  data, _ = problem
  cfg = dict(algorithm=name, lr=0.05, alpha=0.1)
  plain, averaged = algorithms.build(cfg), algorithms.build({**cfg, 'swa_start': 3})
  # The plain algorithm's models after each of 6 rounds (1 local step: they keep moving).
  models = [plain.eval_params(run(plain, data, SIZES, r, 1)[0]) for r in range(1, 7)]
  for rounds in (2, 6):
    server, clients = run(averaged, data, SIZES, rounds, 1)
    out = averaged.eval_params(server)
    assert set(out) == set(models[0]) | {'swa_' + n for n in models[0]}
    for model, params in models[rounds - 1].items():
      np.testing.assert_array_equal(out[model], params)  # training as without the average
      # Before round 3 the average is the current model; after round 6 the mean of rounds 3-6.
      want = params if rounds < 3 else np.mean([m[model] for m in models[2:rounds]], axis=0)
      np.testing.assert_allclose(out['swa_' + model], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(clients, run(plain, data, SIZES, rounds, 1)[1])
  assert not np.allclose(models[5]['server'], models[2]['server'], atol=1e-3)  # it moved


def test_swa_start_must_be_a_round_and_eval_model_swa_needs_it():
  with pytest.raises(ValueError, match='fl.swa_start must be a round >= 1'):
    swa_lib.swa(algorithms.fed_avg(0.05), -1)
  off, on = (algorithms.build(dict(algorithm='fed_avg', lr=0.1, swa_start=s)) for s in (0, 5))
  assert not isinstance(off.init(jnp.zeros(2), 2)[0], swa_lib.SwaServerState)
  assert isinstance(on.init(jnp.zeros(2), 2)[0], swa_lib.SwaServerState)
  with pytest.raises(ValueError, match=r"fl.eval_model='swa_active_mean' .* set fl.swa_start"):
    driver.eval_model_name('swa_active_mean', {'server': 0, 'active_mean': 0})
  # FedAvg's one model: its average stands for both names.
  assert driver.eval_model_name('swa_active_mean', {'server': 0, 'swa_server': 0}) == 'swa_server'
  assert driver.eval_model_name('swa_active_mean', {'server': 0, 'active_mean': 0,
                                                     'swa_server': 0, 'swa_active_mean': 0}) \
      == 'swa_active_mean'
