"""The study pipeline on the smoke config: outputs, exact resume, divergence, refusals.

The smoke run happens ONCE per test session (the ``smoke`` fixture of conftest.py);
everything else reuses its workdir and its compiled functions.
"""

import json
from pathlib import Path
import shutil

import jax
import numpy as np
import pytest

from configs import demo  # importable: pyproject sets pytest's pythonpath to the repo root
from fedblood import data
from fedblood.model import classifier, metrics, partition
from fedblood.rundir import checkpoint, checkpoint_listing
from fedblood.study import centralized, inference, sweep
from fedblood.study import driver, experiment, train
from fedblood.study.stages import fl
from study_helpers import assert_same_tree, fl_state, interrupt_saves, smoke_config


def test_smoke_outputs(smoke):
  config, workdir = smoke
  for name in ('config.json', 'metrics.jsonl', 'results.json', 'report.md',
               'figures/accuracy_per_round.png', 'figures/confusion_after_synth2.png'):
    assert (workdir / name).is_file(), name
  assert list((workdir / 'tb').glob('events.out.tfevents.*'))
  results = json.loads((workdir / 'results.json').read_text())
  centers = data.load_centers(config.data)
  assert results['centers'] == ['synth0', 'synth1', 'synth2'] == [c.name for c in centers]
  for stage in ('before', 'after'):
    for c in centers:
      m = results[stage][c.name]
      assert set(m) >= {'accuracy', 'precision', 'recall', 'specificity', 'f1', 'n'}
      assert m['n'] == len(c.test.labels)
  assert set(results['after_models']) == {'server', 'active_mean'}
  assert results['eval_model'] == 'active_mean'
  assert results['after'] == results['after_models']['active_mean']
  assert set(results['baselines']['local_only']) == set(results['centers'])
  assert set(results['baselines']['pooled']) == set(results['centers'])
  # Table 1 is exactly the reference model restored from its checkpoint, evaluated afresh.
  loaded = inference.load_model(workdir, 0)
  for c in centers:
    assert loaded.experiment.evaluate(*loaded.experiment.split(loaded.params), c.test) == results[
        'details']['before'][c.name]
  # metrics.jsonl: a row per epoch of each fit, a row per round per center of FL.
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  fl_rows = [r for r in rows if r['stage'] == 'fl']
  assert [(r['round'], r['center']) for r in fl_rows] == [
      (r, c) for r in (1, 2, 3) for c in results['centers']]
  assert [r['epoch'] for r in rows if r['stage'] == 'reference'] == [1, 2]
  assert {r['stage'] for r in rows} == {'reference', 'fl', 'local_synth1', 'local_synth2', 'pooled'}
  # Table 2 is the round with the best mean validation accuracy (fl.select='val', ties to the
  # earliest), its logged test metrics exactly; the last round's are beside it.
  mean_val = {r: np.mean([row['val_accuracy'] for row in fl_rows if row['round'] == r])
              for r in (1, 2, 3)}
  chosen = max(mean_val, key=lambda r: (mean_val[r], -r))
  assert results['selection'] == {'rule': 'val', 'round': chosen, 'last_round': 3}
  for r in fl_rows:
    if r['round'] == chosen:
      assert r['accuracy'] == results['after'][r['center']]['accuracy']
    if r['round'] == 3:
      assert r['accuracy'] == results['after_last'][r['center']]['accuracy']
  report = (workdir / 'report.md').read_text()
  assert '## Table 1' in report and '## Table 2' in report and 'Local-only' in report
  # Checkpoints: every round was saved; the last one (keep=1) and the best survive.
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints' / 'fl').iterdir()
                 if p.name.isdigit())
  assert steps[-1] == 3 and 1 <= len(steps) <= 2


def test_rerun_changes_nothing(smoke):
  config, workdir = smoke
  before = {n: (workdir / n).read_bytes() for n in ('results.json', 'metrics.jsonl')}
  train.run(config, workdir)
  assert {n: (workdir / n).read_bytes() for n in before} == before


