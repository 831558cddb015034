"""A run's workdir: where each file lives, ``config.json`` and ``metrics.jsonl``.

The one owner of the layout (every other module asks here for a path)::

  config.json     the run's config, written once before any training (:func:`check_config`)
  metrics.jsonl   one JSON row per epoch of a centralized fit and per round per center of FL
  metrics.held.jsonl  only while a stage replays steps: later stages' rows (fedblood.rundir.runlog)
  results.json    the study's results; timing.json its wall times (kept apart: they differ
                  between an interrupted and an uninterrupted run)
  report.md  figures/  tb/ (TensorBoard)  evaluation/ (``--mode evaluate``)  run.lock
  checkpoints/<stage>/<step>/   one Orbax manager per stage (:mod:`fedblood.rundir.checkpoint`)

``metrics.jsonl`` has one reader, :func:`read_rows`: a run killed in the middle of a write
leaves a last line without its newline, and that torn line is never a row (a warning says it
is dropped); any other line that is not a JSON object is refused, naming the file and line.
``metrics.held.jsonl`` holds, for a while, rows of later stages set apart while an earlier
stage replays steps (:func:`fedblood.rundir.runlog.truncate`); readers see them after the
file's rows.

The run's fingerprint (:func:`fingerprint`) is the SHA-256 of ``config.json``'s canonical form
(the whole config as JSON, keys sorted, no whitespace): every field, including those that do
not change results (``progress``, ``data.cache_dir``), as :func:`check_config` compares them
all. Every checkpoint step written in a workdir carries it (:mod:`fedblood.rundir.checkpoint`).
One exception: a field of :data:`LATER_FIELDS`, added to the config after runs without it were
written, may be absent from an older run's config.json when its value now is what that run did
(the config.json stays as written, so its checkpoints keep their fingerprint).
"""

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

from absl import logging

# Fields added to the config after runs without them were written: an older config.json may
# lack them, if the value now is what such a run did (ANY: the field only chooses among the
# rounds a run saved, never what it trains or saves, so any value matches).
ANY = object()
LATER_FIELDS = {'fl.select': ANY, 'model.tta': False, 'fl.weighting': 'size',
                'baselines.personalize': False, 'fl.init': 'reference',
                'fl.lr_decay': 1.0, 'fl.logit_adjust': 0.0, 'data.augment.blur': 0.0,
                'data.augment.rand_conv': 0.0, 'fl.swa_start': 0, 'fl.local_momentum': 0.0,
                'fl.local_steps': 0}

# The data fields that, with data.folds, decide which images each fold of a --folds study tests.
SPLIT_KEYS = ('root', 'centers', 'split_seed', 'val_fraction', 'test_fraction')

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
HELD = 'metrics.held.jsonl'  # rows of later stages set apart while an earlier stage replays
RESULTS = 'results.json'
TIMING = 'timing.json'
REPORT = 'report.md'
LOCK = 'run.lock'
FIGURES = 'figures'
TENSORBOARD = 'tb'
EVALUATION = 'evaluation'
REFERENCE_MODEL = 'reference_model'  # the reference model (full params), saved once
FL = 'fl'                            # the federated rounds
CHECKPOINTS = 'checkpoints'


def path(workdir, name: str) -> Path:
  """``<workdir>/<name>`` (``name`` one of this module's file or folder names)."""
  return Path(workdir) / name


def checkpoints(workdir, stage: str | None = None) -> Path:
  """``<workdir>/checkpoints`` or, given a stage, its checkpoint directory in there."""
  root = Path(workdir) / CHECKPOINTS
  return root if stage is None else root / stage


# ------------------------------------------------------------------------------- config.json
def flatten(tree, prefix='') -> dict:
  """A config.json's nested dict as ``{'fl.weighting': value, ...}``."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def with_later_fields(flat: dict) -> dict:
  """A flattened config.json with each of :data:`LATER_FIELDS` it predates at the value such a
  run had (a field of ANY value stays absent): what it ran, comparable with a newer config."""
  return {**{k: v for k, v in LATER_FIELDS.items() if v is not ANY and k not in flat}, **flat}


def config_dict(config) -> dict:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_diff(old: dict, new: dict, where=('in the workdir', 'now')) -> list[str]:
  """``'key: old <where[0]>, new <where[1]>'`` for every flattened field that differs."""
  a, b = flatten(old), flatten(new)
  missing = object()
  return [f'{k}: {a.get(k, "(absent)")!r} {where[0]}, {b.get(k, "(absent)")!r} {where[1]}'
          for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


class Fingerprint(NamedTuple):
  """A run's fingerprint: ``digest`` (hex SHA-256 of the canonical config) and the config."""
  digest: str
  config: dict


def fingerprint(config) -> Fingerprint:
  """The :class:`Fingerprint` of a config (a ConfigDict, or config.json's dict)."""
  data = config if isinstance(config, dict) else config_dict(config)
  canonical = json.dumps(data, sort_keys=True, separators=(',', ':'), allow_nan=True)
  return Fingerprint(hashlib.sha256(canonical.encode()).hexdigest(), data)


