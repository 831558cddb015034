"""Hostile-but-realistic use: bad configs, busy workdirs, corrupt files, tiny centers, odd names.

Each test is one case of issue 12; the smoke run (test_train's session fixture) is reused, and
everything else is tiny (synthetic or a few 32 px PNGs, refusals that stop before any training).
"""

import json
import logging
import os
from pathlib import Path
import re
import shutil
import signal
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from fedblood import data, names
from fedblood.data import checks
from fedblood.data import plan as data_plan
from fedblood.reporting import report
from fedblood.rundir import checkpoint, checkpoint_listing, lock
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import inference, sweep
from fedblood.study import train
from fedblood.study import validate
from report_samples import sample_history, sample_results
from study_helpers import smoke_config

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _set(config, key, value):
  section, _, leaf = key.rpartition('.')
  node = config
  for part in section.split('.') if section else []:
    node = node[part]
  with config.unlocked():
    node[leaf] = value


# ------------------------------------------------------------------------ 1. config validation
@pytest.mark.parametrize('key, value, says', [
    ('fl.algorithm', 'fedsgd', 'must be one of'),
    ('fl.rounds', -1, 'integer >= 1'),
    ('fl.rounds', 0, 'integer >= 1'),
    ('fl.lr', -1.0, '> 0'),
    ('reference.lr', -1.0, '> 0'),
    ('reference.epochs', 0, 'integer >= 1'),
    ('reference.batch_size', 0, 'integer >= 1'),
    ('fl.batch_size', 0, 'integer >= 1'),
    ('baselines.batch_size', 0, 'integer >= 1'),
    ('eval.batch_size', 0, 'integer >= 1'),
    ('checkpoint.every', 0, 'integer >= 1'),
    ('fl.participation', 0.0, r'in \(0, 1\]'),
    ('fl.server_momentum', 1.0, r'in \[0, 1\)'),
    ('fl.execution', 'fastest', 'must be one of'),
    ('fl.weighting', 'rows', 'must be one of'),
    ('model.frozen_blocks', 7, '0..5'),
    ('fl.eval_model', 'best', 'must be one of'),
    ('reference.restore', '/nonexistent/ref', 'no such file'),
    ('data.reference', 'nowhere', 'is not one of the centers'),
    ('fl.dp.mode', 'record', 'must be one of'),
    ('fl.dp.mode', 'client', "supports fl.algorithm 'fed_avg'"),
    # Issue 22: what the run refused only after writing (or never named), refused up front.
    ('fl.alpha', 0.0, 'must be > 0 for fed_dyn'),
    ('fl.server_lr', 0.5, "fed_dyn' has no server step size"),
    ('fl.server_momentum', 0.9, "fed_dyn' has no server step size"),
    ('fl.dp.delta', 2.0, r'must be in \(0, 1\)'),
    ('fl.dp.accountant', 'moments', r"must be one of \('rdp', 'pld'\)"),
    ('fl.dp.noise_multiplier', float('nan'), 'must be a finite number >= 0'),
    ('fl.dp.clip', float('inf'), 'must be a finite number > 0'),
    ('model.num_classes', 3, 'must be 5: the data has the classes'),
    ('seed', 2**64, r'must be an integer in \[0, 2\^63\)'),
    ('fl.dp.seed', -1, r'must be an integer in \[0, 2\^63\)'),
    ('fl.holdout', ('synth0',), 'the reference center .* cannot be held out'),
    ('fl.holdout', ('nowhere',), 'no center named'),
    ('fl.participation', float('nan'), r'in \(0, 1\]'),
    ('baselines.init', 'pooled', 'must be one of'),
    ('model.head', 'mlp', 'must be one of'),
    ('fl.local_momentum', 1.0, r'in \[0, 1\)'),
    ('fl.swa_start', -1, 'must be an integer >= 0'),
    ('fl.swa_start', 4, r'is after the last round \(fl.rounds=3\): nothing would be averaged'),
    ('fl.eval_model', 'swa_server', 'set fl.swa_start to the first round averaged'),
    ('fl.local_steps', -1, 'must be an integer >= 0'),
])
def test_bad_config_refused_before_anything_is_written(tmp_path, key, value, says):
  config = smoke_config(tmp_path / 'tfds')
  _set(config, key, value)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=re.escape(key) + '.*' + says):
    train.run(config, workdir)
  assert not workdir.exists()  # nothing written: the corrected command runs in this workdir


