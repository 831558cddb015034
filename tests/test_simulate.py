"""The jitted round: batching, masks, participation, isolation, executions, recompiles, VGG smoke.

Most tests use the tiny MLP federation of ``mlp_federation.py``.
"""

import functools
import os
import subprocess
import sys
import textwrap

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedblood import algorithms, data
from fedblood.core import batches, simulate
from fedblood.model import classifier, models, partition

from mlp_federation import (ALL, CLASSES, CONFIGS, TRACES, assert_trees_close, assert_trees_equal,
                            cached_round, mlp_centers, mlp_loss, mlp_params, run_rounds)


def test_batches_visit_each_real_example_once_per_epoch():
  examples = {'i': jnp.arange(2 * 16).reshape(2, 16)}
  size, batch_size, epochs = 10, 4, 3
  batch_fn = batches.make_batch_fn(examples, 1, size, jax.random.key(0), batch_size, epochs)
  steps_per_epoch = -(-size // batch_size)
  orders = []
  for epoch in range(epochs):
    seen = []
    for s in range(steps_per_epoch):
      batch = batch_fn(jnp.int32(epoch * steps_per_epoch + s))
      seen += list(np.asarray(batch['i'])[np.asarray(batch['mask']) == 1])
    assert sorted(seen) == list(range(16, 16 + size))  # center 1's real rows, once each
    orders.append(seen)
  assert orders[0] != orders[1]  # a fresh order every epoch


@pytest.mark.parametrize('execution', ['vmap', 'loop'])
def test_each_center_runs_exactly_its_own_steps(execution):
  _, _, _, history = run_rounds('fed_dyn', execution, rounds=1)
  np.testing.assert_array_equal(history[0]['num_steps'], [2 * 2, 2 * 3, 2 * 3])


@pytest.mark.parametrize('name,execution', [('fed_dyn', 'loop'), ('fed_dyn', 'unroll'),
                                            ('scaffold', 'loop'), ('scaffold', 'auto')])
def test_vmap_loop_and_unroll_agree(name, execution):
  actives = [ALL, np.array([True, False, True]), np.array([False, True, True])]
  want = run_rounds(name, 'vmap', actives=actives)[1:]
  assert_trees_close(run_rounds(name, execution, actives=actives)[1:], want)


def test_padded_steps_change_nothing():
  """Center 0 (4 real steps) beside partners of at most 6 or 8 steps: bit-identical under vmap.

  The sizes keep sum(n), hence center 0's weight (FedDyn's alpha_0), the same.
  """
  long_ = mlp_centers()
  longer = long_._replace(sizes=jnp.asarray([5, 6, 15], jnp.int32))
  _, _, clients_a, hist_a = run_rounds('fed_dyn', 'vmap', rounds=1, centers=long_)
  _, _, clients_b, hist_b = run_rounds('fed_dyn', 'vmap', rounds=1, centers=longer)
  np.testing.assert_array_equal(hist_b[0]['num_steps'], [4, 4, 8])
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  assert_trees_equal(first(clients_a), first(clients_b))
  assert_trees_equal(first(hist_a[0]), first(hist_b[0]))
  # and equal (to rounding) to running center 0 alone for exactly its own steps
  _, _, clients_loop, _ = run_rounds('fed_dyn', 'loop', rounds=1, centers=long_)
  assert_trees_close(first(clients_loop), first(clients_a))


@pytest.mark.parametrize('execution', ['vmap', 'loop'])
@pytest.mark.parametrize('name', ['fed_dyn', 'scaffold'])
def test_inactive_center_state_is_untouched(name, execution):
  actives = [ALL, np.array([True, False, True])]
  _, _, before, _ = run_rounds(name, execution, rounds=1, actives=actives)
  _, _, after, history = run_rounds(name, execution, rounds=2, actives=actives)
  assert_trees_equal(jax.tree.map(lambda x: x[1], before), jax.tree.map(lambda x: x[1], after))
  assert not np.array_equal(jax.tree.leaves(before)[0][0], jax.tree.leaves(after)[0][0])
  assert all(float(m[1]) == 0 for m in history[1].values())


def test_changing_one_centers_data_leaves_the_others_bit_identical():
  centers = mlp_centers()
  examples = dict(centers.examples)
  examples['x'] = examples['x'].at[2].set(examples['x'][2] * -3 + 1)  # real and padding rows
  examples['y'] = examples['y'].at[2].set((examples['y'][2] + 1) % CLASSES)
  _, _, base_clients, base_hist = run_rounds('fed_dyn', 'vmap', rounds=1, centers=centers)
  _, _, clients, hist = run_rounds('fed_dyn', 'vmap', rounds=1,
                                   centers=centers._replace(examples=examples))
  for k in (0, 1):
    assert_trees_equal(jax.tree.map(lambda x: x[k], clients),
                       jax.tree.map(lambda x: x[k], base_clients))
    assert_trees_equal(jax.tree.map(lambda x: x[k], hist[0]),
                       jax.tree.map(lambda x: x[k], base_hist[0]))
  assert not np.array_equal(clients.lam['head']['bias'][2], base_clients.lam['head']['bias'][2])


class CountCompiles:
  """Counts XLA backend compilations (JAX's monitoring event) inside a ``with`` block."""
  EVENT = '/jax/core/compile/backend_compile_duration'

  def __enter__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    self.count += event == self.EVENT

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def test_compile_counter_sees_compiles():
  with CountCompiles() as compiles:
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
  assert compiles.count == 1


@pytest.mark.parametrize('execution', ['vmap', 'loop', 'unroll', 'auto'])
def test_later_rounds_do_not_recompile(execution):
  """After a first round, new round numbers, active masks and frozen values compile nothing."""
  alg, round_fn = cached_round('fed_dyn', execution)
  trainable, frozen = mlp_params()
  centers = mlp_centers()
  server, clients = alg.init(trainable, 3)
  server, clients, _ = round_fn(server, clients, frozen, centers, ALL, jax.random.key(0), 0)
  TRACES.clear()
  other_frozen = jax.tree.map(lambda x: x * 2, frozen)
  key = jax.random.key(0)
  with CountCompiles() as compiles:
    for r, active in enumerate([np.array([True, False, True]), np.array([False, True, False]),
                                ALL], start=1):
      server, clients, _ = round_fn(server, clients, other_frozen, centers, active, key, r)
    jax.block_until_ready(server)
  assert TRACES == [] and compiles.count == 0


@pytest.mark.parametrize('backend,devices,sizes,batch,want', [
    ('cpu', 1, (5, 12, 9), 4, 'loop'),
    ('cpu', 8, (5, 12, 9), 4, 'loop'),              # host devices share the same cores
    ('gpu', 1, (10298, 14514, 2513, 5000, 11353), 64, 'loop'),
    ('cuda', 8, (10298, 14514, 2513, 5000, 11353), 64, 'shard'),  # 227 <= 3/4 * 685 steps
    ('gpu', 4, (10298, 14514, 2513, 5000, 11353), 64, 'shard'),   # 2 * 227 = 454 <= 514
    ('gpu', 2, (10298, 14514, 2513, 5000, 11353), 64, 'loop'),    # 3 * 227 = 681 > 514
    ('tpu', 2, (100, 100, 100, 100), 10, 'shard'),
    ('tpu', 2, (100, 1, 1), 10, 'loop'),            # 2 * 10 steps > 3/4 * 12
])
def test_choose_execution(backend, devices, sizes, batch, want):
  assert simulate.choose_execution(sizes, batch_size=batch, local_epochs=1, backend=backend,
                                   num_devices=devices) == want


def test_local_steps():
  assert batches.local_steps(jnp.asarray([5, 12, 9, 0]), 4, 2) == [4, 6, 6, 0]
  assert batches.local_steps(jnp.asarray([5, 12, 9, 0]), 4, 1, fixed=7) == [7, 7, 7, 0]
  assert simulate.choose_execution((100, 1, 1), batch_size=10, local_epochs=1, backend='tpu',
                                   num_devices=2) == 'loop'
  # the same sizes with 10 steps at every center: 2 * 10 <= 3/4 * 30, the shard pays
  assert simulate.choose_execution((100, 1, 1), batch_size=10, local_epochs=1, backend='tpu',
                                   num_devices=2, local_steps=10) == 'shard'


def _real_rows(batch):
  return [int(i) for i in np.asarray(batch['i'])[np.asarray(batch['mask']) == 1]]


def test_fixed_local_steps_pass_after_pass_in_fresh_orders():
  """fl.local_steps: a small center makes several passes, each its real rows once in a new
  order; a large one stops part-way through its first pass, never visiting a row twice."""
  examples = {'i': jnp.arange(2 * 16).reshape(2, 16)}
  batch_fn = batches.make_batch_fn(examples, 1, 5, jax.random.key(0), 2, 1, local_steps=7)
  seen = [_real_rows(batch_fn(jnp.int32(s))) for s in range(7)]   # 3 steps a pass of 5 rows
  first, second = sum(seen[0:3], []), sum(seen[3:6], [])
  assert sorted(first) == sorted(second) == list(range(16, 21))
  assert first != second
  assert len(seen[6]) == 2 and set(seen[6]) <= set(range(16, 21))  # a third pass begun
  batch_fn = batches.make_batch_fn(examples, 0, 12, jax.random.key(1), 4, 1, local_steps=2)
  rows = sum((_real_rows(batch_fn(jnp.int32(s))) for s in range(2)), [])
  assert len(rows) == len(set(rows)) == 8 and set(rows) <= set(range(12))


@functools.lru_cache(maxsize=None)
def _fixed_round(execution, batch_size=4, local_epochs=1, local_steps=0):
  alg = algorithms.build(CONFIGS['fed_dyn'])
  return alg, simulate.build_round(alg, mlp_loss, batch_size=batch_size, local_epochs=local_epochs,
                                   local_steps=local_steps, execution=execution)


def _run_fixed(execution, rounds=2, **steps):
  alg, round_fn = _fixed_round(execution, **steps)
  trainable, frozen = mlp_params()
  server, clients = alg.init(trainable, 3)  # mlp_centers(): sizes 5, 12, 9
  history = []
  for r in range(rounds):
    server, clients, metrics = round_fn(server, clients, frozen, mlp_centers(), ALL,
                                        jax.random.key(42), r)
    history.append(metrics)
  return server, clients, history


def test_fixed_local_steps_give_every_center_the_same_steps_in_every_execution():
  want = _run_fixed('vmap', local_steps=5)
  for metrics in want[2]:
    np.testing.assert_array_equal(metrics['num_steps'], [5, 5, 5])  # sizes 5, 12, 9 at B=4
  assert_trees_close(_run_fixed('loop', local_steps=5), want)
  epochs = _run_fixed('loop')  # 2, 3, 3 steps: a different update
  assert not np.allclose(jax.tree.leaves(epochs[0])[0], jax.tree.leaves(want[0])[0])


def test_fixed_local_steps_equal_local_epochs_on_full_batches():
  """With one batch a pass (B >= Nmax) both settings take the same batches: bit-equal."""
  assert_trees_equal(_run_fixed('loop', batch_size=16, local_steps=3),
                     _run_fixed('loop', batch_size=16, local_epochs=3))


def test_fixed_local_steps_leave_an_empty_center_untouched():
  alg = algorithms.build(CONFIGS['fed_dyn'])
  client = jax.jit(simulate.client_fn(alg, mlp_loss, batch_size=4, local_epochs=1,
                                      local_steps=3), static_argnums=5)
  trainable, frozen = mlp_params()
  server, clients = alg.init(trainable, 3)
  state = jax.tree.map(lambda x: x[0], clients)
  centers = mlp_centers(sizes=(5, 12, 0))
  out = client(server, state, 1.0, frozen, centers.examples, 2, jnp.int32(0),
               jax.random.key(0), 0)
  assert int(out.metrics['num_steps']) == 0
  assert_trees_equal(out.local_params, alg.eval_params(server)['server'])
  assert int(client(server, state, 1.0, frozen, centers.examples, 1, jnp.int32(12),
                    jax.random.key(0), 0).metrics['num_steps']) == 3


@pytest.mark.parametrize('steps,epochs,message', [
    (-1, 1, r'fl\.local_steps must be >= 0 .*got -1'),
    (3, 2, r'fl\.local_steps=3 with fl\.local_epochs=2: .* set fl\.local_epochs=1')])
def test_fixed_local_steps_refused_when_they_cannot_run(steps, epochs, message):
  alg = algorithms.build(CONFIGS['fed_dyn'])
  with pytest.raises(ValueError, match=message):
    simulate.build_round(alg, mlp_loss, batch_size=4, local_epochs=epochs, local_steps=steps)


def test_auto_runs_what_it_chooses_with_identical_results():
  """On this CPU 'auto' is 'loop': bit-identical states and metrics; build's default is 'auto'."""
  actives = [ALL, np.array([True, False, True]), ALL]
  got = run_rounds('fed_dyn', 'auto', actives=actives)
  auto = cached_round('fed_dyn', 'auto')[1]
  assert auto.execution == 'auto' and auto.resolved(mlp_centers()).execution == 'loop'
  assert auto.resolved(mlp_centers()) is auto.resolved(mlp_centers())  # built once
  assert_trees_equal(got[1:], run_rounds('fed_dyn', 'loop', actives=actives)[1:])
  _, round_fn = simulate.build(dict(CONFIGS['fed_dyn'], batch_size=4, local_epochs=2), mlp_loss)
  assert round_fn.execution == 'auto'  # resolved at each call from the centers


def test_frozen_params_are_an_argument_not_a_constant():
  _, frozen = mlp_params()
  _, a, _, _ = run_rounds('fed_dyn', 'vmap', rounds=1, frozen=frozen)
  _, b, _, _ = run_rounds('fed_dyn', 'vmap', rounds=1, frozen=jax.tree.map(lambda x: x * 2, frozen))
  assert not np.allclose(a.params['head']['kernel'], b.params['head']['kernel'])


@pytest.mark.parametrize('execution', ['vmap', 'loop'])
def test_donation_consumes_states_but_never_the_callers_params(execution):
  alg, round_fn = cached_round('fed_dyn', execution)
  trainable, frozen = mlp_params()
  server, clients = alg.init(trainable, 3)
  new_server, _, _ = round_fn(server, clients, frozen, mlp_centers(), ALL, jax.random.key(0), 0)
  assert server.params['head']['bias'].is_deleted()
  assert not trainable['head']['bias'].is_deleted() and not frozen['embed']['kernel'].is_deleted()
  assert np.isfinite(new_server.params['head']['bias']).all()


def test_feddyn_converges_through_the_round_with_half_participation():
  """Least squares through Centers, masks and round_fn (full-batch steps): the weighted optimum."""
  rng = np.random.default_rng(0)
  sizes, dim = np.array([33, 60, 120, 250, 400]), 5
  x = np.zeros((5, 400, dim), np.float32)
  y = np.zeros((5, 400), np.float32)
  for k, n in enumerate(sizes):
    x[k, :n] = rng.normal(size=(n, dim))
    y[k, :n] = x[k, :n] @ (2 * rng.normal(size=dim)) + 0.5 * rng.normal(size=n)
  optimum = np.linalg.solve(np.einsum('kni,knj->ij', x, x).astype(np.float64),
                            np.einsum('kni,kn->i', x, y).astype(np.float64))
  centers = simulate.Centers({'x': jnp.asarray(x), 'y': jnp.asarray(y)}, jnp.asarray(sizes))

  def loss_fn(params, frozen, batch, rng):
    del frozen, rng
    residual = batch['x'] @ params - batch['y']
    return 0.5 * jnp.sum(batch['mask'] * residual ** 2) / jnp.sum(batch['mask']), {}

  alg = algorithms.fed_dyn(0.05, alpha=0.1)
  round_fn = simulate.build_round(alg, loss_fn, batch_size=400, local_epochs=50)
  server, clients = alg.init(jnp.zeros(dim), 5)
  draw = np.random.default_rng(1)
  for r in range(600):
    server, clients, _ = round_fn(server, clients, {}, centers, draw.random(5) < 0.5,
                                  jax.random.key(0), r)
  error = np.linalg.norm(server.params - optimum) / np.linalg.norm(optimum)
  assert error < 1e-4  # measured 8e-7


SHARD_SCRIPT = textwrap.dedent('''
  import jax, numpy as np
  import mlp_federation as t
  from fedblood.core import simulate
  assert jax.device_count() == 5, jax.devices()
  actives = [t.ALL, np.array([True, False, True]), t.ALL]
  _, *want = t.run_rounds('fed_dyn', 'vmap', actives=actives)
  for d in (2, 3, 4, 5):
    _, *got = t.run_rounds('fed_dyn', 'shard', actives=actives, devices=tuple(jax.devices()[:d]))
    t.assert_trees_close(got, want)
  print('shard ok')
''')


@pytest.mark.slow
def test_shard_over_2_to_5_fake_devices_matches_vmap():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=5',
             PYTHONPATH=os.pathsep.join([os.path.dirname(__file__),
                                         os.environ.get('PYTHONPATH', '')]))
  proc = subprocess.run([sys.executable, '-c', SHARD_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'shard ok' in proc.stdout


def test_bad_inputs_are_named():
  alg = algorithms.build(CONFIGS['fed_avg'])
  with pytest.raises(ValueError, match='fl.execution'):
    simulate.build_round(alg, mlp_loss, batch_size=4, local_epochs=1, execution='pmap')
  round_fn = simulate.build_round(alg, mlp_loss, batch_size=4, local_epochs=1)
  trainable, frozen = mlp_params()
  server, clients = alg.init(trainable, 3)
  centers = mlp_centers()
  with pytest.raises(ValueError, match="'mask'"):
    bad = dict(centers.examples, mask=centers.examples['y'])
    round_fn(server, clients, frozen, centers._replace(examples=bad), ALL, jax.random.key(0), 0)
  with pytest.raises(ValueError, match=r"examples\['y'\]"):
    bad = dict(centers.examples, y=centers.examples['y'][:2])
    round_fn(server, clients, frozen, centers._replace(examples=bad), ALL, jax.random.key(0), 0)
  with pytest.raises(ValueError, match='fl.batch_size'):
    simulate.build(dict(algorithm='fed_avg', lr=0.1, local_epochs=1), mlp_loss)


def test_round_carries_its_execution_and_jitted_parts():
  """A Round is data: the loop's two jitted steps ARE its round; 'vmap' has one whole program."""
  alg, loop = cached_round('fed_avg', 'loop')
  assert loop.execution == 'loop' and loop.jitted is None and loop.resolve is None
  trainable, frozen = mlp_params()
  centers, key = mlp_centers(), jax.random.key(3)
  active = np.array([True, False, True])
  outs = [loop.client_step(*alg.init(trainable, 3), frozen, centers, key, 1, k)
          for k in range(3)]
  by_parts = loop.server_step(*alg.init(trainable, 3), outs, centers.sizes, active)
  assert_trees_equal(by_parts, loop(*alg.init(trainable, 3), frozen, centers, active, key, 1))
  vmap = cached_round('fed_avg', 'vmap')[1]
  assert vmap.execution == 'vmap' and vmap.jitted is not None and vmap.client_step is None


@pytest.mark.parametrize('execution', ['vmap', 'loop'])
def test_compiler_options_reach_every_compile(execution):
  alg = algorithms.build(CONFIGS['fed_avg'])
  round_fn = simulate.build_round(alg, mlp_loss, batch_size=4, local_epochs=1,
                                  execution=execution,
                                  compiler_options={'xla_no_such_option_11a': True})
  trainable, frozen = mlp_params()
  with pytest.raises(Exception, match='xla_no_such_option_11a'):
    round_fn(*alg.init(trainable, 3), frozen, mlp_centers(), ALL, jax.random.key(0), 0)


# --- the classifier loss, predict, and a narrow VGG16 ---------------------------------------

@functools.lru_cache(maxsize=None)
def tiny_vgg():
  model = models.VGG16(width=1 / 16, head='gap', num_classes=3)
  # He-normal from numpy on eval_shape's tree: model.init takes ~9 s to compile on CPU.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(
      rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1])) if len(s.shape) > 1
      else np.zeros(s.shape), s.dtype), shapes)
  trainable, frozen = partition.split(params, partition.frozen_block_rules(3))
  return model, params, trainable, frozen, classifier.make_predict(model, batch_size=3)


