"""Issue 13: a reference recipe that cannot stop at peak lr, strongest baselines, held-out
centers, a second numerics path."""

import json
import re
import os
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common, wbc
from fedblood import data, stats
from fedblood.backend import flags, numerics
from fedblood.model import metrics, models, partition
from fedblood.study import centralized, experiment, inference, selection, train
from fedblood.study import validate
from fedblood.study.stages import baselines
from study_helpers import assert_same_tree, fl_state, smoke_config

ROOT = Path(__file__).resolve().parents[1]


def _recipe(**overrides):
  r = common.recipe(epochs=10, batch_size=4, lr=1.0, warmup_epochs=1, patience=2)
  r.update(overrides)
  return r


def _stop_epoch(recipe, curve, steps_per_epoch=4):
  """Drives selection.advance + the patience rule of centralized.fit over a made-up curve."""
  total = recipe.epochs * steps_per_epoch
  track = {'epoch': 0, 'best_epoch': 0, 'best': -np.inf, 'bad_epochs': 0, 'best_val': None}
  for epoch, score in enumerate(curve, 1):
    counts = selection.stop_counts(recipe, epoch, steps_per_epoch, total, centralized.lr_at)
    track = selection.advance(track, epoch, score, counts, {'accuracy': score})
    if track['bad_epochs'] >= recipe.patience or epoch == recipe.epochs:
      return epoch, track
  raise AssertionError('curve too short')


