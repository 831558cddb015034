"""A run's logs: config.json (and the refusal to mix configs), metrics.jsonl, TensorBoard events.

``metrics.jsonl`` has one JSON object per line: a row per epoch of a
centralized fit (``stage``, ``epoch``, ...) and a row per round per center of
the federated stage (``stage='fl'``, ``round``, ``center``, ...). Rows are
appended before the checkpoint that commits their step; on resume
:func:`truncate` drops a stage's rows past its last committed step, so the
file of a resumed run equals that of an uninterrupted one.
"""

import json
import os
from pathlib import Path

from absl import logging

_WRITERS = {}


def _flatten(tree, prefix='') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_dict(config) -> dict:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_diff(old: dict, new: dict) -> list[str]:
  """``'key: old -> new'`` for every flattened field that differs."""
  a, b = _flatten(old), _flatten(new)
  missing = object()
  return [f'{k}: {a.get(k, "(absent)")!r} in the workdir, {b.get(k, "(absent)")!r} now'
          for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def read_config(workdir) -> dict | None:
  """The workdir's ``config.json`` as a dict; None if there is none.

  Raises:
    ValueError: naming the file and how to recover, if it is empty or not JSON (a disk that
      filled up while an older version wrote it, a hand edit).
  """
  path = Path(workdir) / 'config.json'
  if not path.exists():
    return None
  try:
    text = path.read_text()
    if not text.strip():
      raise ValueError('the file is empty')
    return json.loads(text)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(
        f'{path} is unreadable ({e}), so this workdir cannot be checked against the config. '
        f'It is written once, before any training, from the run\'s config: move it aside '
        f'(mv {path} {path}.bad) and rerun the SAME command as the run in the workdir; the '
        'checkpoints are kept and resumed (or use a new --workdir).') from None


def write_config(config, workdir) -> None:
  """Writes ``config.json`` atomically (a temporary file, fsynced, then renamed)."""
  path = Path(workdir) / 'config.json'
  tmp = path.with_name(f'.config.json.tmp{os.getpid()}')
  try:
    with open(tmp, 'w') as f:
      f.write(json.dumps(config_dict(config), indent=1, sort_keys=True) + '\n')
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def check_config(config, workdir, write: bool = True) -> None:
  """Refuses a workdir holding another config; writes ``config.json`` in a new one.

  Args:
    config: the run's (validated) config.
    workdir: the run's directory (created).
    write: False only compares (nothing is written when the workdir has no config.json yet).

  Raises:
    ValueError: naming every field that differs from the workdir's config.json, or naming an
      unreadable config.json.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  old = read_config(workdir)
  if old is not None:
    diff = config_diff(old, config_dict(config))
    if diff:
      raise ValueError(
          f'{workdir} holds a run of a different config, refusing to resume it. '
          'Differing fields:\n  '
          + '\n  '.join(diff) + '\nUse a new --workdir, or the same --config and overrides '
          f'as the run in it (its config is saved in {workdir / "config.json"}).')
  elif write:
    write_config(config, workdir)


def read_rows(workdir) -> list[dict]:
  path = Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  lines = path.read_text().split('\n')
  # A run killed in the middle of a write leaves a last line without its newline: not committed.
  return [json.loads(line) for line in lines[:-1] if line.strip()]


def _step(row) -> int:
  return row['round'] if 'round' in row else row.get('epoch', 0)


def truncate(workdir, stage: str, committed: int) -> None:
  """Drops ``stage``'s rows past step ``committed`` (written, but killed before the checkpoint).

  Also drops a partial last line (a run killed in the middle of a write).
  """
  path = Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return
  text = path.read_text()
  rows = read_rows(workdir)
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
    _WRITERS[key] = SummaryWriter(logdir=str(Path(workdir) / 'tb'))
  return _WRITERS[key]


def logger(workdir, tensorboard: bool = True):
  """``log(row)``: appends a row to metrics.jsonl and its numbers to TensorBoard."""
  path = Path(workdir) / 'metrics.jsonl'

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