def colour_centers(sizes=(6, 10, 4), seed=0):
  """Images whose class is the dominant colour channel: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  nmax = max(sizes)
  labels = rng.integers(0, 3, (len(sizes), nmax)).astype(np.int32)
  images = rng.integers(0, 100, (len(sizes), nmax, 32, 32, 3))
  images += 150 * np.eye(3, dtype=np.int64)[labels][:, :, None, None, :]
  return simulate.Centers({'image': jnp.asarray(images.astype(np.uint8)),
                           'label': jnp.asarray(labels)}, jnp.asarray(sizes, jnp.int32))


def test_predict_matches_model_apply_in_batches():
  model, params, trainable, frozen, predict = tiny_vgg()
  images = colour_centers().examples['image'][:2]  # [2, 10, 32, 32, 3]: 20 = 6 batches of 3 + 2
  logits = predict(trainable, frozen, images)
  want = jax.jit(model.apply)({'params': params}, images.reshape(20, 32, 32, 3) / 255.0)
  assert logits.shape == (2, 10, 3)
  np.testing.assert_allclose(logits.reshape(20, 3), want, rtol=1e-4, atol=1e-5)


def test_classifier_loss_counts_only_masked_in_rows():
  model, _, trainable, frozen, predict = tiny_vgg()
  centers = colour_centers()
  images, labels = centers.examples['image'][1, :6], centers.examples['label'][1, :6]
  loss_fn = jax.jit(classifier.classifier_loss(model))
  mask = jnp.array([1.0, 1, 1, 1, 0, 0])
  rng = jax.random.key(0)
  loss, aux = loss_fn(trainable, frozen, dict(image=images, label=labels, mask=mask), rng)
  junk = dict(image=images.at[4:].set(255), label=labels.at[4:].set(2), mask=mask)
  assert_trees_equal(loss_fn(trainable, frozen, junk, rng), (loss, aux))
  # the value: mean cross-entropy and accuracy of rows 0..3 (the gap head has no dropout)
  logits = predict(trainable, frozen, centers.examples['image'][:2])[1, :4]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[:4])
  np.testing.assert_allclose(loss, np.mean(ce), rtol=1e-5)
  np.testing.assert_allclose(aux['accuracy'], np.mean(np.argmax(logits, -1) == labels[:4]))


def test_logit_adjusted_loss_adds_tau_times_each_rows_log_prior():
  """fl.logit_adjust: the cross-entropy of logits + tau * log_prior (each row its own prior);
  tau 0 is the plain loss, and a prior that favours the true class lowers it."""
  model, _, trainable, frozen, predict = tiny_vgg()
  centers = colour_centers()
  images, labels = centers.examples['image'][1, :4], centers.examples['label'][1, :4]
  log_prior = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]] * 2, jnp.float32))
  batch, rng = dict(image=images, label=labels, log_prior=log_prior), jax.random.key(0)
  logits = predict(trainable, frozen, centers.examples['image'][:2])[1, :4]
  for tau in (0.0, 0.5, 1.0):
    loss, _ = classifier.classifier_loss(model, logit_adjust=tau)(trainable, frozen, batch, rng)
    want = optax.softmax_cross_entropy_with_integer_labels(logits + tau * log_prior, labels)
    np.testing.assert_allclose(loss, np.mean(want), rtol=1e-5)
  plain = classifier.classifier_loss(model)(trainable, frozen, batch, rng)[0]
  sure = dict(batch, log_prior=jnp.log(jax.nn.one_hot(labels, 3) * 0.9 + 0.05))
  assert classifier.classifier_loss(model, logit_adjust=1.0)(trainable, frozen, sure, rng)[0] < plain
  with pytest.raises(KeyError, match="needs batch\\['log_prior'\\]"):
    classifier.classifier_loss(model, logit_adjust=1.0)(trainable, frozen,
                                                        dict(image=images, label=labels), rng)


def test_pad_centers_gives_every_row_its_centers_smoothed_log_prior():
  split = lambda labels: data.Split(np.zeros((len(labels), 4, 4, 3), np.uint8),
                                    np.asarray(labels, np.int32), [''] * len(labels))
  centers = simulate.pad_centers([split([0, 0, 0, 2]), split([1, 2])], num_classes=3)
  log_prior = np.asarray(centers.examples['log_prior'])
  assert log_prior.shape == (2, 4, 3)
  want = np.log(np.array([[4, 1, 2], [1, 2, 2]]) / np.array([[7], [5]]))  # (n_c + 1) / (n + K)
  np.testing.assert_allclose(log_prior, np.broadcast_to(want[:, None], (2, 4, 3)), rtol=1e-6)
  assert 'log_prior' not in simulate.pad_centers([split([0, 1])]).examples
  # A site pads its own split alone to the federation's Nmax: the same rows.
  site = simulate.pad_centers([split([1, 2])], 4, num_classes=3).examples['log_prior']
  np.testing.assert_array_equal(site[0], log_prior[1])
  with pytest.raises(ValueError, match='label >= num_classes=2'):
    simulate.pad_centers([split([0, 2])], num_classes=2)


@pytest.mark.parametrize('dp', [None, dict(mode='client', clip=100.0, noise_multiplier=0.0,
                                            seed=0)], ids=['no_dp', 'client_dp'])
def test_logit_adjust_reaches_the_round_and_changes_training(dp):
  """fl.logit_adjust through rounds.spec: the round's loss adds the prior, and centers whose
  class mixes differ train otherwise than without it; also under client-level DP, which wraps
  the algorithm and keeps the centers' adjusted loss."""
  from fedblood.core import rounds  # pylint: disable=g-import-not-at-top
  from fedblood.study import experiment  # pylint: disable=g-import-not-at-top
  model, _, trainable, frozen, _ = tiny_vgg()
  fl = dict(algorithm='fed_avg', lr=0.05, batch_size=4, local_epochs=1, execution='loop')
  if dp is not None:
    fl['dp'] = dp
  loss = experiment.Loss(model, None)
  assert rounds.local_loss(rounds.spec(loss, fl)) == loss
  assert rounds.local_loss(rounds.spec(loss, dict(fl, logit_adjust=1.0))) == loss._replace(
      logit_adjust=1.0)
  assert rounds.prior_classes(dict(fl, logit_adjust=1.0), 3) == 3
  assert rounds.prior_classes(fl, 3) == rounds.prior_classes(dict(fl, logit_adjust=0.0), 3) == 0
  sizes = (6, 10, 4)
  base = colour_centers(sizes)
  splits = [data.Split(np.asarray(base.examples['image'][k, :n]),
                       np.asarray(base.examples['label'][k, :n]), [''] * n)
            for k, n in enumerate(sizes)]
  out = {}
  for tau in (0.0, 1.0):
    alg, round_fn = rounds.compiled(rounds.spec(loss, dict(fl, logit_adjust=tau)))
    centers = simulate.pad_centers(splits, None, rounds.prior_classes(dict(fl, logit_adjust=tau), 3))
    server, _, _ = round_fn(*alg.init(trainable, 3), frozen, centers, ALL, jax.random.key(0), 1)
    out[tau] = server
  diff = max(float(jnp.max(jnp.abs(a - b)))
             for a, b in zip(jax.tree.leaves(out[0.0]), jax.tree.leaves(out[1.0])))
  assert diff > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_vgg16_smoke_round_every_algorithm(name):
  """Narrow VGG16, blocks 1-3 frozen: finite, loss falls, frozen leaves bit-identical."""
  model, params, trainable, frozen, _ = tiny_vgg()
  cfg = dict(CONFIGS[name], lr=0.05, alpha=0.01)
  alg = algorithms.build(cfg)
  round_fn = simulate.build_round(alg, classifier.classifier_loss(model), batch_size=4,
                                  local_epochs=2, execution='loop')
  centers = colour_centers()
  server, clients = alg.init(trainable, 3)
  losses = []
  for r in range(4):
    server, clients, metrics = round_fn(server, clients, frozen, centers, ALL,
                                        jax.random.key(0), r)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves((server, clients, metrics)))
    losses.append(float(np.mean(metrics['loss'])))
  assert losses[-1] < losses[0] - 0.05, losses
  for model_params in alg.eval_params(server).values():
    merged = partition.merge(model_params, frozen)
    flat_new = traverse_util.flatten_dict(merged, sep='/')
    for path, leaf in traverse_util.flatten_dict(params, sep='/').items():
      if path.startswith(('block1/', 'block2/', 'block3/')):
        np.testing.assert_array_equal(flat_new[path], leaf)
      else:
        assert not np.array_equal(flat_new[path], leaf), path