@pytest.mark.parametrize('settings, says', [
    # DP-SGD samples each step at rate B / n_k: a center of 82 training images cannot take B=100.
    ({'fl.dp.mode': 'example', 'fl.batch_size': 100}, "fl.batch_size / n_k < 1; center 'synth0'"),
    ({'fl.dp.mode': 'example', 'fl.dp.delta': 0.5}, r'fl.dp.delta=0.5 must be in \(0, 1/n_k\)'),
    ({'fl.dp.mode': 'client', 'fl.algorithm': 'fed_avg', 'fl.participation': 0.5},
     'fl.participation=1.0'),
    ({'fl.algorithm': 'scaffold', 'fl.local_momentum': 0.9},
     r"fl\.local_momentum=0\.9: fl\.algorithm='scaffold' runs plain local SGD"),
    ({'fl.algorithm': 'fed_avg', 'fl.local_momentum': 0.9}, None),
    ({'fl.algorithm': 'fed_avg', 'fl.server_lr': 0.5, 'fl.alpha': 0.0}, None),  # fed_avg: fine
    ({'fl.local_steps': 4, 'fl.local_epochs': 2},
     r'fl\.local_steps=4 with fl\.local_epochs=2: .* set fl\.local_epochs=1'),
    ({'fl.local_steps': 4, 'fl.local_epochs': 1}, None),  # fixed steps with one pass: accepted
])
def test_settings_refused_against_the_data_plan(tmp_path, settings, says):
  config = smoke_config(tmp_path / 'tfds')
  for key, value in settings.items():
    _set(config, key, value)
  if says is None:
    validate.check(config)
    return
  with pytest.raises(ValueError, match=says):
    train.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()
  assert not (tmp_path / 'tfds').exists()  # the plan lists splits without building a dataset


def test_pretrained_weights_for_another_model_refused_without_reading_them(tmp_path):
  config = smoke_config(tmp_path / 'tfds')
  (tmp_path / 'vgg16.pth').write_bytes(b'not read')
  _set(config, 'model.pretrained', str(tmp_path / 'vgg16.pth'))
  with pytest.raises(ValueError, match=r'ImageNet weights need model\.width=1\.0, got 0\.125'):
    train.run(config, tmp_path / 'run')
  _set(config, 'model.width', 1.0)
  with pytest.raises(ValueError, match=r"expect model\.input_norm='imagenet'"):
    _set(config, 'model.input_norm', 'caffe')
    train.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_empty_data_root_is_refused_naming_it(tmp_path):
  config = smoke_config(tmp_path / 'tfds')
  (tmp_path / 'images').mkdir()
  _set(config, 'data.source', 'folder')
  _set(config, 'data.root', str(tmp_path / 'images'))
  with pytest.raises(ValueError, match='data.root=.* holds no center folder'):
    train.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('folds', [0, 3])
def test_data_plan_has_the_splits_of_the_loaded_centers(tmp_path, folds):
  config = smoke_config(tmp_path / 'tfds')
  if folds:  # k-fold: the plan's test split is the loaded fold, not the test_fraction split
    _set(config, 'data.folds', folds)
    _set(config, 'data.fold', 1)
  planned = data_plan.plan(config.data)
  loaded = data.load_centers(config.data)
  assert [c.name for c in planned] == [c.name for c in loaded]
  for p, c in zip(planned, loaded):
    for split in ('train', 'val', 'test'):
      np.testing.assert_array_equal(np.sort(getattr(p, split).files),
                                    np.sort(getattr(c, split).files))


