"""The ClientApp's side of a site: relays each message to the site's warm worker.

Flower starts a fresh ClientApp process for every message. Importing JAX, building the study,
tracing the jitted functions, loading the center and restoring the client state in each of
them cost seconds per message (docs/performance.md); the site worker
(:mod:`fedblood.deploy.worker`) does all of that once and keeps it. This module is what the
ClientApp process runs: it imports neither JAX nor fedblood's numerics (importing ``fedblood``
does not import JAX), finds the worker of the site's state dir, starts it if none is alive,
and hands it the request.

The channel: a Unix socket in a private folder (mode 0700) of the machine's temporary
directory, with a random key in ``<state-dir>/worker.key`` (mode 0600) that both ends prove
they hold (``multiprocessing.connection``'s HMAC challenge), so only the site's user can reach
the worker. What crosses it is built by these two processes: the request's scalar fields and
each array as the ``.npy`` bytes Flower received (the worker loads them with
``allow_pickle=False`` and checks them against the study, :mod:`fedblood.deploy.wire`).

``worker='off'`` in the node config answers in the ClientApp process itself, as before the
worker existed (every message pays the start-up again).
"""

import json
import os
from pathlib import Path
import re
import subprocess
import sys
import time
from multiprocessing import connection

INFO = 'worker.json'   # {"pid": ..., "address": ...} of the live worker, in the state dir
KEY = 'worker.key'     # the channel's key, mode 0600, in the state dir
LOG = 'worker.log'     # the worker's output, in the state dir
START_TIMEOUT = 120.0  # seconds a starting worker has to listen (it imports JAX, nothing more)


# What a study id looks like (what :func:`study_id` makes); a site refuses anything else, as
# the id names a folder in its state dir.
STUDY_ID = re.compile(r'[0-9a-f]{16}')


def check_study_id(value) -> str | None:
  """Why ``value`` is not a study id (16 lowercase hex digits); None when it is."""
  if not isinstance(value, str) or not STUDY_ID.fullmatch(value):
    return (f'study id {value!r} is not {STUDY_ID.pattern} (the server makes it with '
            'fedblood.deploy.wire.study_id)')
  return None


class SiteError(ValueError):
  """A request this site refuses (names the node config key or request field at fault)."""


def settings(node_config) -> tuple[str, Path]:
  """``(center, state_dir)`` from the SuperNode's ``--node-config``."""
  missing = [k for k in ('center', 'state-dir') if not str(node_config.get(k, ''))]
  if missing:
    raise SiteError(f'node config is missing {missing} (flower-supernode --node-config '
                    '"center=\'<name>\' state-dir=\'<dir>\' [data-root=... data-source=... '
                    'cache-dir=...]")')
  return str(node_config['center']), Path(str(node_config['state-dir'])).expanduser().absolute()


def pack(record) -> dict | None:
  """An ``ArrayRecord`` as ``{name: (dtype, shape, stype, npy bytes)}`` (None stays None)."""
  if record is None:
    return None
  return {name: (a.dtype, tuple(a.shape), a.stype, bytes(a.data)) for name, a in record.items()}


def unpack(packed: dict | None):
  """The ``ArrayRecord`` :func:`pack` described."""
  from flwr.app import Array, ArrayRecord  # pylint: disable=g-import-not-at-top
  if packed is None:
    return None
  return ArrayRecord(array_dict={
      name: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)
      for name, (dtype, shape, stype, data) in packed.items()})


def _read_info(state_dir: Path) -> tuple[dict, bytes] | None:
  try:
    return json.loads((state_dir / INFO).read_text()), (state_dir / KEY).read_bytes()
  except (OSError, ValueError):
    return None


def _connect(state_dir: Path):
  """A connection to the live worker of ``state_dir``, or None."""
  found = _read_info(state_dir)
  if found is None:
    return None
  info, key = found
  try:
    return connection.Client(info['address'], family='AF_UNIX', authkey=key)
  except (OSError, EOFError, KeyError, TypeError, connection.AuthenticationError):
    return None


def _start(state_dir: Path, node_config: dict):
  """Starts the worker of ``state_dir`` and returns a connection to it."""
  state_dir.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  package_root = str(Path(__file__).resolve().parents[2])  # where this fedblood is imported from
  env['PYTHONPATH'] = os.pathsep.join([package_root] + [
      p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p and p != package_root])
  with open(state_dir / LOG, 'ab') as log:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'fedblood.deploy.worker', '--state-dir', str(state_dir),
         '--node-config', json.dumps(dict(node_config))],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True)  # outlives this ClientApp process
  deadline = time.time() + START_TIMEOUT
  while time.time() < deadline:
    conn = _connect(state_dir)
    if conn is not None:
      return conn
    if proc.poll() is not None and proc.returncode != 0:
      raise SiteError(f'the site worker exited with status {proc.returncode} on start: see '
                      f'{state_dir / LOG}')
    time.sleep(0.05)
  proc.kill()
  raise SiteError(f'the site worker did not listen within {START_TIMEOUT:.0f} s: see '
                  f'{state_dir / LOG}')


def _exchange(conn, message: dict) -> dict:
  try:
    conn.send(message)
    return conn.recv()
  finally:
    conn.close()


def call(kind: str, request: dict, server_rec, frozen_rec, node_config) -> dict:
  """Answers one message through the warm worker: ``site.handle``'s reply, records unpacked.

  A worker that is gone (killed, crashed, never started) is started; a request whose worker
  died while answering it is sent once more to a fresh worker (a site's answer to a request
  depends on the request and its state dir only, so answering twice is safe).

  Raises:
    SiteError: the site refused the request (the worker's message), or the worker failed.
  """
  _, state_dir = settings(node_config)
  reason = check_study_id(request['study']) if 'study' in request else None
  if reason:  # refused before a worker starts, or a folder is made
    raise SiteError(f'refused the server\'s request: {reason}')
  message = {'kind': kind, 'request': dict(request), 'server': pack(server_rec),
             'frozen': pack(frozen_rec), 'node_config': dict(node_config)}
  for attempt in range(2):
    conn = _connect(state_dir) or _start(state_dir, node_config)
    try:
      out = _exchange(conn, message)
      break
    except (OSError, EOFError):
      if attempt:
        raise SiteError(f'the site worker failed twice on a {kind} request: see '
                        f'{state_dir / LOG}') from None
  if 'error' in out:
    raise SiteError(out['error'])
  reply = out['reply']
  for field in ('params', 'state'):
    if field in reply:
      reply[field] = unpack(reply[field])
  return reply
