"""The round builder: its cache key changes exactly when a setting the round reads changes, and
a site's compiled step is the round's own."""

import jax
import pytest

from configs import demo  # importable: pyproject sets pytest's pythonpath to the repo root
from fedblood.algorithms import base
from fedblood.core import rounds
from fedblood.study import experiment
from mlp_federation import CONFIGS, assert_trees_equal, mlp_centers, mlp_loss, mlp_params

# Fields of config.fl the compiled round does not read (the run's length, evaluation and
# participation, DP accounting): changing them must not change the key.
NOT_READ = ('rounds', 'init', 'eval_model', 'select', 'participation', 'holdout',
            'dp.target_epsilon', 'dp.delta', 'dp.accountant')


def _fl():
  config = demo.get_config('smoke')
  config.fl.dp.mode = 'example'  # so that the dp fields the round reads are read
  return config.fl


def _leaves(d, prefix=''):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def _changed(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 1
  if isinstance(value, str):
    return value + '_other'
  return tuple(value) + ('x',)


def test_the_key_changes_exactly_with_the_fields_the_round_reads():
  fl = _fl()
  base = rounds.spec(mlp_loss, fl)
  leaves = dict(_leaves(fl.to_dict()))
  assert set(NOT_READ) <= set(leaves)
  for path, value in leaves.items():
    other = _fl()
    *parents, name = path.split('.')
    node = other
    for p in parents:
      node = node[p]
    node[name] = _changed(value)
    changed = rounds.spec(mlp_loss, other) != base
    assert changed == (path not in NOT_READ), path


def test_the_key_holds_the_model_and_the_calibrated_noise():
  config = demo.get_config('smoke')
  other = demo.get_config('smoke')
  other.model.width = other.model.width * 2
  loss, other_loss = experiment.build(config).loss, experiment.build(other).loss
  assert rounds.spec(loss, config.fl) == rounds.spec(experiment.build(config).loss, config.fl)
  assert rounds.spec(loss, config.fl) != rounds.spec(other_loss, config.fl)
  fl = _fl()
  plan = type('Plan', (), {'noise_multiplier': 3.5})()
  assert rounds.spec(mlp_loss, fl, plan).dp.noise_multiplier == 3.5
  fl.dp.mode = 'off'
  assert rounds.spec(mlp_loss, fl).dp is None


def test_compiled_is_cached_on_the_spec():
  fl = _fl()
  fl.dp.mode = 'off'
  spec = rounds.spec(mlp_loss, fl)
  algorithm, round_fn = rounds.compiled(spec)
  assert rounds.compiled(rounds.spec(mlp_loss, fl)) == (algorithm, round_fn)
  fl.rounds = 99
  assert rounds.compiled(rounds.spec(mlp_loss, fl))[1] is round_fn
  fl.lr = fl.lr * 2
  assert rounds.compiled(rounds.spec(mlp_loss, fl))[1] is not round_fn
  with pytest.raises(ValueError, match='form must be one of'):
    rounds.compiled(spec, 'other')


def test_a_sites_client_step_takes_the_simulations_fixed_local_steps():
  """The deployed site's compiled step (form 'client') runs fl.local_steps as the round does:
  the same update as the simulation's own step for that center, to the bit."""
  fl = dict(CONFIGS['fed_dyn'], batch_size=4, local_epochs=1, local_steps=5, execution='loop')
  spec = rounds.spec(mlp_loss, fl)
  _, site_step = rounds.compiled(spec, 'client')
  algorithm, round_fn = rounds.compiled(spec)
  trainable, frozen = mlp_params()
  server, clients = algorithm.init(trainable, 3)
  centers, key, k = mlp_centers(), jax.random.key(7), 1
  want = round_fn.client_step(server, clients, frozen, centers, key, 2, k)
  own = jax.tree.map(lambda x: x[k:k + 1], centers.examples)  # the site's data alone
  got = site_step(server, jax.tree.map(lambda x: x[k], clients),
                  base.client_weights(centers.sizes)[k], frozen, own, centers.sizes[k],
                  jax.random.fold_in(jax.random.fold_in(key, 2), k), 2)
  assert int(got.metrics['num_steps']) == 5
  assert_trees_equal(got, want)
