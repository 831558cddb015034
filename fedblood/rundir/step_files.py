"""The files of one checkpoint step: their checksums, and what to do with a damaged step.

After Orbax commits a step, ``<step>/checksums.sha256`` (:data:`CHECKSUMS`) records the SHA-256
of every file of the step; it is the step's last write, so a step without it was cut short.
:func:`verify_checksums` names the first file that changed, is missing or is new;
:func:`damaged_file` finds the file an Orbax / TensorStore error points at, and
:func:`move_aside` moves a damaged step to ``<directory>.corrupt/`` (never deleting it).
:mod:`fedblood.rundir.checkpoint` decides when.
"""

import hashlib
import json
import os
from pathlib import Path
import re
import shutil

CHECKSUMS = 'checksums.sha256'
# The JSON files of a step (Orbax's, and the 'meta' and 'state' items' metadata).
JSON_FILES = ('_CHECKPOINT_METADATA', 'meta/metadata', 'state/_METADATA',
               'metrics/metrics')


def damaged_file(step_dir: Path, error: Exception) -> str:
  """The file of a step that ``error`` points at: an unparsable JSON file, or a path it names."""
  for name in JSON_FILES:
    path = step_dir / name
    if path.exists():
      try:
        json.loads(path.read_text())
      except (ValueError, UnicodeDecodeError):
        return str(path)
  found = re.search(re.escape(str(step_dir)) + r'[^\s\'"]*', str(error))
  return found.group(0).rstrip('/:.,') if found else f'{step_dir} (an array file)'


class ChecksumError(ValueError):
  """A file of the step differs from the checksum written when it was committed."""


def _sha256(file: Path) -> str:
  digest = hashlib.sha256()
  with open(file, 'rb') as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _step_files(step_dir: Path) -> dict[str, str]:
  return {str(p.relative_to(step_dir)): _sha256(p) for p in sorted(step_dir.rglob('*'))
          if p.is_file() and not p.name.startswith((CHECKSUMS, f'.{CHECKSUMS}'))}


def write_checksums(step_dir: Path) -> None:
  """Writes ``<step>/checksums.sha256`` (atomically): SHA-256 of every file of the step."""
  tmp = step_dir / f'.{CHECKSUMS}.tmp'
  with open(tmp, 'w') as f:
    f.write(json.dumps(_step_files(step_dir), indent=0, sort_keys=True) + '\n')
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(step_dir / CHECKSUMS)


def verify_checksums(step_dir: Path) -> bool:
  """True if the step's files match its checksums; False if it has none (an older fedblood's).

  Raises:
    ChecksumError: naming the first file that differs, is missing or is new.
  """
  file = step_dir / CHECKSUMS
  if not file.exists():
    return False
  try:
    want = json.loads(file.read_text())
    if not isinstance(want, dict):
      raise ValueError('not a JSON object')
  except (ValueError, UnicodeDecodeError) as e:
    raise ChecksumError(f'{file} is unreadable ({e})') from None
  have = _step_files(step_dir)
  for name in sorted(set(want) | set(have)):
    if want.get(name) != have.get(name):
      what = ('is missing' if name not in have else 'is not in the checksums' if name not in want
              else 'differs from its checksum')
      raise ChecksumError(f'{step_dir / name} {what} in {CHECKSUMS}')
  return True


def describe(directory: Path, step: int, error: Exception) -> str:
  """One line: ``checkpoint step N of DIR cannot be restored (FILE: error)``."""
  first = (str(error).strip().splitlines() or [''])[0].split(' See full TensorStore')[0][:160]
  return (f'checkpoint step {step} of {directory} cannot be restored '
          f'({damaged_file(directory / str(step), error)}: {type(error).__name__}: {first})')


def move_aside(directory: Path, step: int, error: Exception) -> str:
  """Moves step ``step`` to ``<directory>.corrupt/<step>``; returns the line to log."""
  what = describe(directory, step, error)
  dest = directory.with_name(f'{directory.name}.corrupt') / str(step)
  n = 1
  while dest.exists():
    dest, n = dest.with_name(f'{step}.{n}'), n + 1
  dest.parent.mkdir(parents=True, exist_ok=True)
  shutil.move(str(directory / str(step)), str(dest))
  return f'{what}; moved aside to {dest}'