def test_hostile_setting_from_the_command_line_is_one_line_and_writes_nothing(tmp_path):
  out = subprocess.run(
      [sys.executable, str(REPO / 'launch.py'), '--config', 'configs/demo.py:smoke',
       f'--config.data.cache_dir={tmp_path / "tfds"}', '--config.fl.alpha=0',
       '--workdir', str(tmp_path / 'run')], cwd=REPO, env=ENV, capture_output=True, text=True,
      timeout=300)
  assert out.returncode != 0
  assert 'Traceback' not in out.stderr
  assert 'fl.alpha must be > 0 for fed_dyn' in out.stderr
  assert not (tmp_path / 'run').exists()


def test_corrected_setting_runs_in_the_same_workdir(tmp_path):
  config = smoke_config(tmp_path / 'tfds')
  _set(config, 'fl.algorithm', 'fedsgd')
  with pytest.raises(ValueError, match='fl.algorithm'):
    train.run(config, tmp_path / 'run')
  _set(config, 'fl.algorithm', 'fed_avg')
  validate.check(config)
  workdir_lib.check_config(config, tmp_path / 'run')  # not "a run of a different config"
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['fl']['algorithm'] == 'fed_avg'


def test_sweep_checks_every_point_before_training_any(tmp_path):
  config_file = tmp_path / 'sweep_config.py'
  config_file.write_text('def get_sweep():\n  return [{"seed": 0}, {"fl.lr": -0.1}]\n')
  with pytest.raises(ValueError, match=r'config fl\.lr=-0\.1 must be a finite number > 0'):
    sweep.run(smoke_config(tmp_path / 'tfds'), str(config_file), tmp_path / 'sweep')
  assert not (tmp_path / 'sweep').exists()


def test_unknown_sub_configs_are_accepted():
  config = smoke_config('/tmp/unused')
  with config.unlocked():
    # A sub-config no rule knows (a user's extension) is left alone, not rejected.
    config.fl.extension = ml_collections.ConfigDict({'enabled': True, 'strength': 1.1})
    config.sweep = ml_collections.ConfigDict({'seeds': (0, 1, 2)})
  validate.check(config)


@pytest.mark.parametrize('content', [b'', b'{"fl": {"rounds": 3', b'\xff\xfe garbage'])
def test_unreadable_config_json_named_with_the_remedy(tmp_path, content):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_bytes(content)
  config = smoke_config(tmp_path / 'tfds')
  with pytest.raises(ValueError, match=rf'{re.escape(str(workdir / "config.json"))} is '
                                       r'unreadable.*mv .*config\.json.*SAME command'):
    train.run(config, workdir)
  with pytest.raises(ValueError, match='config.json is unreadable'):
    inference.load_config(workdir)
  assert (workdir / 'config.json').read_bytes() == content  # never overwritten


def test_config_json_written_atomically(tmp_path, monkeypatch):
  def disk_full(fd):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(os, 'fsync', disk_full)
  config = smoke_config(tmp_path / 'tfds')
  with pytest.raises(OSError, match='No space left'):
    workdir_lib.write_config(config, tmp_path)
  assert list(tmp_path.iterdir()) == []  # no 0-byte config.json, no temporary file
  monkeypatch.undo()
  workdir_lib.write_config(config, tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text()) == workdir_lib.config_dict(config)