# Saves in a smoke run, in order: reference epochs 1-2, reference model, FL rounds 1-3,
# local_synth1, local_synth2, pooled. Interrupting before save k stops the run at that point.
# One run is interrupted at each of these (in the reference stage, in FL, in the baselines) and
# resumed each time: every resume is exercised, for the price of one run instead of three.
STOPS = {2: ('reference', [1]), 5: ('fl', [1]), 8: ('local_synth1', [1])}


def _steps(stage_dir: Path) -> list:
  return sorted(int(p.name) for p in stage_dir.glob('*') if p.name.isdigit())


def test_interrupted_run_resumes_bit_identical(smoke, tmp_path, monkeypatch):
  config, reference_dir = smoke
  workdir = tmp_path / 'run'
  done = 0  # saves committed so far; a resumed run makes only the saves still missing
  for stop_before_save, (stage, steps) in STOPS.items():
    real_save = interrupt_saves(monkeypatch, stop_before_save - done)
    with pytest.raises(KeyboardInterrupt):
      train.run(config, workdir)
    monkeypatch.setattr(checkpoint, 'save', real_save)
    done = stop_before_save - 1
    # Stopped where intended: the last committed save is ``stage``'s, nothing after it.
    assert _steps(workdir / 'checkpoints' / stage) == steps, stop_before_save
    assert not (workdir / 'results.json').exists()
  assert _steps(workdir / 'checkpoints' / 'local_synth2') == []
  train.run(config, workdir)
  for name in ('results.json', 'metrics.jsonl', 'config.json'):
    assert (workdir / name).read_bytes() == (reference_dir / name).read_bytes(), name
  state, meta = fl_state(config, workdir)
  expected, expected_meta = fl_state(config, reference_dir)
  assert meta == expected_meta and meta['round'] == 3
  assert_same_tree(state, expected)
  # The best-by-validation step survives the restarts: the same steps, and best, are kept.
  listing = checkpoint_listing.inspect(workdir).splitlines()
  assert listing[1:] == checkpoint_listing.inspect(reference_dir).splitlines()[1:]
  assert '[fl] steps [1, 3]' in listing and '  round 1 (best): ' in ''.join(listing)


def test_different_config_refused(smoke):
  config, workdir = smoke
  other = smoke_config(Path(config.data.cache_dir))
  other.fl.rounds = 4
  other.model.width = 0.25
  before = (workdir / 'results.json').read_bytes()
  with pytest.raises(ValueError, match=r'(?s)holds a run of a different config.*'
                     r'fl\.rounds: 3 in the workdir, 4 now.*'
                     r'model\.width: 0\.125 in the workdir, 0\.25 now'):
    train.run(other, workdir)
  assert (workdir / 'results.json').read_bytes() == before


def test_reference_from_other_model_shape_refused(smoke, tmp_path):
  config, workdir = smoke
  other = smoke_config(Path(config.data.cache_dir))
  other.model.width = 0.25
  other.reference.restore = str(workdir)
  with pytest.raises(checkpoint.ShapeMismatchError,
                     match=r'(?s)different model.*params/block1/conv1/kernel: checkpoint '
                           r'float32\[3, 3, 3, 8\], this config float32\[3, 3, 3, 16\]'):
    train.run(other, tmp_path / 'wide')


def test_reference_restored_from_workdir(smoke, tmp_path):
  config, workdir = smoke
  other = smoke_config(Path(config.data.cache_dir))
  other.reference.restore = str(workdir)
  other.fl.rounds = 1
  other.baselines.local_only = other.baselines.pooled = False
  results = train.run(other, tmp_path / 'restored')
  expected = json.loads((workdir / 'results.json').read_text())
  assert results['before'] == expected['before']
  assert results['reference_training']['restored_from'] == str(
      workdir / 'checkpoints' / 'reference_model')


