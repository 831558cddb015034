"""Integrity (issue 26): a run never uses another run's state, damage is repaired exactly, and
every failure a user can fix is one line.

The hostile inputs are built here on copies of the session's smoke run (conftest.py); the
command-line cases run launch.py in a subprocess and look at its stderr.
"""

import json
import logging
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys

import jax
import pytest

from fedblood.rundir import checkpoint, step_files
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import experiment, inference, train
from fedblood.study.stages import reference

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
ROOT = os.geteuid() == 0  # chmod 000 and read-only modes do not stop root


def _copy(smoke, tmp_path) -> Path:
  _, workdir = smoke
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  return copy


def _outputs(workdir: Path) -> dict:
  return {name: (workdir / name).read_bytes() for name in ('results.json', 'metrics.jsonl')}


# ------------------------------------------------------------------------ 1. fingerprints
@pytest.mark.parametrize('content', [None, 'null', '[1, 2]'])
def test_workdir_with_checkpoints_but_no_readable_config_is_refused(smoke, tmp_path, content):
  config, _ = smoke
  workdir = _copy(smoke, tmp_path)
  if content is None:
    (workdir / 'config.json').unlink()
    says = r'holds checkpoints/, metrics\.jsonl, results\.json of a run but no config\.json'
  else:
    (workdir / 'config.json').write_text(content)
    says = r'config\.json is unreadable \(it holds a JSON (NoneType|list), not an object\)'
  before = _outputs(workdir)
  with pytest.raises(ValueError, match=says):
    train.run(config, workdir)
  assert _outputs(workdir) == before
  assert (not (workdir / 'config.json').exists() if content is None
          else (workdir / 'config.json').read_text() == content)


def _as_another_run(step_dir: Path, **changes) -> dict:
  """Rewrites a step as the same step of a run whose config differs by ``changes``."""
  meta_file = step_dir / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  other = json.loads(json.dumps(meta['config']))
  for key, value in changes.items():
    *parents, leaf = key.split('.')
    node = other
    for part in parents:
      node = node[part]
    node[leaf] = value
  meta.update(fingerprint=workdir_lib.fingerprint(other).digest, config=other)
  meta_file.write_text(json.dumps(meta))
  step_files.write_checksums(step_dir)  # a genuine step of that run: its checksums match
  return meta


@pytest.mark.parametrize('stage, step', [('reference_model', 2), ('fl', 3),
                                         ('local_synth1', None)])
def test_another_runs_step_copied_in_is_refused_naming_it_and_the_fields(smoke, tmp_path, stage,
                                                                        step):
  config, _ = smoke
  workdir = _copy(smoke, tmp_path)
  stage_dir = workdir / 'checkpoints' / stage
  step = step or max(int(p.name) for p in stage_dir.iterdir() if p.name.isdigit())
  _as_another_run(stage_dir / str(step), seed=1)
  says = (rf'checkpoint step {step} of {re.escape(str(stage_dir))} was written by a run of '
          r'another config .*\n  seed: 1 in the checkpoint, 0 in this run')
  with pytest.raises(checkpoint.FingerprintMismatchError, match=says):
    train.run(config, workdir)
  assert (stage_dir / str(step)).is_dir() and not (stage_dir.parent / f'{stage}.corrupt').exists()
  if stage != 'local_synth1':  # evaluate refuses it too
    with pytest.raises(checkpoint.FingerprintMismatchError, match=says):
      inference.load_model(workdir)


def test_reference_restore_from_another_workdir_still_works(smoke, tmp_path):
  config, source = smoke
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.seed = 1
    cfg.reference.restore = str(source)
  exp = experiment.build(cfg)
  params, where = reference.load_reference(source, exp)  # checked against ITS config.json
  assert where == str(source / 'checkpoints' / 'reference_model')
  workdir = tmp_path / 'seed1'
  workdir_lib.check_config(cfg, workdir)
  center = type('Center', (), {'name': 'synth0'})
  got, info = reference.reference_stage(exp, cfg.reference, center, workdir, None)
  assert info['restored_from'] == where
  # Saved as this run's own: a resume restores it without complaint.
  again, _ = reference.reference_stage(exp, cfg.reference, center, workdir, None)
  for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(got), jax.tree.leaves(again)):
    assert (a == b).all() and (a == c).all()


def test_step_of_an_older_fedblood_is_accepted_with_a_warning(smoke, tmp_path, caplog):
  workdir = _copy(smoke, tmp_path)
  step_dir = workdir / 'checkpoints' / 'fl' / '3'
  meta_file = step_dir / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  for key in ('fingerprint', 'config'):
    meta.pop(key)
  meta_file.write_text(json.dumps(meta))
  (step_dir / step_files.CHECKSUMS).unlink()
  with caplog.at_level(logging.WARNING):
    assert inference.load_model(workdir, 3).round == 3
  assert any('step 3 of' in r.getMessage() and 'no checksums and no run fingerprint' in
             r.getMessage() for r in caplog.records)