# ------------------------------------------------------------------------------ 2. workdir lock
def test_second_run_in_a_busy_workdir_exits_naming_the_holder(tmp_path):
  workdir = tmp_path / 'run'
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom fedblood.rundir import lock\n'
       f'with lock.hold({str(workdir)!r}):\n  print("held", flush=True)\n  time.sleep(120)'],
      stdout=subprocess.PIPE, text=True, env=ENV)
  try:
    assert holder.stdout.readline().strip() == 'held'
    config = smoke_config(tmp_path / 'tfds')
    with pytest.raises(lock.WorkdirBusy, match=rf'in use by another fedblood run \(PID '
                                               rf'{holder.pid} on '):
      train.run(config, workdir)
    out = subprocess.run([sys.executable, str(REPO / 'launch.py'), '--config',
                          'configs/demo.py:smoke', '--workdir', str(workdir)],
                         cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 1 and f'(PID {holder.pid} on' in out.stderr, out.stderr
    assert 'Traceback' not in out.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ['run.lock']  # nothing else written
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The dead holder's lock file still names it; the next run takes it over.
  assert f'PID {holder.pid}' in (workdir / 'run.lock').read_text()
  with lock.hold(workdir) as path:
    assert path.read_text().startswith(f'PID {os.getpid()} ')


# ------------------------------------------------------------------- 3. checkpoints that survive
def _largest_array_file(step_dir: Path) -> Path:
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and 'METADATA' not in p.name
           and p.suffix != '.json']
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(path: Path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.fixture(scope='module')
def stopped_after_fl(smoke, tmp_path_factory):
  """A smoke run stopped after FL round 3 was committed (before the local-only baselines)."""
  config, _ = smoke
  workdir = tmp_path_factory.mktemp('stopped') / 'run'
  real_save, calls = checkpoint.save, []

  def save(*args, **kwargs):  # saves: reference epochs 1-2, reference model, rounds 1-3, ...
    calls.append(1)
    if len(calls) == 7:
      raise KeyboardInterrupt('simulated interruption')
    return real_save(*args, **kwargs)

  checkpoint.save = save
  try:
    with pytest.raises(KeyboardInterrupt):
      train.run(config, workdir)
  finally:
    checkpoint.save = real_save
  return workdir


@pytest.mark.parametrize('stage, step, damage', [
    ('fl', 3, 'array'), ('fl', 3, 'state/_METADATA'), ('reference_model', 2, 'meta/metadata')])
def test_corrupt_latest_step_is_set_aside_and_resume_is_identical(smoke, stopped_after_fl,
                                                                  tmp_path, caplog, stage, step,
                                                                  damage):
  config, reference_dir = smoke
  workdir = tmp_path / 'copy'
  shutil.copytree(stopped_after_fl, workdir)
  step_dir = workdir / 'checkpoints' / stage / str(step)
  if damage == 'array':
    bad = _largest_array_file(step_dir)
    _truncate(bad)
  elif damage == 'state/_METADATA':
    bad = step_dir / damage
    bad.write_bytes(b'\0' * bad.stat().st_size)
  else:
    bad = step_dir / damage
    _truncate(bad)
  damaged = bad.read_bytes()
  with caplog.at_level(logging.WARNING):
    train.run(config, workdir)
  lines = [r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage()]
  assert len(lines) == 1, lines
  assert f'checkpoint step {step} of {workdir / "checkpoints" / stage} cannot be' in lines[0]
  # The file at fault: the JSON file that does not parse, or the array store TensorStore names.
  assert str(bad if damage != 'array' else step_dir / 'state') in lines[0]
  resumed = 'step 1' if stage == 'fl' else 'the start of this stage'
  assert lines[0].endswith(f'resuming from {resumed}')
  # Moved aside, never deleted: the damaged bytes are still there.
  moved = workdir / 'checkpoints' / f'{stage}.corrupt' / str(step) / bad.relative_to(step_dir)
  assert moved.read_bytes() == damaged
  for name in ('results.json', 'metrics.jsonl'):
    assert (workdir / name).read_bytes() == (reference_dir / name).read_bytes(), name
  # The same steps (and best) as the uninterrupted run, plus the set-aside listing.
  aside = f"\n\n[{stage}.corrupt] set aside (unrestorable): ['{step}']"
  listing = checkpoint_listing.inspect(workdir).split('\n', 1)[1]
  assert aside in listing
  assert listing.replace(aside, '') == checkpoint_listing.inspect(reference_dir).split('\n', 1)[1]


def test_unparsable_metrics_file_sets_its_step_aside_when_the_manager_opens(smoke, tmp_path,
                                                                          caplog):
  _, reference_dir = smoke
  fl_dir = tmp_path / 'fl'
  shutil.copytree(reference_dir / 'checkpoints' / 'fl', fl_dir)
  bad = fl_dir / '3' / 'metrics' / 'metrics'
  _truncate(bad)
  with caplog.at_level(logging.WARNING):
    mngr = checkpoint.manager(fl_dir, keep=1, best_metric='val_accuracy')
  assert list(mngr.all_steps()) == [1] and mngr.best_step() == 1
  mngr.close()
  line, = [r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage()]
  assert line.startswith(f'checkpoint step 3 of {fl_dir} cannot be restored ({bad}: JSONDecode')
  assert (tmp_path / 'fl.corrupt' / '3' / 'metrics' / 'metrics').is_file()


def test_evaluate_on_a_damaged_step_names_it_in_one_line(smoke, tmp_path):
  _, reference_dir = smoke
  workdir = tmp_path / 'copy'
  shutil.copytree(reference_dir, workdir)
  bad = workdir / 'checkpoints' / 'fl' / '3' / 'meta' / 'metadata'
  _truncate(bad)
  with pytest.raises(ValueError, match=rf'^checkpoint step 3 of .*fl cannot be restored '
                                       rf'\({re.escape(str(bad))}: '
                                       r'(JSONDecodeError|ChecksumError): [^\n]*'
                                       r'Pass --round with an intact round'):
    inference.load_model(workdir)
  assert inference.load_model(workdir, 1).round == 1  # the intact round still loads
  listing = checkpoint_listing.inspect(workdir)
  assert f'  step 3: DAMAGED, checkpoint step 3 of {bad.parents[2]} cannot be restored' in listing
  assert '  round 1 (best): ' in listing
  assert bad.exists()  # evaluate/predict move nothing


# --------------------------------------------------------------------------- 4. small centers
def _center(root: Path, name: str, seed: int, per_class: int = 4, classes=data.CLASSES) -> Path:
  """A center folder of random 32 px PNGs."""
  rng = np.random.default_rng(seed)
  for cls in classes:
    (root / name / cls).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(
          root / name / cls / f'{cls[:3]}{i}.png')
  return root / name


def test_center_too_small_to_split_refused_before_training(tmp_path):
  root = tmp_path / 'centers'
  _center(root, 'big', 0)
  _center(root, 'tiny', 1, per_class=1, classes=('monocyte',))
  config = smoke_config(tmp_path / 'tfds')
  config.data.update(source='folder', root=str(root))
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=r"center\(s\) 'tiny' \(1 images: train 1, val 0, "
                                       r'test 0\) too small to split'):
    train.run(config, workdir)
  assert not workdir.exists()  # refused by validation's data plan, before the workdir is made


