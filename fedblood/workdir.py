"""A run's workdir: where each file lives, ``config.json`` and ``metrics.jsonl``.

The one owner of the layout (every other module asks here for a path)::

  config.json     the run's config, written once before any training (:func:`check_config`)
  metrics.jsonl   one JSON row per epoch of a centralized fit and per round per center of FL
  results.json    the study's results; timing.json its wall times (kept apart: they differ
                  between an interrupted and an uninterrupted run)
  report.md  figures/  tb/ (TensorBoard)  evaluation/ (``--mode evaluate``)  run.lock
  checkpoints/<stage>/<step>/   one Orbax manager per stage (:mod:`fedblood.checkpoint`)

``metrics.jsonl`` has one reader, :func:`read_rows`: a run killed in the middle of a write
leaves a last line without its newline, and that torn line is never a row.
"""

import json
import os
from pathlib import Path

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
RESULTS = 'results.json'
TIMING = 'timing.json'
REPORT = 'report.md'
LOCK = 'run.lock'
FIGURES = 'figures'
TENSORBOARD = 'tb'
EVALUATION = 'evaluation'
REFERENCE_MODEL = 'reference_model'  # the reference model (full params), saved once
FL = 'fl'                            # the federated rounds


def path(workdir, name: str) -> Path:
  """``<workdir>/<name>`` (``name`` one of this module's file or folder names)."""
  return Path(workdir) / name


def checkpoints(workdir, stage: str | None = None) -> Path:
  """``<workdir>/checkpoints`` or, given a stage, its checkpoint directory in there."""
  root = Path(workdir) / 'checkpoints'
  return root if stage is None else root / stage


# ------------------------------------------------------------------------------- config.json
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
  file = path(workdir, CONFIG)
  if not file.exists():
    return None
  try:
    text = file.read_text()
    if not text.strip():
      raise ValueError('the file is empty')
    return json.loads(text)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(
        f'{file} is unreadable ({e}), so this workdir cannot be checked against the config. '
        f'It is written once, before any training, from the run\'s config: move it aside '
        f'(mv {file} {file}.bad) and rerun the SAME command as the run in the workdir; the '
        'checkpoints are kept and resumed (or use a new --workdir).') from None


def write_config(config, workdir) -> None:
  """Writes ``config.json`` atomically (a temporary file, fsynced, then renamed)."""
  file = path(workdir, CONFIG)
  tmp = file.with_name(f'.{CONFIG}.tmp{os.getpid()}')
  try:
    with open(tmp, 'w') as f:
      f.write(json.dumps(config_dict(config), indent=1, sort_keys=True) + '\n')
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, file)
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
          f'as the run in it (its config is saved in {path(workdir, CONFIG)}).')
  elif write:
    write_config(config, workdir)


# ----------------------------------------------------------------------------- metrics.jsonl
def read_rows(workdir) -> list[dict]:
  """The rows of ``metrics.jsonl`` (empty if absent), less a torn last line.

  A run killed in the middle of a write leaves a last line without its newline: that row was
  not committed, so it is not returned (and the next run's :func:`fedblood.runlog.truncate`
  removes it from the file).
  """
  file = path(workdir, METRICS)
  if not file.exists():
    return []
  lines = file.read_text().split('\n')
  return [json.loads(line) for line in lines[:-1] if line.strip()]


# ------------------------------------------------------------------------------ results.json
def write_results(workdir, results: dict, times: dict) -> None:
  """Writes ``results.json`` and, apart from it, ``timing.json``."""
  path(workdir, RESULTS).write_text(json.dumps(results, indent=1))
  path(workdir, TIMING).write_text(json.dumps(times, indent=1))


def read_results(workdir) -> dict:
  return json.loads(path(workdir, RESULTS).read_text())
