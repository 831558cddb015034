"""launch.py: inspect / evaluate / predict on the smoke run, bad command lines, kill -9 + resume."""

import csv
import importlib
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from fedblood import data
from fedblood.model import metrics
from fedblood.study import inference, sweep, train

REPO = Path(__file__).resolve().parents[1]


def launch(*args, timeout=300):
  return subprocess.run([sys.executable, str(REPO / 'launch.py'), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def _write_folder(root: Path, split) -> Path:
  """A <class>/<images> tree of PNGs (lossless: the pixels come back exactly)."""
  for i, (image, label) in enumerate(zip(split.images, split.labels)):
    folder = root / metrics.CLASSES[label]
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f'cell{i:03d}.png')
  return root


@pytest.fixture(scope='module')
def external(smoke, tmp_path_factory):
  """synth2's test split written as a folder, plus its in-memory split."""
  config, _ = smoke
  split = data.load_centers(config.data)[2].test
  return _write_folder(tmp_path_factory.mktemp('synth2_test'), split), split


def test_inspect_lists_checkpoints_without_data(smoke, tmp_path):
  config, workdir = smoke
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  # Point the copy's data at nothing: inspect must not need it.
  cfg = json.loads((copy / 'config.json').read_text())
  cfg['data'].update(source='folder', root=str(tmp_path / 'absent'))
  (copy / 'config.json').write_text(json.dumps(cfg))
  out = launch('--mode', 'inspect', '--workdir', str(copy))
  assert out.returncode == 0, out.stderr
  assert '[fl] steps' in out.stdout and 'round 3:' in out.stdout
  assert '[reference_model] steps [2]' in out.stdout
  assert 'trainable 203,461 scalars in 14 leaves, frozen 27,432 in 14 leaves' in out.stdout


def test_evaluate_folder_equals_in_run_metrics(smoke, external, tmp_path):
  _, workdir = smoke
  folder, _ = external
  results = json.loads((workdir / 'results.json').read_text())
  output = tmp_path / 'eval.json'
  out = launch('--mode', 'evaluate', '--workdir', str(workdir), '--eval_dir', str(folder),
               '--output', str(output))
  assert out.returncode == 0, out.stderr
  chosen = results['selection']['round']  # by default the round Table 2 reports (fl.select)
  assert f'fl round {chosen} (active_mean)' in out.stdout and 'neutrophil' in out.stdout
  written = json.loads(output.read_text())
  assert written['round'] == chosen
  # The unseen-folder path reproduces the run's own Table 2 numbers for that center exactly:
  # a folder the run does not know chooses its crop, and keeps the whole frame (synth2's images
  # are the run's scale; the smoke model's information hardly moves with the crop).
  assert written['crop']['from'] == 'auto' and written['crop']['value'] == 1.0
  assert written['metrics'] == results['details']['after']['synth2']
  # --round 0 is the reference model: Table 1.
  before = inference.evaluate_folder(workdir, folder, 0, tmp_path / 'r0.json')
  assert before['metrics'] == results['details']['before']['synth2']


def test_evaluate_writes_the_per_class_table_and_confusion_matrix(smoke, external, tmp_path):
  _, workdir = smoke
  folder, _ = external
  result = inference.evaluate_folder(workdir, folder, None, tmp_path / 'new_center.json')
  report = Path(result['report'])
  assert report == tmp_path / 'new_center.md' and (tmp_path / 'new_center_confusion.png').is_file()
  text = report.read_text()
  m = result['metrics']
  for name, row in zip(metrics.CLASSES, m['confusion']):  # every row, as counted
    assert f'| {name} | ' + ' | '.join(str(v) for v in row) + ' |' in text
  for name, pc in m['per_class'].items():
    assert f'| {name} | {pc["support"]} |' in text
  assert result['priors'] is None and 're-estimated' not in text


def test_em_priors_follow_the_folder_and_correct_the_predictions(smoke, external, tmp_path):
  """--priors em: the training shares are the listing's (reference center for round 0, the
  FL centers pooled after FL); the folder's shares are EM's on the model's posteriors; the
  predictions are the corrected posteriors' argmax, in evaluate and predict alike."""
  from fedblood import stats  # pylint: disable=g-import-not-at-top
  from fedblood.study import priors  # pylint: disable=g-import-not-at-top
  config, workdir = smoke
  folder, split = external
  centers = data.load_centers(config.data)
  shares = lambda labels: np.maximum(np.bincount(labels, minlength=5), 1) / np.maximum(
      np.bincount(labels, minlength=5), 1).sum()
  np.testing.assert_allclose(priors.train_priors(config, 0), shares(centers[0].train.labels))
  np.testing.assert_allclose(priors.train_priors(config, 3), shares(
      np.concatenate([c.train.labels for c in centers])))
  out = launch('--mode', 'evaluate', '--workdir', str(workdir), '--eval_dir', str(folder),
               '--output', str(tmp_path / 'em.json'), '--priors', 'em')
  assert out.returncode == 0, out.stderr
  em = json.loads((tmp_path / 'em.json').read_text())
  loaded = inference.load_model(workdir)
  raw = np.asarray(inference._probs(loaded, split.images))  # pylint: disable=protected-access
  expected = stats.em_priors(raw, priors.train_priors(config, 3))
  assert np.abs(expected.posteriors - raw).max() > 1e-3  # the option acts on the probabilities
  assert em['priors']['estimated'] == pytest.approx(dict(zip(metrics.CLASSES, expected.priors)))
  assert sum(em['priors']['estimated'].values()) == pytest.approx(1.0)
  assert em['metrics'] == metrics.classify(split.labels, expected.posteriors.argmax(-1))
  assert 're-estimated on these images' in (tmp_path / 'em.md').read_text()
  flat = tmp_path / 'flat'
  flat.mkdir()
  for i, image in enumerate(split.images):
    Image.fromarray(image).save(flat / f'cell{i:03d}.png')
  inference.predict_folder(workdir, flat, tmp_path / 'em.csv', priors='em')
  with open(tmp_path / 'em.csv') as f:
    rows = list(csv.DictReader(f))
  probs = np.asarray([[float(r[f'p_{c}']) for c in metrics.CLASSES] for r in rows])
  np.testing.assert_allclose(probs, expected.posteriors, atol=1e-6)
  with pytest.raises(ValueError, match="--priors 'flat'"):
    inference.evaluate_folder(workdir, folder, priors='flat')


def test_predict_writes_csv_and_skips_non_images(smoke, external, tmp_path):
  config, workdir = smoke
  folder, split = external
  flat = tmp_path / 'cells'
  flat.mkdir()
  for i, image in enumerate(split.images[:5]):
    Image.fromarray(image).save(flat / f'c{i}.png')
  (flat / 'notes.txt').write_text('not an image')
  output = tmp_path / 'pred.csv'
  out = launch('--mode', 'predict', '--workdir', str(workdir), '--input', str(flat),
               '--output', str(output))
  assert out.returncode == 0, out.stderr
  assert '5 images classified' in out.stdout
  rows = list(csv.DictReader(output.open()))
  assert [r['file'] for r in rows] == [f'c{i}.png' for i in range(5)]
  loaded = inference.load_model(workdir)
  probs = inference._probs(loaded, split.images[:5])  # pylint: disable=protected-access
  for r, p in zip(rows, probs):
    assert r['predicted'] == metrics.CLASSES[int(p.argmax())]
    np.testing.assert_allclose([float(r[f'p_{c}']) for c in metrics.CLASSES], p, atol=1e-6)
    assert sum(float(r[f'p_{c}']) for c in metrics.CLASSES) == pytest.approx(1, abs=1e-5)


def test_predict_bad_inputs(smoke, tmp_path):
  _, workdir = smoke
  only_text = tmp_path / 'text'
  only_text.mkdir()
  (only_text / 'a.txt').write_text('x')
  with pytest.raises(ValueError, match=r'--input .*text.*No image files'):
    inference.predict_folder(workdir, only_text, tmp_path / 'p.csv')
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'cell.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  with pytest.raises(ValueError, match=r'cell\.png'):
    inference.predict_folder(workdir, broken, tmp_path / 'p.csv')
  assert not (tmp_path / 'p.csv').exists()


def test_evaluate_bad_folder_and_round(smoke, tmp_path):
  _, workdir = smoke
  odd = tmp_path / 'odd'
  (odd / 'platelets').mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(odd / 'platelets' / 'p.png')
  with pytest.raises(ValueError, match=r'--eval_dir .*odd.*class folders'):
    inference.evaluate_folder(workdir, odd)
  with pytest.raises(FileNotFoundError,
                     match=r'no checkpoint of round 7 .*kept rounds: \[(\d, )?3\]'):
    inference.load_model(workdir, 7)
  with pytest.raises(FileNotFoundError, match='no config.json'):
    inference.load_model(tmp_path)


def test_bad_command_lines(smoke, tmp_path):
  config, workdir = smoke
  smoke_args = ('--config', 'configs/demo.py:smoke', '--workdir')
  out = launch(*smoke_args, str(tmp_path), '--config.fl.roundz=4')
  assert out.returncode != 0
  assert "no such config field 'roundz'" in out.stderr and 'Did you mean "rounds"' in out.stderr
  out = launch(*smoke_args, str(tmp_path), '--config.fl.rounds=many')
  assert out.returncode != 0 and '--config.fl.rounds=many' in out.stderr
  out = launch(*smoke_args, str(workdir), f'--config.data.cache_dir={config.data.cache_dir}',
               '--config.fl.alpha=0.5')
  assert out.returncode == 1
  assert 'holds a run of a different config' in out.stderr
  assert 'fl.alpha: 0.01 in the workdir, 0.5 now' in out.stderr
  assert not list(tmp_path.iterdir())  # nothing written by the refused runs


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(smoke, tmp_path):
  config, reference_dir = smoke
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(
      [sys.executable, str(REPO / 'launch.py'), '--config', 'configs/demo.py:smoke',
       f'--config.data.cache_dir={config.data.cache_dir}', '--workdir', str(workdir)],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Kill in the middle of the federated stage, as soon as round 2 is committed.
  deadline = time.time() + 240
  while not (workdir / 'checkpoints' / 'fl' / '2').exists():
    assert proc.poll() is None, 'the run ended before it could be killed'
    assert time.time() < deadline, 'round 2 never appeared'
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (workdir / 'results.json').exists()
  train.run(config, workdir)  # the same config: resume
  for name in ('results.json', 'metrics.jsonl'):
    assert (workdir / name).read_bytes() == (reference_dir / name).read_bytes(), name


@pytest.mark.parametrize('name, arg', [('demo', ''), ('demo', 'smoke'), ('wbc', ''), ('wbc', 'smoke'),
                                       ('paper', '')])
def test_configs_have_the_keys_users_rely_on(name, arg):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(arg)
  for key in ('seed', 'data.root', 'data.reference', 'data.image_size', 'model.frozen_blocks',
              'fl.algorithm', 'fl.rounds', 'fl.local_epochs'):
    node = config
    for part in key.split('.'):
      node = node[part]
  assert config.fl.algorithm in ('fed_dyn', 'fed_avg', 'fed_prox', 'scaffold')
  assert config.data.image_size % 32 == 0
  with pytest.raises(AttributeError):  # locked: a typo is an error, not a new field
    config.fl.alfa = 0.1


def test_paper_sweep_points_apply():
  from configs import paper  # pylint: disable=g-import-not-at-top
  config = paper.get_config()
  points = paper.get_sweep()
  names = {sweep.point_name(p) for p in points}
  assert len(names) == len(points) == 30
  for p in points:
    point = sweep.apply(config, p)
    for key, value in p.items():
      section, _, leaf = key.rpartition('.')
      assert (point[section] if section else point)[leaf] == value


def test_privacy_sweep_is_dp_candidates_per_epsilon_then_fedavg_without_dp():
  from configs import wbc, wbc_privacy  # pylint: disable=g-import-not-at-top
  config, recipe = wbc_privacy.get_config(), wbc.get_config()
  assert (config.fl.dp.mode, config.fl.rounds, config.fl.local_steps) == ('example', 30, 0)
  # Candidate 0 is configs/wbc.py's own FL recipe; every point applies to the config.
  assert wbc_privacy.CANDIDATES[0] == (recipe.model.frozen_blocks, recipe.fl.batch_size,
                                       recipe.fl.lr, config.fl.rounds, recipe.fl.local_epochs)
  points = wbc_privacy.get_sweep()
  n = len(wbc_privacy.CANDIDATES)
  assert len({sweep.point_name(p) for p in points}) == len(points) == 3 * 2 * n + 1
  assert sorted({sweep.apply(config, p).fl.rounds for p in points}) == [10, 30, recipe.fl.rounds]
  assert sorted({sweep.apply(config, p).fl.local_epochs for p in points}) == [1, 2]
  for p in points:
    point = sweep.apply(config, p)
    assert point.fl.dp.mode == p.get('fl.dp.mode', 'example')
    assert point.fl.batch_size == p['fl.batch_size'] and point.fl.lr == p['fl.lr']
  plain = sweep.apply(config, points[-1])
  assert (plain.fl.algorithm, plain.fl.rounds, plain.fl.dp.mode) == ('fed_avg', recipe.fl.rounds,
                                                                    'off')


def test_loco_sweep_leaves_out_each_external_center_once():
  from configs import wbc_loco  # pylint: disable=g-import-not-at-top
  from fedblood.study import validate  # pylint: disable=g-import-not-at-top
  config = wbc_loco.get_config()
  held = [sweep.apply(config, p).fl.holdout for p in wbc_loco.get_sweep()]
  assert sorted(h for (h,) in held) == sorted(set(config.data.crop) - {config.data.reference})
  for p in wbc_loco.get_sweep():
    validate.check(sweep.apply(config, p))  # the rules of every field, before any data


def test_levers_sweep_points_are_distinct_and_each_passes_the_config_rules():
  from configs import wbc, wbc_levers  # pylint: disable=g-import-not-at-top
  from fedblood.study import validate  # pylint: disable=g-import-not-at-top
  config, recipe = wbc_levers.get_config(), wbc.get_config()
  points = wbc_levers.get_sweep()
  assert len({sweep.point_name(p) for p in points}) == len(points)
  for p in points:
    point = sweep.apply(config, p)
    validate.check(point)  # every field's rules (fl.init='scratch' needs frozen 0), before data
    changed = [k for k, v in p.items() if recipe[k] != v]  # ConfigDict reads dotted keys
    # Each point is the recipe with its own lever(s) moved, except the recipe's own weighting.
    assert changed or p == {'fl.weighting': recipe.fl.weighting}, p