def test_fl_divergence_names_round_and_center_and_keeps_checkpoint(smoke, tmp_path):
  """A non-finite round loss names its round and center and keeps the last good checkpoint.

  synth1's training labels are put outside the classes (its cross-entropy is NaN, the others'
  stay finite), so the message must name synth1, not merely the first center. The FL settings
  are the smoke run's (one more round): the compiled round is reused, none is compiled anew.
  """
  config, workdir = smoke
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  bad = smoke_config(Path(config.data.cache_dir))
  bad.fl.rounds = 4
  loaded = inference.load_model(copy, 0)
  centers = list(data.load_centers(bad.data))
  broken = centers[1].train._replace(labels=np.full_like(centers[1].train.labels, 99))
  centers[1] = centers[1]._replace(train=broken)
  log = lambda row: None
  with pytest.raises(FloatingPointError,
                     match=r"fl round 4, center 'synth1': the training loss is nan.*"
                           r'last good checkpoint is kept: round 3'):
    fl.fl_stage(loaded.experiment, bad.fl, bad.checkpoint, loaded.params, centers, copy, log)
  mngr = checkpoint.manager(copy / 'checkpoints' / 'fl')
  assert mngr.latest_step() == 3
  mngr.close()


def test_centralized_divergence_names_stage_and_epoch(smoke, tmp_path):
  config, workdir = smoke
  loaded = inference.load_model(workdir, 0)
  center = data.load_centers(config.data)[1]
  recipe = config.baselines.copy_and_resolve_references()
  recipe.lr, recipe.warmup_epochs, recipe.epochs = 1e30, 0, 3
  with pytest.raises(FloatingPointError, match=r'local_test, epoch 1: the training loss is'):
    centralized.fit('local_test', loaded.experiment, loaded.params, loaded.experiment.rules,
                    center.train, center.val, recipe, jax.random.key(0), tmp_path / 'ckpt')


def test_participation_mask_is_deterministic():
  key = jax.random.key(0)
  masks = [driver.participation(0.5, key, r, 4) for r in range(1, 6)]
  assert all(m.sum() == 2 for m in masks)
  assert len({tuple(m) for m in masks}) > 1  # rounds draw different centers
  np.testing.assert_array_equal(masks[2], driver.participation(0.5, key, 3, 4))
  assert driver.participation(1.0, key, 1, 4).all()


def test_sweep_runs_each_point_into_its_own_workdir(smoke, tmp_path):
  config, workdir = smoke
  config_file = tmp_path / 'sweep_config.py'
  # The second point trains FL only (the smoke run's reference restored, no baselines): enough
  # to show that it ran into its own workdir, with its own eval model.
  other = {'fl.eval_model': 'server', 'reference.restore': str(workdir),
           'baselines.local_only': False, 'baselines.pooled': False}
  config_file.write_text(f'def get_sweep():\n  return [{{"seed": 0}}, {other!r}]\n')
  # The first point IS the smoke run: copied in, it is recognised as finished and not rerun.
  shutil.copytree(workdir, tmp_path / 'sweep' / 'seed=0')
  summary = sweep.run(config, str(config_file), tmp_path / 'sweep')
  name = sweep.point_name(other)
  assert name.startswith('baselines.local_only=False,baselines.pooled=False,fl.eval_model=server,'
                         'reference.restore=')
  server = json.loads((tmp_path / 'sweep' / name / 'results.json').read_text())
  smoke_results = json.loads((workdir / 'results.json').read_text())
  # Same training, Table 2 on the other FedDyn model.
  assert server['after'] == smoke_results['after_models']['server']
  assert server['before'] == smoke_results['before'] and server['baselines'] == {}
  assert '| seed=0 |' in summary and f'| {name} |' in summary
  csv_text = (tmp_path / 'sweep' / 'sweep_summary.csv').read_text().splitlines()
  assert csv_text[0].startswith('name,baselines.local_only,baselines.pooled,fl.eval_model,'
                                'reference.restore,seed,before_acc_external')
  with pytest.raises(ValueError, match="sweep override 'fl.alfa': no config field 'alfa'"):
    sweep.apply(config, {'fl.alfa': 0.1})