def test_stop_cannot_happen_before_the_lr_threshold():
  curve = [0.5, 0.9, 0.8, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
  # Old rule (every epoch counts): stops at epoch 4, two epochs after the peak at epoch 2.
  stop, track = _stop_epoch(_recipe(), curve)
  assert (stop, track['best_epoch']) == (4, 2)
  # Warmup 4 steps, then cosine over 36 to 0.01: the lr of an epoch's last step (4e - 1) is
  # at most half the peak from epoch 6 on (step 23: 0.4812; step 19, epoch 5: 0.6466).
  recipe = _recipe(stop_below_lr=0.5)
  lrs = [centralized.lr_at(recipe, 4 * e - 1, 40, 4) for e in range(1, 11)]
  assert lrs[4] > 0.5 >= lrs[5]
  assert [selection.stop_counts(recipe, e, 4, 40, centralized.lr_at) for e in range(1, 11)] == [
      False] * 5 + [True] * 5
  stop, track = _stop_epoch(recipe, curve)
  assert (stop, track['best_epoch'], track['best_val']) == (7, 2, {'accuracy': 0.9})
  # A later best epoch inside the decayed phase restarts the window.
  stop, track = _stop_epoch(recipe, [0.5, 0.9, 0.8, 0.7, 0.6, 0.6, 0.95, 0.6, 0.6, 0.6])
  assert (stop, track['best_epoch']) == (9, 7)


def test_balanced_order_draws_every_center_equally():
  groups = np.repeat([0, 1, 2], [10, 3, 2])
  order = selection.balanced_order(jax.random.key(0), groups)
  assert len(order) == 15
  assert np.bincount(groups[order]).tolist() == [5, 5, 5]
  counts = np.bincount(order, minlength=15)
  assert (counts[:10] <= 1).all() and counts[:10].sum() == 5   # undersampled: none twice
  assert counts[10:13].min() == 1 and counts[10:13].sum() == 5  # oversampled: every one
  assert counts[13:].tolist() in ([2, 3], [3, 2])
  np.testing.assert_array_equal(order, selection.balanced_order(jax.random.key(0), groups))
  idx, mask = centralized.balanced_batches(jax.random.key(0), groups, 4)
  assert idx.shape == mask.shape == (4, 4) and mask.sum() == 15
  np.testing.assert_array_equal(idx.ravel()[:15], order)


def test_center_mean_is_unweighted():
  a = {'n': 90, 'accuracy': 0.9, 'f1': 0.5}
  b = {'n': 10, 'accuracy': 0.5, 'f1': None}
  assert selection.center_mean([a, b]) == {'n': 100, 'accuracy': 0.7, 'f1': 0.5}


def _tiny_split(rng, n, offset):
  labels = np.arange(n) % 5
  images = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
  images[np.arange(n), :, :, labels % 3] += np.uint8(120 + offset)  # a learnable colour cue
  return data.Split(images, labels.astype(np.int32), np.array([f'{i}.png' for i in range(n)]))


def _tiny_model():
  """A VGG11 at width 1/32 on 32 px images and its initial params."""
  model = models.build(ml_collections.ConfigDict(dict(
      name='VGG11', num_classes=5, head='gap', width=1 / 32, dropout=0.0, input_norm='per_image',
      conv_init='he', dtype='float32')))
  return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']


def test_tiny_fit_balanced_center_mean_monitor_restores_best_epoch(tmp_path):
  rng = np.random.default_rng(0)
  train_a, train_b = _tiny_split(rng, 24, 0), _tiny_split(rng, 6, 40)
  val = [_tiny_split(rng, 15, 0), _tiny_split(rng, 5, 40)]
  model, params = _tiny_model()
  recipe = _recipe(epochs=6, batch_size=8, lr=3e-3, patience=1, stop_below_lr=0.5)
  rows = []
  train_split = data.Split(*[np.concatenate([getattr(train_a, f), getattr(train_b, f)])
                             for f in data.Split._fields])
  groups = np.repeat([0, 1], [24, 6])
  result = centralized.fit('pooled', centralized.FitModel(model), params,
                           partition.frozen_block_rules(0), train_split, val, recipe,
                           jax.random.key(1), tmp_path / 'ckpt', log=rows.append, groups=groups)
  # Balanced: 2 centers x 15 draws = 30 per epoch, 4 steps of 8.
  steps = 4
  first_counting = next(e for e in range(1, 7) if selection.stop_counts(
      recipe, e, steps, 6 * steps, centralized.lr_at))
  assert result.epochs_run == len(rows) >= min(first_counting + recipe.patience - 1, 6)
  accs = [r['val_accuracy'] for r in rows]
  assert result.epoch == int(np.argmax(accs)) + 1
  # The monitor is the unweighted mean over the two centers, and the best epoch is restored.
  trainable, frozen = partition.split(result.params, partition.frozen_block_rules(0))
  per = [centralized.evaluate(model, trainable, frozen, v) for v in val]
  assert accs[result.epoch - 1] == result.val['accuracy'] == pytest.approx(
      (per[0]['accuracy'] + per[1]['accuracy']) / 2, abs=0)
  assert rows[0]['val_n'] == 20


def test_center_mean_validation_predicts_every_center_in_one_pass(monkeypatch):
  """The pooled monitor (a list of splits): one prediction over the centers' images together,
  each center's metrics from its own rows, equal to evaluating the centers one by one; a center
  with no validation images is left out."""
  rng = np.random.default_rng(0)
  val = [_tiny_split(rng, 15, 0), _tiny_split(rng, 0, 20), _tiny_split(rng, 7, 40)]
  model, params = _tiny_model()
  trainable, frozen = partition.split(params, partition.frozen_block_rules(0))
  one_by_one = selection.center_mean([metrics.summary(centralized.evaluate(
      model, trainable, frozen, v, 8)) for v in val if len(v.labels)])
  calls = []
  predict_probs = centralized.predict_probs
  monkeypatch.setattr(centralized, 'predict_probs',
                      lambda *a, **k: calls.append(len(a[3])) or predict_probs(*a, **k))
  assert centralized._val_summary(model, trainable, frozen, val, 8) == (None, one_by_one)
  assert calls == [22]
  assert centralized._val_summary(model, trainable, frozen, [val[1]], 8) == (None, None)


def test_local_only_from_scratch_at_the_reference_center_is_the_reference_model(tmp_path):
  # With the reference's own recipe (configs/wbc.py: baselines.scratch = the reference recipe),
  # local-only from scratch at the reference center would retrain the reference model with
  # another key: the reference model stands for it, and only the other centers train.
  assert baselines.is_reference_recipe(baselines.scratch_recipe(wbc.get_config().baselines),
                                       wbc.get_config().reference)
  config = smoke_config(tmp_path / 'tfds')
  config.fl.rounds = 1
  config.baselines.init, config.baselines.pooled = 'scratch', False
  with config.unlocked():
    config.baselines.scratch = {k: config.reference[k] for k in baselines.RECIPE_KEYS}
  results = train.run(config, tmp_path / 'w')
  stages = {json.loads(l)['stage'] for l in (tmp_path / 'w' / 'metrics.jsonl').open()}
  assert 'local_synth0' not in stages and {'local_synth1', 'local_synth2'} <= stages
  assert results['details']['local_only']['synth0'] == results['details']['before']['synth0']
  config.baselines.scratch.lr = config.reference.lr / 2  # another recipe: it trains
  assert not baselines.is_reference_recipe(baselines.scratch_recipe(config.baselines),
                                           config.reference)


def test_wbc_defaults_and_old_behaviour_fields():
  config = wbc.get_config()
  assert config.reference.stop_below_lr == 0.5 and config.baselines.stop_below_lr == 0.5
  assert (config.baselines.init, config.baselines.balance, config.baselines.pooled_val) == (
      'both', 'centers', 'center_mean')
  base = common.get_config()
  assert base.reference.stop_below_lr == 1.0 and base.fl.holdout == ()
  assert (base.baselines.init, base.baselines.balance, base.baselines.pooled_val) == (
      'reference', 'none', 'pooled')
  for key, value, message in (('reference.stop_below_lr', 0.0, 'must be in (0, 1]'),
                              ('baselines.init', 'pooled', 'must be one of'),
                              ('baselines.balance', 'yes', 'must be one of'),
                              ('fl.holdout', ('bccd', 'bccd'), 'names a center twice'),
                              ('numerics.matmul_precision', 'fast', 'must be one of'),
                              ('fl.init', 'pretrained', 'must be one of')):
    bad = common.get_config()
    bad[key.split('.')[0]][key.split('.')[1]] = value
    with pytest.raises(ValueError, match=f'config {re.escape(key)}=.*{re.escape(message)}'):
      validate.check(bad)


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_fl_from_scratch_starts_at_the_fresh_parameters(tmp_path):
  # fl.init='scratch': round 1 starts from the run's fresh parameters (where the reference model
  # and the pooled model from scratch start), not from the reference model. A vanishing lr keeps
  # round 1's model at its start.
  config = smoke_config(tmp_path / 'tfds')
  config.fl.rounds, config.fl.lr, config.fl.weight_decay = 1, 1e-12, 0.0
  config.model.frozen_blocks = 0
  for init in ('scratch', 'reference'):
    config.fl.init = init
    train.run(config, tmp_path / init)
    round1 = inference.load_model(tmp_path / init, 1)
    reference = inference.load_model(tmp_path / init, 0).params
    fresh = round1.experiment.init()
    start, other = (fresh, reference) if init == 'scratch' else (reference, fresh)
    assert _max_diff(round1.params, start) < 1e-6
    assert _max_diff(round1.params, other) > 1e-3  # the smoke reference moves ~2e-3
  # Blocks frozen at random weights: refused, naming both keys, before any work.
  config.fl.init, config.model.frozen_blocks = 'scratch', 3
  with pytest.raises(ValueError, match=r"fl.init='scratch' with model.frozen_blocks=3"):
    train.run(config, tmp_path / 'frozen')
  assert not (tmp_path / 'frozen').exists()


def test_swa_reports_the_average_of_the_rounds_from_start_and_trains_as_without(tmp_path):
  # fl.swa_start=2 of 3 rounds, evaluated as 'swa_active_mean': Table 2's model, Orbax's
  # checkpoint and inference read the mean of rounds 2 and 3's active_mean; what trains (the
  # wrapped state) is bit for bit the run without averaging.
  configs = {}
  for name, swa_start, eval_model in (('plain', 0, 'active_mean'), ('swa', 2, 'swa_active_mean')):
    config = configs[name] = smoke_config(tmp_path / 'tfds')
    config.baselines.local_only = config.baselines.pooled = False
    config.checkpoint.keep, config.fl.select = 3, 'last'
    config.fl.swa_start, config.fl.eval_model = swa_start, eval_model
    results = train.run(config, tmp_path / name)
  assert results['eval_model'] == 'swa_active_mean'
  states = {r: fl_state(config, tmp_path / 'swa', r)[0]['server'] for r in (1, 2, 3)}
  for r, state in states.items():
    plain = fl_state(configs['plain'], tmp_path / 'plain', r)[0]['server']
    assert_same_tree(state.inner, plain)
    assert int(state.rounds) == r
  mean = jax.tree.map(lambda a, b: (a + b) / 2, states[2].inner.active_mean,
                      states[3].inner.active_mean)
  for a, b in zip(jax.tree.leaves(states[3].average['active_mean']), jax.tree.leaves(mean)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert_same_tree(states[1].average['active_mean'], states[1].inner.active_mean)
  loaded = inference.load_model(tmp_path / 'swa', 3)
  assert loaded.name == 'fl round 3 (swa_active_mean)'
  trainable, _ = partition.split(loaded.params, partition.frozen_block_rules(
      config.model.frozen_blocks))
  assert_same_tree(trainable, states[3].average['active_mean'])


def test_logit_adjust_under_dp_is_refused_before_any_work(tmp_path):
  """The prior is computed from all of a center's labels: DP-SGD's per-example bound would not
  hold, so the two are refused together, naming both keys."""
  config = smoke_config(tmp_path / 'tfds')
  config.fl.logit_adjust, config.fl.dp.mode = 1.0, 'example'
  with pytest.raises(ValueError, match=r"fl.logit_adjust=1.0 with fl.dp.mode='example'"):
    train.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()
  config.fl.dp.mode = 'off'
  validate.check(config)  # without DP it is fine


def test_logit_adjust_under_client_level_dp_is_allowed(tmp_path):
  """Client level: the unit is the whole center, whose clipped, noised update covers the prior."""
  pytest.importorskip('dp_accounting')  # the check plans the privacy accounting (the dp extra)
  config = smoke_config(tmp_path / 'tfds')
  config.fl.logit_adjust, config.fl.algorithm, config.fl.dp.mode = 1.0, 'fed_avg', 'client'
  validate.check(config)


def test_matmul_precision_is_applied_and_restored():
  config = common.get_config()
  x = jnp.ones((4, 4))
  with numerics.applied(config.numerics):
    assert 'HIGHEST' not in jax.jit(jnp.dot).lower(x, x).as_text()
  config.numerics.matmul_precision = 'highest'
  with numerics.applied(config.numerics):
    assert 'precision = [HIGHEST, HIGHEST]' in jax.jit(jnp.dot).lower(x, x).as_text()
  assert 'HIGHEST' not in jax.jit(jnp.dot).lower(x, x).as_text()
  assert numerics.describe(config.numerics)['matmul_precision'] == 'highest'


def test_xla_flags_off_needs_the_environment_switch():
  config = common.get_config()
  config.numerics.xla_flags = False
  flag = flags.XLA_FLAGS[0]
  with pytest.raises(ValueError, match='FEDBLOOD_XLA_FLAGS=0'):
    numerics.check(config.numerics, {'XLA_FLAGS': flag})
  numerics.check(config.numerics, {'XLA_FLAGS': ''})
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'XLA_FLAGS': '', 'FEDBLOOD_XLA_FLAGS': '0'}
  code = ('import os, fedblood; from fedblood.backend import numerics; from configs import common; '
          'c = common.get_config(); c.numerics.xla_flags = False; numerics.check(c.numerics); '
          'print(repr(os.environ["XLA_FLAGS"]))')
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "''"
  env.pop('FEDBLOOD_XLA_FLAGS')
  out = subprocess.run([sys.executable, '-c', 'import os, fedblood; print(os.environ["XLA_FLAGS"])'],
                       env=env, cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == flag


@pytest.mark.slow
def test_held_out_center_and_both_baselines(smoke, tmp_path, monkeypatch):
  base_config, smoke_dir = smoke
  cache = Path(base_config.data.cache_dir)
  config = smoke_config(cache)
  config.reference.restore = str(smoke_dir)
  config.fl.holdout = ('synth2',)
  config.baselines.init = 'both'
  config.baselines.balance = 'centers'
  config.baselines.pooled_val = 'center_mean'
  config.baselines.personalize = True
  fits, real_fit = {}, centralized.fit

  def recording_fit(name, exp, params, *args, **kwargs):  # the real fit, its start kept
    result = real_fit(name, exp, params, *args, **kwargs)
    fits[name] = (params, result.params)
    return result

  monkeypatch.setattr(centralized, 'fit', recording_fit)
  results = train.run(config, tmp_path / 'loco')
  assert results['held_out'] == ['synth2']
  assert list(results['baselines']) == ['local_only_scratch', 'local_only_reference',
                                        'pooled_scratch', 'pooled_reference',
                                        'personalized_fl', 'personalized_pooled']
  # Personalisation: each joined center fine-tunes the model Table 2 reports and the pooled
  # model from scratch, on its own data; the held-out center never joined and is not tuned.
  exp = experiment.build(config)
  centers = {c.name: c for c in data.load_centers(config.data)}
  for name in ('synth0', 'synth1'):
    start, tuned = fits[f'personal_fl_{name}']
    table2 = exp.evaluate(*exp.split(start), centers[name].test)
    assert table2['predictions'] == results['details']['after'][name]['predictions']
    assert fits[f'personal_pooled_{name}'][0] is fits['pooled_scratch'][1]
    assert results['details']['personalized_fl'][name] == exp.evaluate(*exp.split(tuned),
                                                                       centers[name].test)
  assert set(results['baselines']['personalized_fl']) == {'synth0', 'synth1'}
  assert set(results['baselines']['personalized_pooled']) == {'synth0', 'synth1'}
  rows = [json.loads(l) for l in (tmp_path / 'loco' / 'metrics.jsonl').read_text().splitlines()]
  held = [r for r in rows if r['stage'] == 'fl' and r['center'] == 'synth2']
  assert [r['round'] for r in held] == [1, 2, 3] and all(r['held_out'] for r in held)
  assert all('loss' not in r and 'active' not in r for r in held)
  assert held[-1]['accuracy'] == results['after']['synth2']['accuracy']
  # Pooled trained and monitored on the joined centers only: the val monitor's n is theirs.
  centers = data.load_centers(config.data)
  joined_val = sum(len(c.val.labels) for c in centers[:2])
  for stage in ('pooled', 'pooled_scratch'):
    assert [r['val_n'] for r in rows if r['stage'] == stage] == [joined_val]
  assert {r['stage'] for r in rows} >= {'local_scratch_synth0', 'local_scratch_synth2',
                                        'local_synth2'}
  report = (tmp_path / 'loco' / 'report.md').read_text()
  for title in ('Local-only (scratch)', 'Local-only (from reference)', 'Pooled (scratch)',
                'Pooled (from reference)', 'synth2 (held out)', 'FL + site fine-tuning',
                'Pooled + site fine-tuning', 'FL, held out: class priors re-estimated (EM)'):
    assert title in report
  # The held-out center, also classified with its own class priors: EM on Table 2's model's
  # posteriors for all its images (labels unused), then its test split, as --priors em does.
  held_center = centers[2]
  images = np.concatenate([held_center.train.images, held_center.val.images,
                           held_center.test.images])
  probs = exp.predict(*exp.split(fits['personal_fl_synth0'][0]), images)
  train_shares = np.bincount(np.concatenate([c.train.labels for c in centers[:2]]), minlength=5)
  em = stats.em_priors(probs, np.maximum(train_shares, 1) / np.maximum(train_shares, 1).sum())
  want = em.posteriors[-len(held_center.test.labels):].argmax(-1)
  assert results['details']['after_em']['synth2']['predictions'] == want.tolist()
  assert list(results['after_em']) == ['synth2'] and list(results['priors_em']) == ['synth2']
  assert results['priors_em']['synth2']['estimated'] == pytest.approx(
      dict(zip(data.CLASSES, em.priors.tolist())))
  # FL with synth2 held out is exactly FL of the same two centers without synth2.
  two = smoke_config(cache)
  two.reference.restore = str(smoke_dir)
  two.data.synthetic.num_centers = 2
  two.data.synthetic.images_per_center = (120, 80)
  two.baselines.local_only = two.baselines.pooled = False
  results_two = train.run(two, tmp_path / 'two')
  for name in ('synth0', 'synth1'):
    assert results_two['after'][name] == results['after'][name]
