"""One run per workdir: an advisory ``fcntl.flock`` on ``<workdir>/run.lock`` held for the run.

The lock file holds the holder's PID (and host). The kernel drops a flock when its process
dies, however it dies (kill -9 included), so a lock file left by a dead run is simply taken
over by the next one; a live holder makes a second run in the same workdir stop at once with
:class:`WorkdirBusy` naming that PID. Two runs writing one metrics.jsonl and one set of Orbax
steps would interleave their rows and race on the same step directories.
"""

import contextlib
import fcntl
import os
from pathlib import Path
import socket

from absl import logging

from fedblood.rundir import workdir as workdir_lib


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock."""


def _holder(text: str) -> str:
  return text.strip() or 'unknown PID'


@contextlib.contextmanager
def hold(workdir):
  """Holds ``<workdir>/run.lock`` (workdir created) for the duration of the ``with`` block.

  Raises:
    WorkdirBusy: naming the holder's PID, if another process holds it.
  """
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f'--workdir {workdir} is a file, not a directory; give a directory')
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir_lib.path(workdir, workdir_lib.LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(os.pread(fd, 256, 0).decode(errors='replace'))
      raise WorkdirBusy(f'{workdir} is in use by another fedblood run ({holder}, lock file '
                        f'{path}). Wait for it to finish (or stop it), or use another '
                        '--workdir.') from None
    previous = os.pread(fd, 256, 0).decode(errors='replace').strip()
    if previous:
      logging.info('%s: taking over the lock of a finished or dead run (%s)', path, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'PID {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
    try:
      yield path
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