def test_metrics_summary_matches_classify(smoke):
  _, workdir = smoke
  results = json.loads((workdir / 'results.json').read_text())
  for c, full in results['details']['after'].items():
    assert results['after'][c] == metrics.summary(full)
    assert np.sum(full['confusion']) == full['n']


def test_evaluate_many_is_each_split_evaluated_alone(tmp_path):
  # One prediction pass over several splits (chunks running across their borders) gives each
  # split exactly the metrics it gets alone; an empty split is an empty evaluation.
  config = smoke_config(tmp_path / 'tfds')
  config.eval.batch_size = 16
  exp = experiment.build(config)
  centers = data.load_centers(config.data)
  trainable, frozen = exp.split(exp.init())
  empty = data.Split(*[x[:0] for x in centers[0].val])
  splits = [centers[0].test, empty, centers[1].val, centers[2].test, centers[1].test]
  assert sum(len(s.labels) for s in splits) % 16  # the last chunk is padded
  many = exp.evaluate_many(trainable, frozen, splits)
  for split, metrics_many in zip(splits, many):
    assert metrics_many == exp.evaluate(trainable, frozen, split)
  assert many[1]['n'] == 0


def test_the_last_evaluation_chunk_is_padded_to_a_multiple_of_16_only(tmp_path):
  # A center's 38 validation images ran as a chunk of 128 (1024 views under model.tta): the last
  # chunk is now padded to the next multiple of 16 (never past the chunk size), the images first
  # and in order, and the predictions, hence the metrics, are those of whole chunks.
  images = np.random.default_rng(0).integers(0, 256, (38, 32, 32, 3), np.uint8)
  for batch, shapes in ((128, [48]), (16, [16, 16, 16]), (20, [20, 20]), (3, [3] * 13)):
    out = classifier.chunks([images[:30], images[:0], images[30:]], batch)
    assert [len(c) for c in out] == shapes, batch
    flat = np.concatenate(out)
    np.testing.assert_array_equal(flat[:38], images)
    assert not flat[38:].any()
  config = smoke_config(tmp_path / 'tfds')
  config.model.tta = True
  exp = experiment.build(config)
  trainable, frozen = exp.split(exp.init())
  split = data.load_centers(config.data)[1].test
  assert len(split.labels) % 16 and len(split.labels) < 128
  small = centralized.predict_probs(exp.model, trainable, frozen, split.images, 128)
  pad = np.zeros((128 - len(split.labels),) + split.images.shape[1:], np.uint8)
  padded = np.concatenate([split.images, pad])
  whole = centralized.predict_probs(exp.model, trainable, frozen, padded, 128)[:len(split.labels)]
  np.testing.assert_allclose(small, whole, atol=1e-6)
  assert centralized.evaluate(exp.model, trainable, frozen, split, 128) == metrics.classify(
      split.labels, whole.argmax(-1))


def test_the_evaluation_step_size_changes_no_prediction(tmp_path):
  # configs/wbc.py evaluates 16 images a step, not 128, for speed: every image's probabilities,
  # hence every metric, are those of the larger step (under model.tta too).
  config = smoke_config(tmp_path / 'tfds')
  config.model.tta = True
  exp = experiment.build(config)
  trainable, frozen = exp.split(exp.init())
  centers = data.load_centers(config.data)
  parts = [s for c in centers for s in (c.train, c.val, c.test)]
  images, labels, files = (np.concatenate(x) for x in zip(*parts))
  assert len(images) > 128
  probs = {b: centralized.predict_probs(exp.model, trainable, frozen, images, b)
           for b in (128, 16)}
  np.testing.assert_allclose(probs[16], probs[128], atol=1e-6)
  split = data.Split(images, labels, files)
  assert centralized.evaluate(exp.model, trainable, frozen, split, 16) == centralized.evaluate(
      exp.model, trainable, frozen, split, 128)