# ------------------------------------------------------------ 2. damage repaired exactly
def _overwrite(step_dir: Path):
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and 'METADATA' not in p.name
           and p.suffix != '.json']
  bad = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(bad.read_bytes())
  data[len(data) // 2:len(data) // 2 + 16] = bytes(16)  # same size: only the checksum sees it
  bad.write_bytes(bytes(data))
  return bad


@pytest.mark.parametrize('damage', ['overwritten', 'garbage _CHECKPOINT_METADATA', 'deleted'])
def test_damaged_latest_step_of_a_finished_run_repaired_byte_identical(smoke, tmp_path, caplog,
                                                                       damage):
  config, source = smoke
  workdir = _copy(smoke, tmp_path)
  step_dir = workdir / 'checkpoints' / 'fl' / '3'
  if damage == 'overwritten':
    bad = _overwrite(step_dir)
  elif damage == 'deleted':
    shutil.rmtree(step_dir)
  else:
    bad = step_dir / '_CHECKPOINT_METADATA'
    bad.write_text('{"not": "orbax"')
  with caplog.at_level(logging.WARNING):
    train.run(config, workdir)
  assert _outputs(workdir) == _outputs(source)
  assert not (workdir / workdir_lib.HELD).exists()
  lines = [r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage()]
  if damage == 'deleted':
    assert not lines
  else:
    line, = lines
    assert str(bad) in line and f'moved aside to {workdir}/checkpoints/fl.corrupt/3' in line
    assert line.endswith('resuming from step 1')


def test_step_cut_short_before_its_checksums_is_damage(smoke, tmp_path):
  workdir = _copy(smoke, tmp_path)
  fl_dir = workdir / 'checkpoints' / 'fl'
  (fl_dir / '3' / step_files.CHECKSUMS).unlink()
  mngr = checkpoint.manager(fl_dir)
  with pytest.raises(step_files.ChecksumError, match='checksums.sha256 is missing'):
    checkpoint.check_step(mngr, 3)
  mngr.close()


# ------------------------------------------------------------------- 3. sweeps and seeds
def _sweep_file(tmp_path, points) -> str:
  path = tmp_path / 'sweep_config.py'
  path.write_text(f'def get_sweep():\n  return {points!r}\n')
  return str(path)


def test_sweep_rerun_with_another_config_refuses_stale_points(smoke, tmp_path):
  from fedblood.study import sweep  # pylint: disable=g-import-not-at-top
  config, _ = smoke
  root = tmp_path / 'sweep'
  point = sweep.apply(config, {'seed': 0})
  workdir_lib.check_config(point, root / 'seed=0')
  (root / 'seed=0' / 'results.json').write_text('{}')  # finished under fl.rounds=3
  changed = config.copy_and_resolve_references()
  with changed.unlocked():
    changed.fl.rounds = 4
  with pytest.raises(ValueError, match=r'seed=0 holds a run of a different config.*\n'
                                       r'  fl\.rounds: 3 in the workdir, 4 now'):
    sweep.run(changed, _sweep_file(tmp_path, [{'seed': 0}]), root)
  (root / 'seed=0' / 'config.json').unlink()  # a finished point without its config: refused too
  with pytest.raises(ValueError, match=r'seed=0 holds results\.json of a run but no config\.json'):
    sweep.run(config, _sweep_file(tmp_path, [{'seed': 0}]), root)


def test_sweep_and_seed_ranges_are_bounded(tmp_path):
  from fedblood.study import seeds, sweep  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='more than 1000 seeds'):
    seeds.parse_seeds('0-1000000')  # answers at once: no range is expanded
  with pytest.raises(ValueError, match=r'seed 4294967296 is not below 2\^32'):
    seeds.parse_seeds('4294967296')
  assert len(seeds.parse_seeds('0-999')) == 1000
  path = tmp_path / 'big.py'
  path.write_text('import itertools\ndef get_sweep():\n'
                  '  return ({"seed": s} for s in itertools.count())\n')
  with pytest.raises(ValueError, match='more than 1000 points'):
    sweep.load_sweep(str(path))


# ------------------------------------------------------------- 4. one line per failure
def launch(*args, env=None, shell_prefix=None, timeout=300):
  command = [sys.executable, str(REPO / 'launch.py'), *args]
  if shell_prefix:  # limits set by the shell, not by a fork of this multithreaded process
    command = ['sh', '-c', f'{shell_prefix}; exec "$@"', 'sh', *command]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env or ENV,
                        timeout=timeout)


def assert_one_line(out, says: str):
  assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith('fedblood: error: ')]
  assert len(errors) == 1 and re.search(says, errors[0]), out.stderr[-3000:]


def _smoke_args(config, workdir):
  return ('--config', 'configs/demo.py:smoke', f'--config.data.cache_dir={config.data.cache_dir}',
          '--workdir', str(workdir))


