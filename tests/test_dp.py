"""DP-SGD in the local step, DP-FedAvg, Poisson sampling and the accounting, on tiny problems.

The model is a bare linear least-squares problem (params a small pytree) or the tiny MLP of
mlp_federation.py; everything runs in seconds.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedblood import algorithms, privacy
from fedblood.algorithms import dp
from fedblood.algorithms import dp_fedavg
from fedblood.core import batches, simulate
from mlp_federation import ALL, CONFIGS, mlp_centers, mlp_loss, mlp_params

dp_accounting = pytest.importorskip('dp_accounting')

DIM = 4


def linear_loss(params, batch, rng):
  """Masked mean squared error of a linear model (rng unused: deterministic gradients)."""
  del rng
  pred = batch['x'] @ params['w'] + params['b']
  err = 0.5 * (pred - batch['y']) ** 2 * batch['mask']
  return jnp.sum(err) / jnp.maximum(jnp.sum(batch['mask']), 1.0), {'err': jnp.sum(err)}


def linear_data(n=8, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {'x': jnp.asarray(rng.normal(size=(n, DIM)) * scale, jnp.float32),
          'y': jnp.asarray(rng.normal(size=n) * scale, jnp.float32),
          'mask': jnp.ones(n, jnp.float32)}


def linear_params(seed=1):
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.normal(size=DIM), jnp.float32), 'b': jnp.float32(0.3)}


def full_sample(batch, microbatch):
  """A PoissonSample holding exactly ``batch`` (its size = the expected size)."""
  n = batch['mask'].shape[0]
  pad = -n % microbatch
  rows = {k: jnp.concatenate([v, jnp.zeros((pad,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}
  fetch = lambda j: {k: jax.lax.dynamic_slice_in_dim(v, j * microbatch, microbatch)
                     for k, v in rows.items()}
  return dp.PoissonSample(jnp.int32(n), fetch)


def test_each_examples_clipped_contribution_is_bounded_exactly():
  params, batch = linear_params(), linear_data(scale=3.0)
  raw_norms = [float(optax.tree.norm(jax.grad(lambda p: linear_loss(
      p, jax.tree.map(lambda x: x[i:i + 1], batch), None)[0])(params))) for i in range(8)]
  clip = float(np.median(raw_norms))  # half the examples are clipped, half are not
  total = jax.jit(dp.clipped_sum(linear_loss, clip))
  rngs = jax.random.split(jax.random.key(0), 8)
  clipped_any = unclipped_any = False
  for i in range(8):
    only_i = dict(batch, mask=jnp.zeros(8).at[i].set(1.0))
    contribution, _ = total(params, only_i, rngs)
    one = jax.tree.map(lambda x: x[i:i + 1], batch)
    raw = jax.grad(lambda p: linear_loss(p, one, None)[0])(params)
    raw_norm = float(optax.tree.norm(raw))
    norm = float(optax.tree.norm(contribution))
    assert norm <= clip * (1 + 1e-6)
    if raw_norm > clip:  # scaled onto the sphere of radius clip, direction kept
      clipped_any = True
      np.testing.assert_allclose(norm, clip, rtol=1e-6)
      jax.tree.map(lambda c, r: np.testing.assert_allclose(c, r * clip / raw_norm, rtol=1e-5),
                   contribution, raw)
    else:  # left alone
      unclipped_any = True
      jax.tree.map(lambda c, r: np.testing.assert_allclose(c, r, rtol=1e-6), contribution, raw)
  assert clipped_any and unclipped_any
  # Masked-out rows add exactly nothing.
  nothing, stats = total(params, dict(batch, mask=jnp.zeros(8)), rngs)
  assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves((nothing, stats)))


@pytest.mark.parametrize('name', ['fed_dyn', 'fed_avg', 'fed_prox', 'scaffold'])
def test_no_noise_and_huge_clip_is_plain_sgd_on_the_same_batches(name):
  params, batch = linear_params(), linear_data()
  cfg = dict(CONFIGS[name], max_grad_norm=None)
  plain = algorithms.build(cfg)
  private = algorithms.build(dict(cfg, batch_size=8, dp=dict(
      mode='example', clip=1e9, noise_multiplier=0.0, microbatch=3)))
  server, clients = plain.init(params, 1)
  # A non-trivial client state (lambda_k / c_k): the penalty terms must match too.
  clients = jax.tree.map(lambda c: c + 0.05, clients)
  client = jax.tree.map(lambda c: c[0], clients)
  out_plain = plain.client_update(server, client, weight=1.3, loss_fn=linear_loss,
                                  batch_fn=lambda s: batch, num_steps=5, rng=jax.random.key(0))
  sample = full_sample(batch, 3)
  out_dp = private.client_update(server, client, weight=1.3, loss_fn=linear_loss,
                                 batch_fn=lambda s: sample, num_steps=5, rng=jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
               out_plain[:2], out_dp[:2])
  np.testing.assert_allclose(out_plain[2]['loss'], out_dp[2]['loss'], rtol=1e-5)


def test_noise_std_is_noise_multiplier_times_clip_over_batch():
  # A loss with zero gradient: the private gradient is the noise / B alone.
  params = {'w': jnp.zeros(20000), 'b': jnp.zeros(())}
  zero_loss = lambda p, batch, rng: (0.0 * jnp.sum(p['w']) * jnp.sum(batch['x']), {})
  cfg = dp.DpSgd(clip=0.5, noise_multiplier=1.7, expected_batch=16, microbatch=16)
  batch = {'x': jnp.ones((16, 1)), 'mask': jnp.ones(16)}
  private = dp.private_gradient(cfg, zero_loss)
  grad_fn = jax.jit(lambda p, key: private(p, full_sample(batch, 16), key)[0]['w'])
  draws = np.concatenate([np.asarray(grad_fn(params, jax.random.key(s))) for s in range(5)])
  expected = 1.7 * 0.5 / 16
  # 100k draws: the sample std's relative standard error is 1/sqrt(2 * 1e5) = 0.22%.
  np.testing.assert_allclose(np.std(draws), expected, rtol=0.01)
  assert abs(np.mean(draws)) < 4 * expected / np.sqrt(draws.size)
  # Independent draws per step key.
  a, b = (grad_fn(params, jax.random.key(s)) for s in (0, 1))
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.03


@pytest.mark.parametrize('name', ['fed_dyn', 'scaffold'])
def test_data_independent_terms_are_added_after_the_noise(name):
  """FedDyn's linear term and SCAFFOLD's correction have constant gradients here; with a tiny
  clip and no noise the data contributes at most clip / B per step, so the local model moves by
  the penalty's gradient, unclipped: if it went through the per-example clip, it would not."""
  params, batch, clip, lr, steps = linear_params(), linear_data(), 1e-6, 0.1, 3
  cfg = dict(CONFIGS[name], lr=lr, max_grad_norm=None, weight_decay=0.0)
  private = algorithms.build(dict(cfg, batch_size=8, dp=dict(
      mode='example', clip=clip, noise_multiplier=0.0, microbatch=8)))
  server, clients = private.init(params, 1)
  client = jax.tree.map(lambda c: c[0] + 2.0, clients)  # lambda_k / c_k = 2: a big constant pull
  local, _, _ = private.client_update(server, client, weight=1.0, loss_fn=linear_loss,
                                      batch_fn=lambda s: full_sample(batch, 8), num_steps=steps,
                                      rng=jax.random.key(0))
  if name == 'scaffold':  # gradient <c - c_k, p>: c - c_k = -2 each step
    expected = jax.tree.map(lambda x: x + lr * steps * 2.0, params)
  else:  # FedDyn: alpha (lambda - theta_s) plus its weight decay alpha * p, every step
    alpha = CONFIGS['fed_dyn']['alpha']
    expected = params
    for _ in range(steps):
      expected = jax.tree.map(lambda p, t: p - lr * (alpha * (2.0 - t) + alpha * p), expected,
                              params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=steps * lr * clip * 2),
               local, expected)