@pytest.mark.slow
def test_vgg16_vmap_equals_loop():
  model, _, trainable, frozen, _ = tiny_vgg()
  centers = colour_centers()
  results = {}
  for execution in ('vmap', 'loop'):
    alg = algorithms.build(dict(CONFIGS['fed_dyn'], lr=0.05))
    round_fn = simulate.build_round(alg, classifier.classifier_loss(model), batch_size=4,
                                    local_epochs=1, execution=execution)
    server, clients = alg.init(trainable, 3)
    for r, active in enumerate([ALL, np.array([True, False, True])]):
      server, clients, metrics = round_fn(server, clients, frozen, centers, active,
                                          jax.random.key(0), r)
    results[execution] = (server, clients, metrics)
  assert_trees_close(results['loop'], results['vmap'], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('execution', ['vmap', 'loop'])
def test_lr_decay_reaches_every_center_through_the_traced_round(execution):
  # fl.lr_decay: the round's own index (traced, no recompile) sets each center's local lr,
  # lr * decay**(r - 1): round 4 with decay 0.8 is round 4 of a constant lr 0.1 * 0.8**3.
  trainable, frozen = mlp_params()
  centers, key = mlp_centers(), jax.random.key(5)

  def round_at(r, **cfg):
    alg = algorithms.build(dict(CONFIGS['scaffold'], **cfg))
    round_fn = simulate.build_round(alg, mlp_loss, batch_size=4, local_epochs=2,
                                    execution=execution)
    return round_fn(*alg.init(trainable, 3), frozen, centers, ALL, key, r)

  decayed = [round_at(r, lr_decay=0.8) for r in (1, 4)]
  assert_trees_close(decayed[1], round_at(4, lr=0.1 * 0.8 ** 3))
  assert_trees_close(decayed[0], round_at(1))
  moved = lambda out: jax.tree.leaves(out[0].params)[0] - jax.tree.leaves(trainable)[0]
  assert float(jnp.abs(moved(round_at(4)) - moved(decayed[1])).max()) > 1e-3