# ------------------------------------------------------------------------------- 5. odd names
HOSTILE = ('ref', 'a|b\nc', '<img src=x onerror=alert(1)>', 'with space')


def test_center_names_escaped_in_report_and_slugged_in_file_names(tmp_path):
  res = sample_results()
  rename = dict(zip(res['centers'], HOSTILE))
  rename['ext_c'] = HOSTILE[3]
  res = json.loads(json.dumps(res))
  for key in ('before', 'after'):
    res[key]['ext_c'] = res[key]['ext_b']
    res['confusion'][key]['ext_c'] = res['confusion'][key]['ext_b']
  res['centers'].append('ext_c')
  text = json.dumps(res)
  for old, new in rename.items():
    text = text.replace(f'"{old}"', json.dumps(new))
  res = json.loads(text)
  history = [dict(r, center=rename[r['center']]) for r in sample_history()]
  md = report.write_report(tmp_path, res, history).read_text()
  assert '<img' not in md and '&lt;img src=x onerror=alert(1)&gt;' in md
  tables = [l for l in md.splitlines() if l.startswith('|')]
  for line in tables:  # every row of a table has its header's number of cells
    header = next(t for t in tables[:tables.index(line) + 1][::-1] if t.startswith('| Center'))
    assert len(re.split(r'(?<!\\)\|', line)) == len(re.split(r'(?<!\\)\|', header)), line
  assert r'| a\|b c |' in md
  links = re.findall(r'!\[[^\]]*\]\(([^)]*)\)', md)
  assert len(links) == 1 + 2 * 4
  for link in links:
    assert ' ' not in link and (tmp_path / link).is_file(), link
  assert {names.slug(n) for n in HOSTILE} == {'ref', 'a_b_c-' + names.slug('a|b\nc')[-8:],
                                              names.slug(HOSTILE[2]), names.slug(HOSTILE[3])}
  for n in HOSTILE[1:]:
    assert re.fullmatch(r'[A-Za-z0-9_.-]+', names.slug(n)) and names.slug(n) != n
  assert names.slug('pbc_barcelona') == 'pbc_barcelona'  # safe names keep their paths


