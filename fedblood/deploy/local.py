"""A real Flower federation on this machine (loopback only), for tests and benchmarks.

One SuperLink, one SuperNode per center, ``flwr run`` of ``flower_app/``; free ports are
picked at start, every process is killed on :meth:`Federation.close` (use it as a
context manager). With ``tls=True`` the SuperLink serves HTTPS with a CA and server
certificate made for ``127.0.0.1``; with ``auth=True`` Flower's SuperNode authentication
is on and only the nodes registered with :meth:`Federation.register` may join.

Every process runs with Flower's telemetry off (``FLWR_TELEMETRY_ENABLED=0``) and with this
Python's scripts folder first on ``PATH`` (Flower starts ``flower-superexec`` by name), so
a virtualenv's ``venv/bin/python`` works without activating it.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedblood.deploy.credentials import make_certificates

REPO = Path(__file__).resolve().parents[2]
APP = REPO / 'flower_app'
TASK_POLL_S = 0.05
# How each SuperNode starts: fedblood's (Flower's with a short pull interval, see
# fedblood/deploy/supernode.py) or Flower's own.
SUPERNODES = {'fedblood': [sys.executable, '-m', 'fedblood.deploy.supernode'],
              'flower': None}


def free_port() -> int:
  """A free TCP port below the kernel's ephemeral range, so that no process's outgoing
  connection can take it between this call and the server's bind (Flower's processes open
  many); the ephemeral range itself if none is found."""
  try:
    low = int(Path('/proc/sys/net/ipv4/ip_local_port_range').read_text().split()[0])
  except (OSError, ValueError, IndexError):
    low = 32768
  rng = random.Random()
  for _ in range(100):
    port = rng.randrange(max(1024, low - 12000), low)
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
      except OSError:
        continue
      return port
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Federation:
  """SuperLink + SuperNodes + ``flwr`` CLI in ``root`` (logs in ``root/logs``)."""

  def __init__(self, root, *, tls: bool = False, auth: bool = False, env: dict | None = None,
               persistent: bool = False, supernode: str = 'fedblood'):
    """Args: root (logs, keys, certificates, FLWR_HOME), tls, auth, env (of every process),
    persistent (the SuperLink keeps its state in ``root/superlink.db`` across restarts),
    supernode ('fedblood': ``fedblood-supernode``, Flower's SuperNode pulling every 0.1 s;
    'flower': ``flower-supernode`` as shipped, 3 s between empty pulls)."""
    if supernode not in SUPERNODES:
      raise ValueError(f'supernode must be one of {sorted(SUPERNODES)}, got {supernode!r}')
    self.supernode = SUPERNODES[supernode]
    self.root = Path(root)
    self.persistent = persistent
    self.logs = self.root / 'logs'
    self.logs.mkdir(parents=True, exist_ok=True)
    self.port = free_port()
    self.procs, self.runs, self.state_dirs = {}, [], {}
    self.auth = auth
    self.env = dict(os.environ, **(env or {}))
    # No process of the federation reports to Flower's telemetry service (a hospital's would
    # not be allowed to); a caller's env may turn it on explicitly.
    self.env['FLWR_TELEMETRY_ENABLED'] = (env or {}).get('FLWR_TELEMETRY_ENABLED', '0')
    # Each SuperNode's SuperExec looks for a message to run every this many seconds (1 s by
    # default in Flower 1.42): a round would wait on it twice.
    self.env.setdefault('FLWR_SUPEREXEC_TASK_POLL_INTERVAL', str(TASK_POLL_S))
    # Flower starts its own commands by name (the SuperLink runs `flower-superexec`): this
    # Python's scripts first on PATH, so an un-activated virtualenv works.
    self.env['PATH'] = os.pathsep.join(
        [_bin_dir()] + [p for p in self.env.get('PATH', '').split(os.pathsep)
                        if p and p != _bin_dir()])
    self.env['FLWR_HOME'] = str(self.root / 'flwr_home')
    self.env['PYTHONPATH'] = os.pathsep.join(
        [str(REPO)] + [p for p in self.env.get('PYTHONPATH', '').split(os.pathsep) if p])
    self.certs = make_certificates(self.root / 'certs') if tls else None
    home = Path(self.env['FLWR_HOME'])
    home.mkdir(parents=True, exist_ok=True)
    security = (f'root-certificates = "{self.certs[0]}"' if tls else 'insecure = true')
    (home / 'config.toml').write_text(
        f'[superlink]\ndefault = "fedblood"\n\n[superlink.fedblood]\n'
        f'address = "127.0.0.1:{self.port}"\n{security}\n')

  def _tls_server_args(self):
    if not self.certs:
      return ['--insecure']
    ca, cert, key = self.certs
    return ['--ssl-ca-certfile', str(ca), '--ssl-certfile', str(cert), '--ssl-keyfile', str(key)]

  def _start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
    log = open(self.logs / f'{name}.log', 'ab')
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            env={**self.env, **(env or {})}, cwd=self.root,
                            start_new_session=True)
    log.close()
    self.procs[name] = proc
    return proc

  def start_superlink(self) -> None:
    argv = [_bin('flower-superlink'), *self._tls_server_args(), '--host', '127.0.0.1',
            '--port', str(self.port), '--disable-runtime-dependency-installation']
    if self.auth:
      argv.append('--enable-supernode-auth')
    if self.persistent:
      argv += ['--database', str(self.root / 'superlink.db')]
    self._start('superlink', argv)
    self._wait_port(self.port, 'superlink')

  def start_supernode(self, name: str, node_config: dict, key: Path | None = None,
                      env: dict | None = None, supernode: str | None = None) -> None:
    """A SuperNode ``name`` with ``--node-config`` from ``node_config`` (and extra ``env``);
    ``supernode`` ('fedblood' / 'flower') for this one, the federation's by default."""
    command = self.supernode if supernode is None else SUPERNODES[supernode]
    security = (['--root-certificates', str(self.certs[0])] if self.certs else ['--insecure'])
    config = ' '.join(f'{k}={json.dumps(v)}' for k, v in node_config.items())
    if node_config.get('state-dir'):
      self.state_dirs[name] = Path(str(node_config['state-dir']))
    for attempt in range(3):
      port = free_port()
      argv = [*(command or [_bin('flower-supernode')]), *security, '--superlink', f'127.0.0.1:{self.port}',
              '--port', str(port), '--node-config', config]
      if key is not None:
        argv += ['--auth-supernode-private-key', str(key)]
      self._start(name, argv, env)
      try:
        self._wait_port(port, name)  # its runtime API listens on --port
        return
      except RuntimeError:  # it exited: another process took the port between free_port and bind
        if attempt == 2:
          raise
        self.procs.pop(name).wait(timeout=30)

  def flwr(self, *args, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([_bin('flwr'), *args], env=self.env, cwd=self.root, timeout=timeout,
                          capture_output=True, text=True, check=False)

  def register(self, public_key: Path) -> None:
    out = self.flwr('supernode', 'register', str(public_key), 'fedblood')
    if out.returncode:
      raise RuntimeError(f'flwr supernode register failed: {out.stdout}{out.stderr}')

  def start_run(self, run_config: dict, timeout: float = 120.0) -> int:
    """``flwr run --stream`` of fedblood's app with ``--run-config`` from ``run_config``.

    The streaming CLI (one process, logs in ``logs/run_<id>.log``) is what
    :meth:`wait_run` waits on; returns the run id.
    """
    config = ' '.join(f'{k}={json.dumps(v)}' for k, v in run_config.items())
    name = f'flwr_run_{len(self.runs)}'
    self.runs.append(name)
    self._start(name, [_bin('flwr'), 'run', str(APP), 'fedblood', '--stream',
                       '--run-config', config])
    log, deadline = self.logs / f'{name}.log', time.time() + timeout
    while time.time() < deadline:
      match = re.search(r'Successfully started run (\d+)', log.read_text(errors='replace'))
      if match:
        self.procs[f'run_{match.group(1)}'] = self.procs.pop(name)
        self.runs[-1] = log
        return int(match.group(1))
      if self.procs[name].poll() is not None:
        raise RuntimeError(f'flwr run failed: {log.read_text(errors="replace")[-3000:]}')
      time.sleep(0.3)
    raise TimeoutError(f'flwr run did not start a run within {timeout:.0f} s: see {log}')

  def wait_run(self, run_id: int, timeout: float) -> dict:
    """Waits (at most ``timeout`` s, then stops it) for a run to end.

    Returns ``flwr ls``'s JSON entry of the run (``status`` is ``finished:completed`` on
    success) with its streamed log under ``'log'``.
    """
    proc = self.procs.pop(f'run_{run_id}')
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.flwr('stop', str(run_id), 'fedblood')
      os.killpg(proc.pid, signal.SIGKILL)
      raise TimeoutError(f'flwr run {run_id} did not finish within {timeout:.0f} s') from None
    for _ in range(30):  # the stream ends with the run; its status follows within moments
      listing = self.flwr('ls', 'fedblood', '--run-id', str(run_id), '--format', 'json')
      runs = json.loads(listing.stdout).get('runs', []) if listing.returncode == 0 else []
      if runs and str(runs[0].get('status', '')).startswith('finished'):
        break
      time.sleep(1.0)
    log = next(p for p in self.runs if isinstance(p, Path) and f'run {run_id}' in p.read_text())
    return {**(runs[0] if runs else {'status': 'unknown'}), 'log': log.read_text(errors='replace')}

  def run(self, run_config: dict, timeout: float) -> dict:
    """:meth:`start_run` then :meth:`wait_run`."""
    return self.wait_run(self.start_run(run_config), timeout)

  def kill(self, name: str) -> None:
    """SIGKILL to process ``name``, its session and every descendant (Flower starts its
    SuperExec in a session of its own), and to a SuperNode's site worker."""
    if name in self.state_dirs:
      kill_worker(self.state_dirs.pop(name))
    proc = self.procs.pop(name)
    pids = _descendants(proc.pid)
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    proc.wait(timeout=30)

  def close(self) -> None:
    for name in list(self.procs):
      self.kill(name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _wait_port(self, port: int, name: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self.procs[name].poll() is not None:
        raise RuntimeError(f'{name} exited: see {self.logs / (name + ".log")}')
      with socket.socket() as s:
        if s.connect_ex(('127.0.0.1', port)) == 0:
          return
      time.sleep(0.2)
    raise TimeoutError(f'{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s')


def worker_pid(state_dir) -> int | None:
  """The PID of the live site worker of ``state_dir`` (:mod:`fedblood.deploy.worker`), or None."""
  try:
    pid = int(json.loads((Path(state_dir) / 'worker.json').read_text())['pid'])
    cmdline = Path(f'/proc/{pid}/cmdline').read_bytes()
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return pid if b'fedblood.deploy.worker' in cmdline else None  # not a reused PID


def kill_worker(state_dir) -> None:
  """SIGKILL to the site worker of ``state_dir``, if one is alive."""
  pid = worker_pid(state_dir)
  if pid is not None:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _descendants(pid: int) -> list[int]:
  """Every live descendant of ``pid`` (read from /proc; empty where there is none)."""
  children = {}
  for stat in Path('/proc').glob('[0-9]*/stat'):
    try:
      ppid = int(stat.read_text().rsplit(')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    children.setdefault(ppid, []).append(int(stat.parent.name))
  out, todo = [], [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      out.append(child)
      todo.append(child)
  return out


def _bin_dir() -> str:
  """The folder of this Python's scripts (``flwr``, ``flower-superexec``, ...)."""
  import sysconfig  # pylint: disable=g-import-not-at-top
  scripts = Path(sysconfig.get_path('scripts'))
  return str(scripts if (scripts / 'flower-superexec').exists() else Path(sys.executable).parent)


def _bin(name: str) -> str:
  return str(Path(_bin_dir()) / name)
