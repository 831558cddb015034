"""A site's warm worker: one process per state dir answering the ClientApp's messages.

``python -m fedblood.deploy.worker --state-dir D --node-config JSON`` (the ClientApp's relay,
:mod:`fedblood.deploy.relay`, starts it on first use). It holds the state dir's lock for its
whole life (:func:`fedblood.rundir.lock.hold`), listens on a Unix socket only the site's user
can open, and answers each request with :func:`fedblood.deploy.site.answer` and a
:class:`fedblood.deploy.site.Warm` it keeps: the study built, its functions traced, the center
loaded, the checkpoint managers open and the client state of the last rounds in memory (also
on disk, as every round's is). The answers are those of a fresh process, bit for bit: the same
jitted functions on the same arrays.

It exits after ``worker-idle`` seconds without a request (node config; default 900), when the
lock is held by another live worker, or when killed; the relay starts a new one on the next
message, which finds everything on disk.
"""

import argparse
import json
import os
from pathlib import Path
import secrets
import shutil
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing import connection

from fedblood.deploy import relay
from fedblood.rundir import lock

IDLE_S = 900.0


def _write_private(path: Path, data: bytes) -> None:
  tmp = path.with_name(f'.{path.name}.{os.getpid()}')
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def _answer(warm, message: dict) -> dict:
  from fedblood.deploy import site  # pylint: disable=g-import-not-at-top
  try:
    out = site.answer(message['kind'], message['request'], relay.unpack(message['server']),
                      relay.unpack(message['frozen']), message['node_config'], warm)
  except (ValueError, FileNotFoundError) as e:  # SiteError is a ValueError
    return {'error': str(e)}
  out = site.records(out)
  for field in ('params', 'state'):
    if field in out:
      out[field] = relay.pack(out[field])
  return {'reply': out}


def serve(state_dir: Path, node_config: dict, idle_s: float) -> None:
  """Answers requests on the state dir's socket until idle for ``idle_s`` seconds."""
  from fedblood.deploy import site  # pylint: disable=g-import-not-at-top  (JAX: after the lock)
  warm = site.Warm()
  folder = Path(tempfile.mkdtemp(prefix='fedblood-site-'))  # mode 0700
  address, key = str(folder / 'worker.sock'), secrets.token_bytes(32)
  listener = connection.Listener(address, family='AF_UNIX', authkey=key)
  last = [time.time()]

  def watchdog():
    while time.time() - last[0] < idle_s:
      time.sleep(min(1.0, idle_s))
    print(f'idle for {idle_s:.0f} s: exiting', flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)  # pylint: disable=protected-access  (the listener blocks in accept)

  try:
    _write_private(state_dir / relay.KEY, key)
    _write_private(state_dir / relay.INFO,
                   json.dumps({'pid': os.getpid(), 'address': address}).encode())
    print(f'pid {os.getpid()} listening on {address}', flush=True)
    threading.Thread(target=watchdog, daemon=True).start()
    while True:
      try:
        conn = listener.accept()
      except (OSError, EOFError, connection.AuthenticationError) as e:
        print(f'refused a connection: {e}', flush=True)
        continue
      last[0] = float('inf')  # busy: the watchdog waits
      try:
        message = conn.recv()
        started = time.time()
        reply = _answer(warm, message)
        print(f'{time.strftime("%H:%M:%S")} {message["kind"]} round '
              f'{message["request"].get("round", "-")}: answered in {time.time() - started:.3f} s'
              + (f' (refused: {reply["error"][:120]})' if 'error' in reply else ''), flush=True)
        conn.send(reply)
      except (OSError, EOFError) as e:  # the ClientApp went away; its message comes again
        print(f'lost the ClientApp: {e}', flush=True)
      except Exception:  # pylint: disable=broad-except
        traceback.print_exc()
        warm.clear()
        try:
          conn.send({'error': 'the site worker failed on this request (see worker.log)'})
        except (OSError, EOFError):
          pass
      finally:
        conn.close()
        last[0] = time.time()
  finally:
    listener.close()
    shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--state-dir', required=True)
  parser.add_argument('--node-config', required=True, help='the SuperNode\'s node config, JSON')
  args = parser.parse_args(argv)
  node_config = json.loads(args.node_config)
  state_dir = Path(args.state_dir)
  try:
    with lock.hold(state_dir):
      serve(state_dir, node_config, float(node_config.get('worker-idle', IDLE_S)))
  except lock.WorkdirBusy as e:  # another worker serves this state dir
    print(f'not started: {e}', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
