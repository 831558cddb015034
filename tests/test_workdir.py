"""fedblood.rundir.workdir: the one reader of metrics.jsonl, and the one rule for a torn last line."""

import json
import logging
import re

import pytest

from configs import demo
from fedblood.reporting import report
from fedblood.rundir import runlog
from fedblood.rundir import workdir as workdir_lib
from report_samples import sample_history, sample_results


def test_a_torn_last_line_is_no_row_for_any_reader(tmp_path):
  rows = sample_history()
  text = ''.join(json.dumps(r) + '\n' for r in rows)
  torn = json.dumps({'stage': 'fl', 'round': 3, 'center': 'ref', 'accuracy': 0.0})[:25]
  (tmp_path / workdir_lib.METRICS).write_text(text + torn)
  assert workdir_lib.read_rows(tmp_path) == rows
  # The report reads the same rows, so a run killed mid-write still gets its report.
  workdir_lib.write_results(tmp_path, sample_results(), {'total_s': 1.0})
  assert report.write_report(tmp_path).is_file()
  assert json.loads((tmp_path / workdir_lib.TIMING).read_text()) == {'total_s': 1.0}
  # The next run's truncate drops the torn line from the file itself; the rows stay.
  runlog.truncate(tmp_path, 'fl', committed=2)
  assert (tmp_path / workdir_lib.METRICS).read_text() == text
  assert workdir_lib.read_rows(tmp_path) == rows


def test_no_file_no_rows(tmp_path):
  assert workdir_lib.read_rows(tmp_path) == []
  assert workdir_lib.read_config(tmp_path) is None


def test_torn_last_line_dropped_with_a_warning_other_garbage_refused(tmp_path, caplog):
  rows = sample_history()[:3]
  text = ''.join(json.dumps(r) + '\n' for r in rows)
  file = tmp_path / workdir_lib.METRICS
  file.write_text(text + '{"stage": "fl", "ro')
  with caplog.at_level(logging.WARNING):
    assert workdir_lib.read_rows(tmp_path) == rows
  assert any(f'{file}: dropping its torn last line 4' in r.getMessage() for r in caplog.records)
  for garbage in ('{"stage": "fl", "ro\n', '[1, 2]\n', '\x00\x00\x00\n'):
    file.write_text(json.dumps(rows[0]) + '\n' + garbage + text)
    with pytest.raises(ValueError, match=rf'{re.escape(str(file))} line 2 is not a JSON row'):
      workdir_lib.read_rows(tmp_path)
    with pytest.raises(ValueError, match='line 2 is not a JSON row'):
      runlog.truncate(tmp_path, 'fl', 1)


def _row(stage, step):
  return {'stage': stage, ('round' if stage == 'fl' else 'epoch'): step, 'accuracy': 0.5}


def test_a_stage_replaying_steps_puts_its_rows_before_later_stages(tmp_path):
  """The FL stage's latest step was lost after the baselines ran: rows come back in order."""
  ref = [_row('reference', 1), _row('reference', 2)]
  fl = [_row('fl', r) for r in (1, 2, 3)]
  local = [_row('local_a', 1), _row('local_a', 2)]
  file = tmp_path / workdir_lib.METRICS
  whole = ''.join(json.dumps(r) + '\n' for r in ref + fl + local)
  file.write_text(whole)
  runlog.truncate(tmp_path, 'fl', 1)  # resumed from round 1
  assert workdir_lib.read_rows(tmp_path, held=False) == ref + fl[:1]
  assert workdir_lib.read_rows(tmp_path) == ref + fl[:1] + local  # readers see every row
  log = runlog.logger(tmp_path, tensorboard=False)
  log(fl[1])
  runlog.truncate(tmp_path, 'fl', 2)  # killed and resumed again: the held rows survive
  log(fl[2])
  runlog.truncate(tmp_path, 'local_a', 2)  # the next stage: the held rows go back first
  assert file.read_text() == whole and not (tmp_path / workdir_lib.HELD).exists()
  runlog.truncate(tmp_path, 'fl', 1)
  runlog.close(tmp_path)  # no later stage: close puts them back
  assert workdir_lib.read_rows(tmp_path, held=False) == ref + fl[:1] + local


def test_an_older_config_without_a_later_field_still_matches(tmp_path):
  config = demo.get_config('smoke')
  workdir_lib.check_config(config, tmp_path)
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['fl']['select'] == 'val'
  del saved['fl']['select']  # as a run written before fl.select existed
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  before = (tmp_path / 'config.json').read_bytes()
  for rule in ('val', 'last'):  # it only picks among saved rounds: either resumes
    other = demo.get_config('smoke')
    with other.unlocked():
      other.fl.select = rule
    workdir_lib.check_config(other, tmp_path)
  assert (tmp_path / 'config.json').read_bytes() == before  # its fingerprint stays
  other = demo.get_config('smoke')
  with other.unlocked():
    other.fl.rounds += 1  # any other field still refuses
  with pytest.raises(ValueError, match=r'fl\.rounds: 3 in the workdir, 4 now'):
    workdir_lib.check_config(other, tmp_path)


def test_a_config_with_the_later_field_must_match_it(tmp_path):
  workdir_lib.check_config(demo.get_config('smoke'), tmp_path)
  other = demo.get_config('smoke')
  with other.unlocked():
    other.fl.select = 'last'
  with pytest.raises(ValueError, match=r"fl\.select: 'val' in the workdir, 'last' now"):
    workdir_lib.check_config(other, tmp_path)


@pytest.mark.parametrize('path, value, shown', [
    (('model', 'tta'), True, 'True'),                 # written before test-time averaging
    (('data', 'augment', 'rand_conv'), 0.5, '0.5'),   # written before RandConv
    (('fl', 'swa_start'), 50, '50'),                  # written before weight averaging
    (('fl', 'local_momentum'), 0.9, '0.9'),           # written before local momentum
    (('fl', 'local_steps'), 31, '31'),                # written before fixed local steps
])
def test_a_later_field_that_changes_results_matches_only_its_old_value(tmp_path, path, value,
                                                                       shown):
  workdir_lib.check_config(demo.get_config('smoke'), tmp_path)
  saved = json.loads((tmp_path / 'config.json').read_text())
  parent = saved
  for key in path[:-1]:
    parent = parent[key]
  del parent[path[-1]]  # as a run written before the field existed
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  workdir_lib.check_config(demo.get_config('smoke'), tmp_path)  # the old value: what it did
  other = demo.get_config('smoke')
  with other.unlocked():
    node = other
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
  name = '.'.join(path).replace('.', r'\.')
  with pytest.raises(ValueError, match=rf"{name}: '\(absent\)' in the workdir, {shown} now"):
    workdir_lib.check_config(other, tmp_path)
