"""A run's logs as it trains: metrics.jsonl rows (appended, truncated on resume), TensorBoard.

``metrics.jsonl`` (:mod:`fedblood.workdir` reads it) has one JSON object per line: a row per
epoch of a centralized fit (``stage``, ``epoch``, ...) and a row per round per center of the
federated stage (``stage='fl'``, ``round``, ``center``, ...). Rows are appended before the
checkpoint that commits their step; on resume :func:`truncate` drops a stage's rows past its
last committed step, so the file of a resumed run equals that of an uninterrupted one.
"""

import json
from pathlib import Path

from absl import logging

from fedblood import workdir as workdir_lib

_WRITERS = {}


def _step(row) -> int:
  return row['round'] if 'round' in row else row.get('epoch', 0)


def truncate(workdir, stage: str, committed: int) -> None:
  """Drops ``stage``'s rows past step ``committed`` (written, but killed before the checkpoint).

  Also drops a partial last line (a run killed in the middle of a write).
  """
  path = workdir_lib.path(workdir, workdir_lib.METRICS)
  if not path.exists():
    return
  text = path.read_text()
  rows = workdir_lib.read_rows(workdir)
  kept = [r for r in rows if not (r.get('stage') == stage and _step(r) > committed)]
  if len(kept) != len(rows) or (text and not text.endswith('\n')):
    logging.info('metrics.jsonl: dropping %d %s rows past step %d (not checkpointed)',
                 len(rows) - len(kept), stage, committed)
    tmp = path.with_suffix('.jsonl.tmp')
    tmp.write_text(''.join(json.dumps(r) + '\n' for r in kept))
    tmp.replace(path)


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
  """Flushes and closes the workdir's TensorBoard writer."""
  writer = _WRITERS.pop(str(Path(workdir).resolve()), None)
  if writer is not None:
    writer.close()