def test_poisson_sample_has_fixed_shape_and_the_accountants_rate():
  nmax, size, batch, mb = 40, 30, 6, 4
  examples = {'i': jnp.tile(jnp.arange(nmax), (2, 1))}
  batch_fn = batches.make_poisson_fn(examples, 1, jnp.int32(size), jax.random.key(3), batch, mb)

  @jax.jit
  def draw(step):
    sample = batch_fn(step)
    chunks = [sample.fetch(j) for j in range(nmax // mb)]
    return sample.count, jnp.concatenate([c['i'] for c in chunks]), jnp.concatenate(
        [c['mask'] for c in chunks])

  counts, hits = [], np.zeros(nmax)
  for step in range(2000):
    count, rows, mask = (np.asarray(x) for x in draw(jnp.int32(step)))
    assert rows.shape == (nmax,) and mask.sum() == count
    np.testing.assert_array_equal(mask, np.arange(nmax) < count)  # sampled rows first
    chosen = rows[:count]
    assert len(set(chosen.tolist())) == count and np.all(chosen < size)  # real rows, no repeats
    hits[chosen] += 1
    counts.append(count)
  rate = batch / size
  # Binomial(30, 0.2) per step: mean 6, sd 2.19 -> 2000 steps: se 0.049.
  assert abs(np.mean(counts) - batch) < 0.2
  assert abs(np.var(counts) - size * rate * (1 - rate)) < 0.5
  # Each example in ~20% of the steps (se 0.9%), padding rows never.
  assert np.all(np.abs(hits[:size] / 2000 - rate) < 0.045) and hits[size:].sum() == 0


def test_dp_rounds_run_for_every_algorithm_and_execution_alike():
  trainable, frozen = mlp_params()
  centers = mlp_centers()
  finals = {}
  for execution in ('loop', 'vmap'):
    cfg = dict(CONFIGS['fed_dyn'], batch_size=4, local_epochs=2, execution=execution,
               dp=dict(mode='example', clip=1.0, noise_multiplier=1.0, microbatch=2))
    alg, round_fn = simulate.build(cfg, mlp_loss)
    server, clients = alg.init(trainable, 3)
    for r in range(2):
      server, clients, metrics = round_fn(server, clients, frozen, centers, ALL,
                                          jax.random.key(0), r)
    np.testing.assert_array_equal(metrics['num_steps'], [4, 6, 6])  # 2 * ceil(n_k / 4)
    finals[execution] = server
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               finals['loop'], finals['vmap'])


def test_dp_off_is_bit_identical_to_no_dp_config():
  trainable, frozen = mlp_params()
  centers = mlp_centers()
  outs = []
  for extra in ({}, {'dp': dict(mode='off', clip=0.1, noise_multiplier=5.0)}):
    alg, round_fn = simulate.build(dict(CONFIGS['fed_dyn'], batch_size=4, local_epochs=2,
                                        execution='loop', **extra), mlp_loss)
    server, clients = alg.init(trainable, 3)
    server, clients, metrics = round_fn(server, clients, frozen, centers, ALL,
                                        jax.random.key(0), 1)
    outs.append((server, clients, metrics))
  jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])