def test_a_fit_with_the_trunk_frozen_validates_on_its_features_computed_once(tmp_path,
                                                                           monkeypatch):
  # The baselines from the reference keep blocks 1..k frozen: their validation computes those
  # blocks' features once per fit, and each epoch runs only the blocks after them, with the
  # numbers of the two halves run afresh. A fit that trains the trunk (from scratch) validates
  # on the network whole.
  config = smoke_config(tmp_path / 'tfds')
  config.eval.batch_size = 16
  exp = experiment.build(config)
  centers = data.load_centers(config.data)
  trunk_calls = []
  make_trunk = classifier.make_trunk

  def counted_trunk(model, blocks):
    trunk = make_trunk(model, blocks)

    def counted(frozen, images):  # (jax.eval_shape's trace, sizing the cache, is not a call)
      if not isinstance(images, jax.core.Tracer):
        trunk_calls.append(len(images))
      return trunk(frozen, images)

    return counted

  monkeypatch.setattr(classifier, 'make_trunk', counted_trunk)
  val = [c.val for c in centers]
  n_val = sum(len(v.labels) for v in val)
  recipe = config.baselines.copy_and_resolve_references()
  recipe.epochs, recipe.patience = 3, 0
  rows = []
  result = centralized.fit('pooled', exp, exp.init(), exp.rules, centers[0].train, val, recipe,
                           jax.random.key(0), tmp_path / 'ckpt', log=rows.append)
  assert len(rows) == 3 and sum(trunk_calls) == n_val + (-n_val % 16)  # once, not per epoch
  trainable, frozen = exp.split(result.params)
  want = metrics.summary(exp.evaluate_many(trainable, frozen, val)[0])
  single = exp.validator(frozen, val[0])(trainable)
  assert single[1] == want and single[0] == exp.evaluate(trainable, frozen, val[0])
  trunk_calls.clear()
  scratch, none = partition.split(result.params, partition.frozen_block_rules(0))
  whole = exp.validator(none, val[0])(scratch)
  assert not trunk_calls and whole == centralized.FitModel(exp.model, eval_batch=16).validator(
      none, val[0])(scratch)
  assert whole[0]['n'] == len(val[0].labels)


def test_prepared_evaluation_computes_the_frozen_blocks_once(tmp_path):
  # FL evaluates the same images every round with blocks 1..k fixed: prepare() keeps their
  # features, and the per-round evaluation runs only the blocks after them. Same numbers as
  # without the cache, close to the network in one piece, and the cache acts.
  config = smoke_config(tmp_path / 'tfds')
  config.eval.batch_size = 16
  exp = experiment.build(config)
  assert exp.trunk_blocks == config.model.frozen_blocks > 0
  centers = data.load_centers(config.data)
  trainable, frozen = exp.split(exp.init())
  splits = [c.test for c in centers] + [c.val for c in centers]
  cached, fresh = exp.prepare(frozen, splits), exp.prepare(frozen, splits, max_bytes=0)
  assert cached.cached and not fresh.cached
  assert cached.chunks[0].shape[-1] != 3 and fresh.chunks[0].shape[-1] == 3  # features, images
  probs = exp.predict_prepared(trainable, frozen, cached)
  np.testing.assert_array_equal(probs, exp.predict_prepared(trainable, frozen, fresh))
  assert exp.evaluate_prepared(trainable, frozen, cached) == exp.evaluate_many(
      trainable, frozen, splits)
  whole = np.concatenate([centralized.predict_probs(exp.model, trainable, frozen, s.images, 16)
                          for s in splits])
  np.testing.assert_allclose(probs, whole, atol=1e-5)
  np.testing.assert_array_equal(exp.predict(trainable, frozen, splits[0].images),
                                probs[:len(splits[0].labels)])
  # The cache acts: other block-1 weights change the fresh prediction, not the cached one.
  other = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 3 if 'block1' in jax.tree_util.keystr(path) else x, frozen)
  np.testing.assert_array_equal(exp.predict_prepared(trainable, other, cached), probs)
  assert np.abs(exp.predict_prepared(trainable, other, fresh) - probs).max() > 1e-4
