"""fedblood-supernode / fedblood-superexec: Flower 1.42's waits shortened, ClientApps forked warm.

The federation tests (tests/test_deploy.py) run every site through these commands; here, what
each change does, in processes of its own so that this test process keeps Flower as shipped.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip('flwr')

from fedblood.deploy import polls, supernode  # pylint: disable=g-import-not-at-top

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict | None = None, args=()) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'PYTHONPATH': str(REPO), **(env or {})})


def test_poll_interval_default_range_and_errors():
  assert supernode.poll_interval({}) == polls.POLL_S == 0.1
  assert supernode.poll_interval({'FEDBLOOD_SUPERNODE_POLL': '0.5'}) == 0.5
  for bad in ('abc', '0', '-1', '4', 'nan', 'inf'):
    with pytest.raises(ValueError, match=f"FEDBLOOD_SUPERNODE_POLL must be .* got '{bad}'"):
      supernode.poll_interval({'FEDBLOOD_SUPERNODE_POLL': bad})


def test_short_sleep_caps_only_sleep(monkeypatch):
  slept = []
  monkeypatch.setattr(polls.time, 'sleep', slept.append)
  clock = polls.ShortSleep(0.1)
  clock.sleep(3)
  clock.sleep(0.02)
  assert slept == [0.1, 0.02]
  assert clock.monotonic is polls.time.monotonic  # everything else is the time module's


def test_shorten_changes_exactly_flowers_waits_in_its_own_process():
  out = _python('''
      import time
      from flwr.supercore.inflatable import inflatable_utils as iu
      from flwr.supernode import start_client_internal as sci
      before = (iu.pull_objects.__kwdefaults__['initial_backoff'], sci.time is time)
      from fedblood.deploy import polls
      missed = polls.shorten(0.05, supernode=True)
      slept = []
      time.sleep = slept.append  # what the capped sleep calls
      sci.time.sleep(3)
      print(before, missed, iu.pull_objects.__kwdefaults__['initial_backoff'], slept,
            iu.pull_objects.__kwdefaults__['backoff_cap'])
  ''')
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['(1,', 'True)', '[]', '0.05', '[0.05]', '10']


def test_supernode_refuses_a_bad_poll_before_starting_and_passes_flowers_arguments():
  bad = subprocess.run([sys.executable, '-m', 'fedblood.deploy.supernode', '--help'], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': str(REPO), 'FEDBLOOD_SUPERNODE_POLL': 'x'})
  assert bad.returncode != 0
  assert "FEDBLOOD_SUPERNODE_POLL must be a number of seconds in [0.01, 3.0], got 'x'" in bad.stderr
  ok = subprocess.run([sys.executable, '-m', 'fedblood.deploy.supernode', '--help'], cwd=REPO,
                      capture_output=True, text=True, timeout=120,
                      env={**os.environ, 'PYTHONPATH': str(REPO)})
  assert ok.returncode == 0, ok.stderr
  assert '--superlink' in ok.stdout and '--node-config' in ok.stdout  # Flower's own parser


def test_supernode_starts_fedblood_superexec_with_flowers_arguments():
  out = _python('''
      import subprocess, sys
      started = []
      subprocess.Popen = lambda args, **kw: started.append(args)
      from fedblood.deploy import supernode
      supernode.SuperExecLauncher().Popen(['flower-superexec', '--insecure', '--parent-pid', '7'])
      supernode.SuperExecLauncher().Popen(['something-else', '-x'])
      print(started)
  ''')
  assert out.returncode == 0, out.stderr
  assert f"[['{sys.executable}', '-m', 'fedblood.deploy.superexec', '--insecure', '--parent-pid', " \
         "'7'], ['something-else', '-x']]" in out.stdout


def test_a_clientapp_forks_warm_and_runs_flowers_entry_point_with_its_arguments():
  """``flwr-clientapp`` runs Flower's entry point in a process forked from a server that
  imported Flower and fedblood's relay; its arguments reach Flower's parser (``--help``: exit
  0; an unknown flag: argparse's exit 2); any other command is a plain subprocess."""
  out = _python('''
      import subprocess, sys
      from fedblood.deploy import superexec
      assert superexec.install()
      from flwr.supercore.superexec.executor import subprocess_executor
      launcher = subprocess_executor.subprocess
      codes = []
      for argv in (['flwr-clientapp', '--help'], ['/usr/bin/flwr-clientapp', '--no-such-flag']):
        proc = launcher.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.join(60)
        codes.append((type(proc).__name__, proc.exitcode))
      plain = launcher.Popen([sys.executable, '-c', 'raise SystemExit(3)'])
      codes.append((type(plain).__name__, plain.wait(60)))
      print(codes)
  ''')
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[('ForkServerProcess', 0), ('ForkServerProcess', 2), ('Popen', 3)]"