def test_client_level_clips_updates_and_noises_the_mean():
  params = {'w': jnp.zeros(3000)}
  num, clip, sigma = 4, 0.5, 2.0
  wrapped = dp_fedavg.client_level(algorithms.fed_avg(lr=0.1), clip, sigma, seed=0)
  server, _ = wrapped.init(params, num)
  deltas = np.stack([np.full(3000, 0.001), np.full(3000, 1.0), np.zeros(3000),
                     np.full(3000, -0.002)]).astype(np.float32)  # norms 0.055, 54.8, 0, 0.11
  local = {'w': jnp.asarray(deltas)}
  new, _ = wrapped.server_update(server, (), local_params=local, new_client_states=(),
                                 weights=jnp.ones(num), active=jnp.ones(num, bool))
  moved = np.asarray(new.inner.params['w'])
  norms = np.linalg.norm(deltas, axis=1)
  clipped = deltas * np.minimum(1, clip / np.maximum(norms, 1e-12))[:, None]
  noise = moved * num - clipped.sum(0)
  # The noise on the sum has std sigma * clip (3000 draws: se 1.3%).
  np.testing.assert_allclose(np.std(noise), sigma * clip, rtol=0.05)
  # With no noise the mean of the clipped updates is exact, and the key advances.
  quiet = dp_fedavg.client_level(algorithms.fed_avg(lr=0.1), clip, 0.0, seed=0)
  new, _ = quiet.server_update(quiet.init(params, num)[0], (), local_params=local,
                               new_client_states=(), weights=jnp.ones(num),
                               active=jnp.ones(num, bool))
  np.testing.assert_allclose(new.inner.params['w'], clipped.mean(0), rtol=1e-5, atol=1e-7)
  assert not np.array_equal(new.key, quiet.init(params, num)[0].key)


def test_client_level_refuses_what_it_cannot_cover():
  with pytest.raises(ValueError, match=r"fl.dp.mode='client' supports .*'fed_dyn'"):
    algorithms.build(dict(CONFIGS['fed_dyn'], dp=dict(mode='client', clip=1.0,
                                                      noise_multiplier=1.0)))
  with pytest.raises(ValueError, match=r'fl.participation=1.0'):
    algorithms.build(dict(CONFIGS['fed_avg'], participation=0.5,
                          dp=dict(mode='client', clip=1.0, noise_multiplier=1.0)))
  with pytest.raises(ValueError, match=r'fl.dp.mode must be one of'):
    algorithms.build(dict(CONFIGS['fed_avg'], dp=dict(mode='records', clip=1.0,
                                                      noise_multiplier=1.0)))


FL = dict(algorithm='fed_dyn', batch_size=32, local_epochs=2, rounds=7,
          dp=dict(mode='example', clip=1.0, noise_multiplier=1.3, delta=1e-5, target_epsilon=0.0,
                  accountant='rdp'))
SIZES_K = {'a': 973, 'b': 228, 'c': 168}


def independent_epsilon(rate, sigma, steps, delta):
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.PoissonSampledDpEvent(
      rate, dp_accounting.GaussianDpEvent(sigma)), steps)
  return accountant.get_epsilon(delta)


