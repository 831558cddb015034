"""What a deployed server or site accepts off the wire (no processes; Flower's real records)."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('flwr')

from flwr.app import Array, ArrayRecord  # pylint: disable=g-import-not-at-top

from fedblood.deploy import study, wire  # pylint: disable=g-import-not-at-top

TEMPLATE = {'block4': {'kernel': jnp.zeros((3, 3, 2, 4)), 'bias': jnp.zeros(4)},
            'steps': jnp.zeros((), jnp.int32)}


def _tree(**changes):
  tree = {'block4': {'kernel': np.ones((3, 3, 2, 4), np.float32), 'bias': np.ones(4, np.float32)},
          'steps': np.int32(3)}
  for name, array in changes.items():
    *parents, leaf = name.split('__')
    node = tree
    for key in parents:
      node = node[key]
    node[leaf] = array
  return tree


def _record(**changes):
  return wire.to_record(_tree(**changes))


def test_round_trip_is_exact_in_two_arrays():
  record = _record()
  assert wire.check_tree(record, TEMPLATE, 'params') is None
  back = wire.from_record(record, TEMPLATE)
  assert sorted(record.keys()) == ['data', 'layout']  # two objects on the wire, not one per leaf
  assert record['data'].numpy().size == (3 * 3 * 2 * 4 + 4 + 1) * 4
  np.testing.assert_array_equal(back['block4']['kernel'], np.ones((3, 3, 2, 4), np.float32))
  assert back['steps'].dtype == np.int32 and int(back['steps']) == 3
  rng = np.random.default_rng(0)
  tree = _tree(block4__kernel=rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
               block4__bias=rng.normal(size=4).astype(np.float32))
  back = wire.from_record(wire.to_record(tree), TEMPLATE)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
    assert a.tobytes() == b.tobytes() and a.dtype == b.dtype and a.shape == b.shape


@pytest.mark.parametrize('changes, reason', [
    ({'block4__bias': np.ones(5, np.float32)}, 'params/block4/bias: float32[5], expected '
                                               'float32[4]'),
    ({'block4__bias': np.ones(4, np.float64)}, 'params/block4/bias: float64[4], expected '
                                               'float32[4]'),
    ({'block4__kernel': np.full((3, 3, 2, 4), np.inf, np.float32)},
     'params/block4/kernel: non-finite values'),
    ({'block4__bias': np.array([1, np.nan, 0, 0], np.float32)},
     'params/block4/bias: non-finite values'),
    ({'extra': np.ones(1, np.float32)}, "unexpected ['extra']"),
])
def test_bad_trees_are_refused_with_the_leaf_named(changes, reason):
  got = wire.check_tree(_record(**changes), TEMPLATE, 'params')
  assert got is not None and reason in got


def test_missing_record_leaf_or_array_and_data_that_disagrees_with_its_layout():
  assert wire.check_tree(None, TEMPLATE, 'state') == 'state: missing'
  tree = _tree()
  del tree['steps']
  assert "missing ['steps']" in wire.check_tree(wire.to_record(tree), TEMPLATE, 'params')
  record = _record()
  del record['data']
  assert wire.check_tree(record, TEMPLATE, 'params').startswith("params: holds ['layout']")
  record = _record()
  record['data'] = Array(record['data'].numpy()[:-4])  # the layout says 4 bytes more
  assert wire.check_tree(record, TEMPLATE, 'params') == 'params/data: 304 bytes, expected 308'
  record = _record()
  record['layout'] = Array(np.frombuffer(b'{not json', np.uint8).copy())
  assert wire.check_tree(record, TEMPLATE, 'params').startswith('params/layout: unreadable')
  record = _record()  # a dtype numpy does not know: refused, named, never raised
  layout = [['block4/bias', 'zz', [4]], ['block4/kernel', '<f4', [3, 3, 2, 4]], ['steps', '<i4', []]]
  record['layout'] = Array(np.frombuffer(json.dumps(layout).encode(), np.uint8).copy())
  assert wire.check_tree(record, TEMPLATE, 'params') == (
      "params/block4/bias: 'zz'[4], expected float32[4]")
  record = _record()
  record['data'] = Array(record['data'].numpy().view(np.float32))
  assert 'params/data: float32[77], expected a 1-D uint8 array' in wire.check_tree(
      record, TEMPLATE, 'params')


class _Boom:
  def __reduce__(self):
    return (exec, ("raise SystemExit('unpickled!')",))


@pytest.mark.parametrize('key', ['data', 'layout'])
def test_a_pickle_on_the_wire_is_never_unpickled(key):
  buf = io.BytesIO()
  np.save(buf, np.array([_Boom()], dtype=object), allow_pickle=True)
  assert b'unpickled!' in buf.getvalue()  # a real pickle payload, executed if ever loaded
  record = _record()
  record[key] = Array(dtype='uint8', shape=(4,), stype='numpy.ndarray', data=buf.getvalue())
  got = wire.check_tree(record, TEMPLATE, 'params')
  assert got.startswith(f'params/{key}: unreadable')


def test_load_config_overrides_and_their_errors(tmp_path):
  spec = 'configs/demo.py:smoke'
  config = wire.load_config(spec, "fl.rounds=2 fl.algorithm='scaffold' model.width=0.0625")
  assert (config.fl.rounds, config.fl.algorithm, config.model.width) == (2, 'scaffold', 0.0625)
  with pytest.raises(ValueError, match="no such config field 'fl.round'"):
    wire.load_config(spec, 'fl.round=2')
  with pytest.raises(ValueError, match='not key=value'):
    wire.load_config(spec, 'fl.rounds')
  with pytest.raises(FileNotFoundError, match='nope.py'):
    wire.load_config(str(tmp_path / 'nope.py'))


def test_center_names_follow_the_simulation_and_need_data_centers_for_real_data():
  config = wire.load_config('configs/demo.py:smoke')
  assert study.center_names(config.data) == ('synth0', 'synth1', 'synth2')
  config.data.source = 'folder'
  with pytest.raises(ValueError, match='data.centers must list'):
    study.center_names(config.data)
  config.data.centers, config.data.reference = ('a', 'b', 'pbc'), 'pbc'
  assert study.center_names(config.data) == ('pbc', 'a', 'b')


def test_a_site_reads_its_center_with_its_own_crop(tmp_path, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fake_images import make_class_tree  # pylint: disable=g-import-not-at-top
  from fedblood import data  # pylint: disable=g-import-not-at-top
  for lab in ('far', 'near'):
    make_class_tree(str(tmp_path / 'wbc' / lab), {'neutrophil': 6, 'eosinophil': 6})
  config = ml_collections.ConfigDict({'data': data.default_config()})
  config.data.update(source='folder', root=str(tmp_path / 'wbc'), image_size=32,
                     cache_dir=str(tmp_path / 'cache'), crop={'far': 0.5, 'near': 1.0})
  together = {c.name: c for c in data.load_centers(config.data)}
  for name in ('far', 'near'):
    with caplog.at_level(logging.WARNING):
      site = study.load_site_center(config.data, name, {'cache-dir': str(tmp_path / 'site_cache')})
    np.testing.assert_array_equal(site.train.images, together[name].train.images)
    assert not [r for r in caplog.records if 'data.crop' in r.getMessage()]  # no other sites'