def enclosing_fingerprint(directory) -> Fingerprint | None:
  """The fingerprint of the workdir holding checkpoint directory ``directory``, if any.

  ``directory`` is ``<workdir>/checkpoints/<stage>`` for a run's own checkpoints: their
  fingerprint is that of ``<workdir>/config.json``. None for a directory outside a workdir
  (a deployed site's client state, a bare checkpoint directory) or a workdir without
  config.json yet; an unreadable config.json raises (:func:`read_config`).
  """
  directory = Path(directory).absolute()
  if directory.parent.name != 'checkpoints':
    return None
  config = read_config(directory.parent.parent)
  return None if config is None else fingerprint(config)


def read_config(workdir) -> dict | None:
  """The workdir's ``config.json`` as a dict; None if there is none.

  Raises:
    ValueError: naming the file and how to recover, if it is empty, not JSON or not a JSON
      object (a disk that filled up while an older version wrote it, a hand edit).
  """
  file = path(workdir, CONFIG)
  if not file.exists():
    return None
  try:
    text = file.read_text()
    if not text.strip():
      raise ValueError('the file is empty')
    config = json.loads(text)
    if not isinstance(config, dict):
      raise ValueError(f'it holds a JSON {type(config).__name__}, not an object')
    return config
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
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f'--workdir {workdir} is a file, not a directory; give a directory path')
  workdir.mkdir(parents=True, exist_ok=True)
  old = read_config(workdir)
  if old is None and (written := run_files(workdir)):
    raise ValueError(
        f'{workdir} holds {", ".join(written)} of a run but no config.json, so it cannot be '
        'checked against this config; refusing to take it as a new run. Put back that run\'s '
        f'config.json (or rerun its command), or use a new --workdir.')
  if old is not None:
    new, had = config_dict(config), flatten(old)
    now = flatten(new)
    matched = {k for k, was in LATER_FIELDS.items()
               if k not in had and (was is ANY or now.get(k) == was)}
    diff = [line for line in config_diff(old, new) if line.split(':', 1)[0] not in matched]
    if diff:
      raise ValueError(
          f'{workdir} holds a run of a different config, refusing to resume it. '
          'Differing fields:\n  '
          + '\n  '.join(diff) + '\nUse a new --workdir, or the same --config and overrides '
          f'as the run in it (its config is saved in {path(workdir, CONFIG)}).')
  elif write:
    write_config(config, workdir)


def run_files(workdir) -> list[str]:
  """The files of a run in ``workdir`` besides config.json (checkpoint steps, logs, results)."""
  steps = [step for stage in _subdirs(checkpoints(workdir)) for step in _subdirs(stage)
           if step.name.isdigit()]
  return ([f'{CHECKPOINTS}/'] if steps else []) + [
      name for name in (METRICS, RESULTS) if path(workdir, name).exists()]


def _subdirs(directory: Path) -> list[Path]:
  return [p for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []


# ----------------------------------------------------------------------------- metrics.jsonl
def parse_rows(file: Path, text: str) -> list[dict]:
  """The rows of a metrics.jsonl text, less a torn last line (dropped with a warning).

  Raises:
    ValueError: naming the file and line of any other line that is not a JSON object.
  """
  *lines, torn = text.split('\n')
  if torn:  # no newline after it: a write cut short by a kill, never committed
    logging.warning('%s: dropping its torn last line %d (a write cut short): %.60r', file,
                    len(lines) + 1, torn)
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError as e:
      row = e
    if not isinstance(row, dict):
      raise ValueError(f'{file} line {number} is not a JSON row: {line[:60]!r}. Move the file '
                       'aside to restart the logs, or delete that line.')
    rows.append(row)
  return rows


def read_rows(workdir, held: bool = True) -> list[dict]:
  """The rows of ``metrics.jsonl`` (empty if absent), less a torn last line.

  A run killed in the middle of a write leaves a last line without its newline: that row was
  not committed, so it is not returned (and the next run's :func:`fedblood.rundir.runlog.truncate`
  removes it from the file). ``held``: the rows of ``metrics.held.jsonl`` follow (they go back
  into the file once the stage replaying steps is done).

  Raises:
    ValueError: naming the file and line number of any other line that is not a JSON object.
  """
  rows = []
  for name in (METRICS, HELD) if held else (METRICS,):
    file = path(workdir, name)
    if file.exists():
      rows += parse_rows(file, file.read_text())[name == HELD:]  # HELD: a header, then rows
  return rows


# ------------------------------------------------------------------------------ results.json
def write_results(workdir, results: dict, times: dict) -> None:
  """Writes ``results.json`` and, apart from it, ``timing.json``."""
  path(workdir, RESULTS).write_text(json.dumps(results, indent=1))
  path(workdir, TIMING).write_text(json.dumps(times, indent=1))


def read_results(workdir) -> dict:
  return json.loads(path(workdir, RESULTS).read_text())