def test_reported_epsilon_is_dp_accountings_for_the_same_event():
  plan = privacy.plan(FL, SIZES_K)
  assert plan.steps_per_round == (2 * 31, 2 * 8, 2 * 6)
  steps = [7 * s for s in plan.steps_per_round]
  got = privacy.epsilons(plan, steps)
  for (name, n), s, eps in zip(SIZES_K.items(), steps, got):
    assert eps == independent_epsilon(32 / n, 1.3, s, 1e-5), name
  assert got[0] < got[1] < got[2]  # the smallest center spends the most
  # Rounds a center sat out cost nothing.
  assert privacy.steps_taken(plan, [[1, 0, 1], [1, 1, 1]]) == [124, 16, 24]
  client = privacy.plan(dict(FL, algorithm='fed_avg', dp=dict(FL['dp'], mode='client')), SIZES_K)
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.GaussianDpEvent(1.3), 7)
  assert privacy.epsilons(client, [7] * 3) == [accountant.get_epsilon(1e-5)] * 3


def test_fixed_local_steps_are_accounted_as_the_round_runs_them():
  """fl.local_steps: every center takes that many Poisson-sampled steps a round, and the
  accounting counts exactly those (the round's own num_steps under DP-SGD)."""
  fl = dict(CONFIGS['fed_avg'], batch_size=4, local_epochs=1, local_steps=5, rounds=1,
            dp=dict(mode='example', clip=1.0, noise_multiplier=1.0, delta=1e-5, seed=3))
  centers = mlp_centers()
  sizes = {f'c{k}': int(n) for k, n in enumerate(centers.sizes)}
  plan = privacy.plan(fl, sizes)
  assert plan.steps_per_round == (5, 5, 5)
  assert privacy.plan(dict(fl, local_steps=0), sizes).steps_per_round == (2, 3, 3)
  alg, round_fn = simulate.build(fl, mlp_loss)
  trainable, frozen = mlp_params()
  server, clients = alg.init(trainable, 3)
  _, _, metrics = round_fn(server, clients, frozen, centers, ALL, jax.random.key(0), 0)
  np.testing.assert_array_equal(metrics['num_steps'], plan.steps_per_round)


def test_orders_dp_accounting_leaves_out_stay_out_of_the_log_and_epsilon_is_its_own(caplog):
  # q=0.1, sigma=0.6: dp-accounting's series fails for the low fractional RDP orders, and it
  # warns once per order it leaves out.
  caplog.set_level(logging.DEBUG, logger='absl')
  direct = independent_epsilon(0.1, 0.6, 300, 1e-5)
  unconverged = [r for r in caplog.records if 'failed to converge' in r.getMessage()]
  assert len(unconverged) > 3  # what a user saw before
  caplog.clear()
  privacy._epsilon.cache_clear()  # pylint: disable=protected-access
  eps = privacy._epsilon('example', 0.1, 0.6, 300, 1e-5, 'rdp')  # pylint: disable=protected-access
  assert eps == direct
  assert not [r for r in caplog.records if 'failed to converge' in r.getMessage()]
  said = [r.getMessage() for r in caplog.records if 'did not converge' in r.getMessage()]
  assert said == [f'dp-accounting left out {len(unconverged)} RDP order(s) whose series did not '
                  'converge; epsilon is its minimum over the other orders']
  logging.getLogger('absl').warning('another warning')  # the filter is gone after the call
  assert caplog.records[-1].getMessage() == 'another warning'


def test_target_epsilon_calibrates_the_noise_to_the_most_exposed_center():
  plan = privacy.plan(dict(FL, dp=dict(FL['dp'], target_epsilon=3.0)), SIZES_K)
  assert plan.calibrated
  steps = [7 * s for s in plan.steps_per_round]
  eps = privacy.epsilons(plan, steps)
  assert max(eps) <= 3.0 and max(eps) > 2.95 and eps[2] == max(eps)
  assert independent_epsilon(32 / 168, plan.noise_multiplier * 0.98, steps[2], 1e-5) > 3.0


def test_plan_refuses_bad_settings_naming_key_and_center():
  with pytest.raises(ValueError, match=r"fl.dp.delta=0.002 .*center 'a' has n_k=973"):
    privacy.plan(dict(FL, dp=dict(FL['dp'], delta=2e-3)), SIZES_K)
  with pytest.raises(ValueError, match=r"center 'small' has n_k=20 <= fl.batch_size=32"):
    privacy.plan(FL, {'a': 973, 'small': 20})
  with pytest.raises(ValueError, match=r'fl.dp.accountant'):
    privacy.plan(dict(FL, dp=dict(FL['dp'], accountant='moments')), SIZES_K)
  assert privacy.plan(dict(FL, dp=dict(FL['dp'], mode='off')), SIZES_K) is None
