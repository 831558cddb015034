"""Orbax checkpoints: exact round trip, last-K + best retention, shape refusal, inspect."""

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedblood.model import models, partition
from fedblood.rundir import checkpoint, checkpoint_listing, step_files
from fedblood.rundir import workdir as workdir_lib


def _state(seed, width=0.125):
  # Shapes from eval_shape (no convolution runs), values from numpy: fast and exact.
  model = models.VGG16(num_classes=5, head='gap', width=width)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  np_rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(np_rng.normal(size=s.shape), s.dtype), shapes)
  trainable, frozen = partition.split(params, partition.frozen_block_rules(3))
  clients = jax.tree.map(lambda x: jnp.stack([x, 2 * x, 3 * x]), trainable)
  return {'server': trainable, 'clients': clients, 'rng': jax.random.key(seed)}, frozen


def test_round_trip_is_exact_and_keys_survive(tmp_path):
  state, frozen = _state(0)
  mngr = checkpoint.manager(tmp_path / 'fl', keep=2)
  meta = {'kind': 'round', 'round': 1, 'metrics': {'val_accuracy': 0.5},
          'params': checkpoint_listing.param_summary(state['server'], frozen, 'VGG16')}
  checkpoint.save(mngr, 1, state, meta)
  restored, restored_meta = checkpoint.restore(mngr, state)
  assert restored_meta == meta
  for a, b in zip(jax.tree.leaves(restored['server']), jax.tree.leaves(state['server'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(restored['clients']['head']['out']['kernel'][2],
                                3 * state['server']['head']['out']['kernel'])
  # The key comes back as its raw data; wrapping it gives the same random stream.
  key = jax.random.wrap_key_data(restored['rng'])
  np.testing.assert_array_equal(jax.random.normal(key, (4,)), jax.random.normal(state['rng'], (4,)))


def test_keeps_last_k_plus_best(tmp_path):
  state, _ = _state(0)
  mngr = checkpoint.manager(tmp_path / 'fl', keep=2, best_metric='val_accuracy')
  vals = [0.2, 0.9, 0.4, 0.3, 0.1, 0.35]
  for step, v in enumerate(vals, start=1):
    checkpoint.save(mngr, step, state, {'kind': 'round', 'metrics': {'val_accuracy': v},
                                        'best_metric': 'val_accuracy'},
                    metrics={'val_accuracy': v})
  assert list(mngr.all_steps()) == [2, 5, 6]  # best (0.9 at step 2) + last two
  # A new manager on the same directory (a resumed run) sees the same steps.
  again = checkpoint.manager(tmp_path / 'fl', keep=2, best_metric='val_accuracy')
  assert again.latest_step() == 6 and list(again.all_steps()) == [2, 5, 6]


def test_refuses_other_model_shape(tmp_path):
  state, _ = _state(0, width=0.125)
  mngr = checkpoint.manager(tmp_path / 'fl', keep=1)
  checkpoint.save(mngr, 3, state, {'kind': 'round'})
  other, _ = _state(0, width=0.25)
  with pytest.raises(checkpoint.ShapeMismatchError,
                     match=r'(?s)different model.*\n.*clients/block4/conv1/kernel: checkpoint '
                           r'float32\[3, 3, 3, 32, 64\], this config float32\[3, 3, 3, 64, 128\]'):
    checkpoint.restore(mngr, other)
  # Nothing lost: the original still restores.
  restored, _ = checkpoint.restore(mngr, state, step=3)
  assert restored['server']['head']['out']['kernel'].shape == (64, 5)


def test_missing_step(tmp_path):
  state, _ = _state(0)
  mngr = checkpoint.manager(tmp_path / 'fl')
  with pytest.raises(FileNotFoundError, match='no checkpoint step None'):
    checkpoint.restore(mngr, state)


def test_inspect_lists_steps_metrics_and_counts(tmp_path):
  state, frozen = _state(0)
  mngr = checkpoint.manager(tmp_path / 'checkpoints' / 'fl', keep=3, best_metric='val_accuracy')
  summary = checkpoint_listing.param_summary(state['server'], frozen, 'VGG16')
  for step, v in ((1, 0.25), (2, 0.75), (3, 0.5)):
    checkpoint.save(mngr, step, state, {'kind': 'round', 'metrics': {'val_accuracy': v},
                                        'best_metric': 'val_accuracy', 'params': summary},
                    metrics={'val_accuracy': v})
  text = checkpoint_listing.inspect(tmp_path)
  # Width 1/8 VGG16: blocks 1-3 = 8,16,32 channels; trainable = blocks 4-5 (64 ch) + head.
  frozen_count = (3 * 3 * 3 * 8 + 8 + 3 * 3 * 8 * 8 + 8 + 3 * 3 * 8 * 16 + 16 + 3 * 3 * 16 * 16 + 16
                  + 3 * 3 * 16 * 32 + 32 + 2 * (3 * 3 * 32 * 32 + 32))
  trainable_count = (3 * 3 * 32 * 64 + 64 + 5 * (3 * 3 * 64 * 64 + 64) + 64 * 5 + 5)
  assert summary['frozen'] == frozen_count and summary['trainable'] == trainable_count
  assert '[fl] steps [1, 2, 3]' in text
  assert 'round 2 (best): val_accuracy 0.7500' in text
  assert (f'trainable {trainable_count:,} scalars in 14 leaves, '
          f'frozen {frozen_count:,} in 14 leaves') in text
  assert f'clients {3 * trainable_count:,} scalars / 14 leaves' in text
  with pytest.raises(FileNotFoundError, match='no checkpoints/ directory'):
    checkpoint_listing.inspect(tmp_path / 'nope')


def test_checksums_catch_damage_orbax_reads_without_noticing(tmp_path):
  config = ml_collections.ConfigDict({'seed': 0, 'fl': {'rounds': 3}})
  workdir_lib.write_config(config, tmp_path)
  stage = workdir_lib.checkpoints(tmp_path, 'fl')
  mngr = checkpoint.manager(stage, keep=2)
  for step in (1, 2):
    checkpoint.save(mngr, step, {'x': np.arange(64.0) * step}, {'round': step})
  mngr.close()
  meta = json.loads((stage / '2' / 'meta' / 'metadata').read_text())
  assert meta['fingerprint'] == workdir_lib.fingerprint(config).digest
  assert meta['config'] == workdir_lib.config_dict(config)
  array = max((p for p in (stage / '2' / 'state').rglob('*') if p.is_file()),
              key=lambda p: p.stat().st_size)
  data = bytearray(array.read_bytes())
  data[-8:] = bytes(8)
  array.write_bytes(bytes(data))
  mngr = checkpoint.manager(stage, keep=2)
  with pytest.raises(step_files.ChecksumError, match=rf'{re.escape(str(array))} differs from its '
                                                     'checksum'):
    checkpoint.check_step(mngr, 2)
  state, meta = checkpoint.restore_latest(mngr, {'x': np.zeros(64)})
  assert meta['round'] == 1 and (stage.parent / 'fl.corrupt' / '2').is_dir()
  mngr.close()
  # The same steps under another config: refused (not set aside), naming the fields.
  other = ml_collections.ConfigDict({'seed': 0, 'fl': {'rounds': 4}})
  mngr = checkpoint.manager(stage, fingerprint=workdir_lib.fingerprint(other))
  with pytest.raises(checkpoint.FingerprintMismatchError,
                     match=r'step 1 of .* another config .*\n  fl\.rounds: 3 in the checkpoint, 4 '
                           'in this run'):
    checkpoint.restore_latest(mngr, {'x': np.zeros(64)})
  assert list(mngr.all_steps()) == [1]
  mngr.close()
  # Outside a workdir (a deployed site's state): checksums, no fingerprint.
  bare = checkpoint.manager(tmp_path / 'site_state')
  checkpoint.save(bare, 1, {'x': np.ones(3)}, {})
  assert 'fingerprint' not in checkpoint.restore(bare, {'x': np.zeros(3)})[1]
  bare.close()