# ------------------------------------------------------------------------------ 6. duplicates
def test_same_image_in_two_centers_is_a_warning_naming_both(tmp_path, caplog):
  root = tmp_path / 'centers'
  _center(root, 'alpha', 0)
  _center(root, 'beta', 1)
  shutil.copy(root / 'alpha' / 'monocyte' / 'mon2.png', root / 'beta' / 'monocyte' / 'copy.png')
  cfg = data.default_config()
  cfg.update(source='folder', root=str(root), image_size=32, cache_dir=str(tmp_path / 'cache'))
  with caplog.at_level(logging.WARNING):
    centers = data.load_centers(cfg)
  groups = checks.duplicates(centers)
  assert len(groups) == 1 and len(groups[0]) == 2
  assert re.fullmatch(r'alpha/(train|val|test)/monocyte/mon2\.png', groups[0][0])
  assert re.fullmatch(r'beta/(train|val|test)/monocyte/copy\.png', groups[0][1])
  warnings = [r.getMessage() for r in caplog.records if 'more than one center' in r.getMessage()]
  assert len(warnings) == 1 and ' = '.join(groups[0]) in warnings[0]


# ------------------------------------------------------------- 7-8. caches, and TFDS quietness
def test_unreadable_cache_is_rebuilt_and_tfds_is_quiet(tmp_path, caplog, capfd):
  config = smoke_config(tmp_path / 'tfds')
  with config.unlocked():
    config.data.synthetic.num_centers = 2
    config.data.synthetic.images_per_center = (30, 20)
  with caplog.at_level(logging.INFO):
    first = data.load_centers(config.data)
  out, err = capfd.readouterr()
  assert 'Downloading and preparing' not in out + err and 'Generating' not in out + err
  assert not [r for r in caplog.records if 'custom data configuration' in r.getMessage()]
  assert re.findall(r'fedblood: center (\w+): (\d+) images', err) == [('synth0', '30'),
                                                                      ('synth1', '20')]
  cache = next((tmp_path / 'tfds' / 'fedblood').glob('synth1-*.npz'))
  _truncate(cache)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    again = data.load_centers(config.data)
  line, = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  assert str(cache) in line and 'rebuilding it from the images' in line
  for a, b in zip(first, again, strict=True):
    for x, y in zip(a[1:], b[1:], strict=True):
      for f in x._fields:
        np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
  with np.load(cache) as z:  # rebuilt whole
    assert len(z['train_labels']) == len(again[1].train.labels)


# ------------------------------------------------------------------------------ minor ones
def test_predict_into_an_existing_directory_refused_without_stray_files(smoke, tmp_path):
  _, workdir = smoke
  images = tmp_path / 'cells'
  images.mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / 'c.png')
  out_dir = tmp_path / 'out'
  out_dir.mkdir()
  with pytest.raises(ValueError, match=rf'--output {re.escape(str(out_dir))} is a directory'):
    inference.predict_folder(workdir, images, out_dir)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['cells', 'out']
  assert not list(out_dir.iterdir())
