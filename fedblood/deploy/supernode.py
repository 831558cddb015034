"""``fedblood-supernode``: Flower's ``flower-supernode`` with short waits.

Flower 1.42's SuperNode sleeps a hard-coded 3 s after every pull that finds no message and
backs off 1 s when a message's arrays are not pushed yet (see :mod:`fedblood.deploy.polls`):
a message that arrives during a sleep waits for it. This command runs the same SuperNode
with those waits capped at ``FEDBLOOD_SUPERNODE_POLL`` seconds (default 0.1; an idle
SuperNode then asks the SuperLink for work up to 10 times a second), and with
``fedblood-superexec`` (:mod:`fedblood.deploy.superexec`, ClientApp processes forked warm) in
place of ``flower-superexec``. Every argument is Flower's (``fedblood-supernode --help``).
"""

import math
import os
import subprocess
import sys

from fedblood.deploy import polls

POLL_ENV = 'FEDBLOOD_SUPERNODE_POLL'
POLL_RANGE_S = (0.01, 3.0)


def poll_interval(env) -> float:
  """The cap in seconds from ``env[POLL_ENV]`` (default 0.1); ValueError naming the variable."""
  raw = env.get(POLL_ENV)
  if raw is None or raw == '':
    return polls.POLL_S
  try:
    value = float(raw)
  except ValueError:
    value = math.nan
  low, high = POLL_RANGE_S
  if not math.isfinite(value) or not low <= value <= high:
    raise ValueError(f'{POLL_ENV} must be a number of seconds in [{low}, {high}], got {raw!r}')
  return value


class SuperExecLauncher:
  """The ``subprocess`` module for the SuperNode, with ``Popen(['flower-superexec', ...])``
  starting ``fedblood-superexec`` (same arguments) instead."""

  def __getattr__(self, name):
    return getattr(subprocess, name)

  def Popen(self, args, **kwargs):  # pylint: disable=invalid-name
    if args and os.path.basename(str(args[0])) == 'flower-superexec':
      args = [sys.executable, '-m', 'fedblood.deploy.superexec', *args[1:]]
    return subprocess.Popen(args, **kwargs)


def main() -> None:
  try:
    cap = poll_interval(os.environ)
  except ValueError as e:
    sys.exit(f'fedblood-supernode: error: {e}')
  missed = polls.shorten(cap, supernode=True)
  from flwr.supernode import start_client_internal  # pylint: disable=g-import-not-at-top
  if not polls.replace(start_client_internal, 'subprocess', subprocess, SuperExecLauncher()):
    missed.append('the SuperExec it starts')
  if missed:
    print(f'fedblood-supernode: this Flower release differs from 1.42 at {", ".join(missed)}: '
          "left as Flower's", file=sys.stderr)
  from flwr.supernode.cli.flower_supernode import flower_supernode  # pylint: disable=g-import-not-at-top
  flower_supernode()


if __name__ == '__main__':
  main()
