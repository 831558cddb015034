"""A run's logs as it trains: metrics.jsonl rows (appended, truncated on resume), TensorBoard.

``metrics.jsonl`` (:mod:`fedblood.rundir.workdir` reads it) has one JSON object per line: a row per
epoch of a centralized fit (``stage``, ``epoch``, ...) and a row per round per center of the
federated stage (``stage='fl'``, ``round``, ``center``, ...). Rows are appended before the
checkpoint that commits their step; on resume :func:`truncate` drops a stage's rows past its
last committed step, so the file of a resumed run equals that of an uninterrupted one.

A stage may replay steps after later stages logged theirs (its latest step was damaged and set
aside, or deleted, after the run went on): its replayed rows must come before theirs, as in an
uninterrupted run. :func:`truncate` then moves the later stages' rows to
``metrics.held.jsonl`` (written before the file is cut, so a kill loses nothing) and they are
put back after the replaying stage's rows, at the first row, truncate or :func:`close` of
another stage.
"""

import json
import os
from pathlib import Path

from absl import logging

from fedblood.rundir import workdir as workdir_lib

_WRITERS = {}


def _step(row) -> int:
  return row['round'] if 'round' in row else row.get('epoch', 0)


def _write_atomic(path: Path, rows: list[dict]) -> None:
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(path)


def _held(workdir) -> tuple[str | None, list[dict]]:
  """``(the replaying stage, the held rows)`` of ``metrics.held.jsonl``; (None, []) if none."""
  held = workdir_lib.path(workdir, workdir_lib.HELD)
  if not held.exists():
    return None, []
  header, *rows = workdir_lib.parse_rows(held, held.read_text())
  return header['held_for'], rows


def put_back(workdir) -> None:
  """Appends the held rows (:func:`truncate`) to metrics.jsonl and removes the held file."""
  _, held = _held(workdir)
  if held:
    _write_atomic(workdir_lib.path(workdir, workdir_lib.METRICS),
                  workdir_lib.read_rows(workdir, held=False) + held)
  workdir_lib.path(workdir, workdir_lib.HELD).unlink(missing_ok=True)


def _put_back_unless(workdir, stage: str) -> None:
  holder = _held(workdir)[0] if workdir_lib.path(workdir, workdir_lib.HELD).exists() else None
  if holder not in (None, stage):
    put_back(workdir)


def truncate(workdir, stage: str, committed: int) -> None:
  """Drops ``stage``'s rows past step ``committed`` (written, but killed before the checkpoint).

  Also drops a partial last line (a run killed in the middle of a write). Rows of other stages
  logged after the first dropped row are held in ``metrics.held.jsonl`` until ``stage`` has
  replayed its steps (see the module docstring).
  """
  _put_back_unless(workdir, stage)
  path = workdir_lib.path(workdir, workdir_lib.METRICS)
  if not path.exists():
    return
  text = path.read_text()
  rows = workdir_lib.parse_rows(path, text)
  past = [i for i, r in enumerate(rows) if r.get('stage') == stage and _step(r) > committed]
  if not past and text.endswith('\n'):
    return
  cut = past[0] if past else len(rows)
  later = [r for r in rows[cut:] if r.get('stage') != stage]
  logging.info('metrics.jsonl: dropping %d %s rows past step %d (not checkpointed)',
               len(past), stage, committed)
  if later:
    holder, held = _held(workdir)
    _write_atomic(workdir_lib.path(workdir, workdir_lib.HELD),
                  [{'held_for': holder or stage}] + later + held)
    logging.warning('%s: stage %s replays from step %d; the %d rows of later stages after it '
                    'are held in %s and put back after its rows', path, stage, committed,
                    len(later), workdir_lib.HELD)
  _write_atomic(path, rows[:cut])


def _writer(workdir):
  key = str(Path(workdir).resolve())
  if key not in _WRITERS:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    _WRITERS[key] = SummaryWriter(logdir=str(workdir_lib.path(workdir, workdir_lib.TENSORBOARD)))
  return _WRITERS[key]


def logger(workdir, tensorboard: bool = True):
  """``log(row)``: appends a row to metrics.jsonl and its numbers to TensorBoard."""
  path = workdir_lib.path(workdir, workdir_lib.METRICS)

  def log(row: dict) -> None:
    _put_back_unless(workdir, row.get('stage'))
    with open(path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if tensorboard:
      writer = _writer(workdir)
      prefix = row['stage'] + (f'/{row["center"]}' if 'center' in row else '')
      for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ('round', 'epoch'):
          writer.add_scalar(f'{prefix}/{k}', v, _step(row))

  return log


def close(workdir) -> None:
  """Puts back held rows (:func:`truncate`); flushes and closes the TensorBoard writer."""
  put_back(workdir)
  writer = _WRITERS.pop(str(Path(workdir).resolve()), None)
  if writer is not None:
    writer.close()
