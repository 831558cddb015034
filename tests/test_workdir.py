"""fedblood.workdir: the one reader of metrics.jsonl, and the one rule for a torn last line."""

import json

from fedblood import report, runlog
from fedblood import workdir as workdir_lib
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