def test_config_and_workdir_failures_are_one_line(smoke, tmp_path):
  config, _ = smoke
  assert_one_line(launch('--config', 'configs/absent.py', '--workdir', str(tmp_path / 'a')),
                  r'--config configs/absent\.py: no such config file')
  assert_one_line(launch('--config', 'configs/demo.py:bogus', '--workdir', str(tmp_path / 'a')),
                  r"ValueError: configs/demo.py takes '' or 'smoke', got 'bogus'")
  afile = tmp_path / 'afile'
  afile.write_text('x')
  assert_one_line(launch(*_smoke_args(config, afile)), rf'{afile} is a file, not a directory')
  listed = tmp_path / 'listed'
  listed.mkdir()
  (listed / 'config.json').write_text('[1]')
  assert_one_line(launch(*_smoke_args(config, listed)), r'holds a JSON list, not an object')
  out = launch(*_smoke_args(config, listed), '--debug')  # a bug report: the traceback
  assert out.returncode == 1 and 'Traceback' in out.stderr and 'JSON list' in out.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ['afile', 'listed']


def test_data_failures_are_one_line(smoke, tmp_path):
  config, _ = smoke
  loop = tmp_path / 'loop'
  loop.symlink_to(loop)
  out = launch(*_smoke_args(config, tmp_path / 'run'), '--config.data.source=folder',
               f'--config.data.root={loop}')
  assert_one_line(out, r'(symbolic links|loop)')
  fake = tmp_path / 'fake'  # an environment without the dp extra
  fake.mkdir()
  (fake / 'dp_accounting.py').write_text('raise ImportError("No module named dp_accounting")\n')
  out = launch(*_smoke_args(config, tmp_path / 'dp'), '--config.fl.dp.mode=example',
               env=dict(ENV, PYTHONPATH=f'{fake}:{REPO}'))
  assert_one_line(out, r"fl\.dp needs Google's dp-accounting: pip install 'fedblood\[dp\]'")


def test_file_size_limit_is_one_line(smoke, tmp_path):
  """RLIMIT_FSIZE at 200 kB, SIGXFSZ ignored: the first checkpoint fails with EFBIG."""
  config, _ = smoke
  out = launch(*_smoke_args(config, tmp_path / 'run'), shell_prefix="ulimit -f 195; trap '' XFSZ")
  assert_one_line(out, r'(File too large|EFBIG|errno 27)')


def test_inference_failures_are_one_line(smoke, tmp_path):
  workdir = _copy(smoke, tmp_path)
  images = tmp_path / 'cells'
  images.mkdir()
  shutil.copy(next((workdir / 'figures').glob('*.png')), images / 'c.png')
  afile = tmp_path / 'afile'
  afile.write_text('x')
  assert_one_line(launch('--mode', 'predict', '--workdir', str(workdir), '--input', str(images),
                         '--output', str(afile / 'p.csv')), rf'{afile}')
  bad = workdir / 'checkpoints' / 'fl' / '3' / 'meta' / 'metadata'
  bad.write_text(bad.read_text()[:20])
  assert_one_line(launch('--mode', 'evaluate', '--workdir', str(workdir), '--eval_dir',
                         str(images)), r'checkpoint step 3 of .*fl cannot be restored')


@pytest.mark.skipif(ROOT, reason='root reads and writes through chmod 000 / read-only modes')
def test_unreadable_and_read_only_are_one_line(smoke, tmp_path):
  config, workdir = smoke
  center = tmp_path / 'data' / 'c0' / 'monocyte'
  center.mkdir(parents=True)
  center.chmod(0)
  try:
    out = launch(*_smoke_args(config, tmp_path / 'run'), '--config.data.source=folder',
                 f'--config.data.root={tmp_path / "data"}')
    assert_one_line(out, r'(Permission denied|monocyte)')
  finally:
    center.chmod(0o755)
  locked = tmp_path / 'ro'
  locked.mkdir()
  locked.chmod(0o555)
  try:
    assert_one_line(launch(*_smoke_args(config, locked / 'run')), r'Permission denied')
    assert_one_line(launch('--mode', 'predict', '--workdir', str(workdir), '--input',
                           str(next((workdir / 'figures').glob('*.png'))), '--output',
                           str(locked / 'p.csv')), r'Permission denied')
  finally:
    locked.chmod(0o755)


def test_full_disk_and_read_only_errors_are_expected_bugs_are_not():
  """The classification launch.main uses (a full disk cannot be made here without a mount)."""
  import launch  # pylint: disable=g-import-not-at-top
  full = OSError(28, 'No space left on device', '/w/checkpoints/fl/3')
  assert launch.one_line(full) == 'fedblood: error: No space left on device: /w/checkpoints/fl/3'
  try:
    try:
      raise OSError(30, 'Read-only file system', '/w/config.json')
    except OSError as e:
      raise RuntimeError('writer thread failed') from e  # as a library may wrap it
  except RuntimeError as wrapped:
    assert launch.expected(wrapped)
    assert launch.one_line(wrapped) == 'fedblood: error: Read-only file system: /w/config.json'
  assert launch.expected(ImportError("fl.dp needs Google's dp-accounting"))
  assert not launch.expected(ModuleNotFoundError('no fedblood.x', name='fedblood.x'))
  assert not launch.expected(TypeError('a bug'))
