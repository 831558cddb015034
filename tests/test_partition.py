"""Tests for fedblood.model.partition: exact labels, split/merge, rule errors, masked optimizers."""

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedblood.model import models
from fedblood.model import partition

VGG16_CONVS = (2, 2, 3, 3, 3)
# rbg: XLA:CPU compiles a VGG init with threefry keys several times slower.
KEY = jax.random.key(0, impl='rbg')


def conv_paths(blocks):
  return {f'block{b}/conv{c}/{k}' for b in blocks for c in range(1, VGG16_CONVS[b - 1] + 1)
          for k in ('kernel', 'bias')}


def flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


@pytest.fixture(scope='module')
def full_shapes():
  """Full-width VGG16 with the fc head, shapes only (jax.eval_shape: nothing computed)."""
  model = models.VGG16(num_classes=5, head='fc')
  return jax.eval_shape(model.init, KEY, jnp.zeros((1, 224, 224, 3)))['params']


@pytest.fixture(scope='module')
def small():
  model = models.VGG16(num_classes=5, head='gap', width=1 / 16)
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  return model, jax.jit(model.init)(KEY, x)['params'], x


def test_frozen_block_rules():
  assert partition.frozen_block_rules(0) == (('.*', 'train'),)
  assert partition.frozen_block_rules(3) == (('block[1-3]/.*', 'freeze'), ('.*', 'train'))
  for bad in (-1, 6):
    with pytest.raises(ValueError, match=rf'model\.frozen_blocks must be in 0\.\.5, got {bad}'):
      partition.frozen_block_rules(bad)


@pytest.mark.parametrize('frozen_blocks', range(6))
def test_labels_freeze_exactly_the_first_blocks(full_shapes, frozen_blocks):
  labels = flat(partition.labels(full_shapes, partition.frozen_block_rules(frozen_blocks)))
  frozen = {path for path, label in labels.items() if label == 'freeze'}
  assert frozen == conv_paths(range(1, frozen_blocks + 1))
  assert set(labels) == set(flat(full_shapes))
  assert {labels[f'head/{layer}/kernel'] for layer in ('fc1', 'fc2', 'out')} == {'train'}


def test_paper_setting_spelled_out(full_shapes):
  trainable, frozen = partition.split(full_shapes, partition.frozen_block_rules(3))
  assert set(flat(frozen)) == {
      'block1/conv1/kernel', 'block1/conv1/bias', 'block1/conv2/kernel', 'block1/conv2/bias',
      'block2/conv1/kernel', 'block2/conv1/bias', 'block2/conv2/kernel', 'block2/conv2/bias',
      'block3/conv1/kernel', 'block3/conv1/bias', 'block3/conv2/kernel', 'block3/conv2/bias',
      'block3/conv3/kernel', 'block3/conv3/bias'}
  assert sorted(trainable) == ['block4', 'block5', 'head']
  # VGG16 blocks 1-3: 1,735,488 params; the rest of the 5-class fc-head net trains.
  assert partition.count(frozen) == 1_735_488
  assert partition.count(trainable) == 134_281_029 - 1_735_488


@pytest.mark.parametrize('frozen_blocks', [0, 3, 5])
def test_split_merge_round_trip_is_bit_identical(small, frozen_blocks):
  _, params, _ = small
  trainable, frozen = partition.split(params, partition.frozen_block_rules(frozen_blocks))
  assert set(flat(frozen)) == conv_paths(range(1, frozen_blocks + 1))
  merged = partition.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for path, leaf in flat(params).items():
    assert flat(merged)[path] is leaf  # the same arrays, not copies
  assert partition.count(trainable) + partition.count(frozen) == partition.count(params)


def test_uncovered_param_is_an_error(small):
  _, params, _ = small
  with pytest.raises(ValueError, match=r"parameter 'block4/conv1/\w+' is covered by no "
                                       r"partition rule \['block\[1-3\]/\.\*'\]"):
    partition.labels(params, (('block[1-3]/.*', 'freeze'),))


@pytest.mark.parametrize('rules, unused', [
    ((('blok1/.*', 'freeze'), ('.*', 'train')), 'blok1/.*'),       # a typo
    ((('.*', 'train'), ('block1/.*', 'freeze')), 'block1/.*'),     # shadowed: first match wins
    ((('block1', 'freeze'), ('.*', 'train')), 'block1'),           # fullmatch, not search
])
def test_unused_rule_is_an_error(small, rules, unused):
  _, params, _ = small
  with pytest.raises(ValueError, match=rf"partition rules \['{unused}'\] match no parameter"):
    partition.labels(params, rules)


def test_bad_label_and_overlapping_merge(small):
  _, params, _ = small
  with pytest.raises(ValueError, match=r"has label 'frozen'; use one of \('train', 'freeze'\)"):
    partition.labels(params, (('.*', 'frozen'),))
  trainable, frozen = partition.split(params, partition.frozen_block_rules(1))
  with pytest.raises(ValueError, match=r"\['block1/conv1/bias', 'block1/conv1/kernel'"):
    partition.merge(params, frozen)
  assert partition.count(partition.merge(trainable, {})) == partition.count(trainable)


def test_masked_adam_leaves_frozen_params_bit_identical(small):
  model, params, x = small
  rules = partition.frozen_block_rules(3)
  tx = partition.masked(optax.adam(1e-2), params, rules)
  labels = jax.random.randint(jax.random.key(2), (x.shape[0],), 0, 5)

  def loss_fn(p):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(p, opt_state):
    grads = jax.grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  opt_state = tx.init(params)
  # Adam keeps moments for the trainable params only.
  train_state = opt_state.inner_states['train'].inner_state[0]
  trainable, frozen = partition.split(params, rules)
  assert sum(x.size for x in jax.tree.leaves(train_state.mu)) == partition.count(trainable)
  new = params
  for _ in range(3):
    new, opt_state = step(new, opt_state)
  for path, leaf in flat(params).items():
    if path in flat(frozen):
      np.testing.assert_array_equal(flat(new)[path], leaf, err_msg=path)
    else:
      assert not np.array_equal(flat(new)[path], leaf), f'{path} did not train'
  assert float(loss_fn(new)) < float(loss_fn(params))
