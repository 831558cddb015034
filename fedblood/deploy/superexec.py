"""``fedblood-superexec``: Flower's SuperExec whose ClientApp processes start warm.

Flower 1.42's SuperExec starts a new ``flwr-clientapp`` process for every message a site
receives; importing Flower there costs about 1.2 s of CPU (``python -X importtime``), on each
site, every round. This SuperExec is Flower's, except that a ClientApp process is forked from
a process that has already imported Flower's ClientApp runtime and fedblood's relay (a
``multiprocessing`` fork server, which holds no connection and no thread when it forks). The
forked process runs Flower's own ``flwr-clientapp`` entry point with exactly the arguments
Flower would have given the new process; any other task type starts as in Flower.

``fedblood-supernode`` starts this SuperExec in place of ``flower-superexec``; both read
``FEDBLOOD_SUPERNODE_POLL`` (default 0.1 s), and this one looks for work every that many
seconds unless ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` says otherwise.
"""

import multiprocessing
import os
import subprocess
import sys

from fedblood.deploy import polls

CLIENTAPP = 'flwr-clientapp'
PRELOAD = ['flwr.supernode.cli.flwr_clientapp', 'fedblood.deploy.client_app']


def run_clientapp(argv: list[str], quiet: bool) -> None:
  """Flower's ``flwr-clientapp`` main with ``argv`` (in a process forked warm)."""
  if quiet:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
  sys.argv = argv
  from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # pylint: disable=g-import-not-at-top
  sys.exit(flwr_clientapp())


class WarmLauncher:
  """The ``subprocess`` module for Flower's executor, with ``Popen(['flwr-clientapp', ...])``
  forked from a warm fork server instead (everything else as is)."""

  def __init__(self):
    self.ctx = multiprocessing.get_context('forkserver')
    self.ctx.set_forkserver_preload(PRELOAD)

  def __getattr__(self, name):
    return getattr(subprocess, name)

  def Popen(self, args, **kwargs):  # pylint: disable=invalid-name
    if not args or os.path.basename(str(args[0])) != CLIENTAPP:
      return subprocess.Popen(args, **kwargs)
    multiprocessing.active_children()  # reaps the ClientApps that ended
    quiet = kwargs.get('stdout') is subprocess.DEVNULL
    proc = self.ctx.Process(target=run_clientapp, args=([CLIENTAPP, *args[1:]], quiet))
    proc.start()
    return proc


def install() -> bool:
  """ClientApps forked warm in this process's SuperExec; False (unchanged) if Flower's
  executor holds no ``subprocess`` module."""
  from flwr.supercore.superexec.executor import subprocess_executor  # pylint: disable=g-import-not-at-top
  return polls.replace(subprocess_executor, 'subprocess', subprocess, WarmLauncher())


def main() -> None:
  from fedblood.deploy import supernode  # pylint: disable=g-import-not-at-top
  try:
    cap = supernode.poll_interval(os.environ)
  except ValueError as e:
    sys.exit(f'fedblood-superexec: error: {e}')
  # Its own wait is Flower's setting; it pulls no message arrays (the ClientApps it starts
  # read them from the SuperNode, which has them all by then).
  os.environ.setdefault('FLWR_SUPEREXEC_TASK_POLL_INTERVAL', str(cap))
  if not install():
    print('fedblood-superexec: this Flower release differs from 1.42 in its subprocess '
          'executor: ClientApps start as new processes', file=sys.stderr)
  from flwr.supercore.cli.flower_superexec import flower_superexec  # pylint: disable=g-import-not-at-top
  flower_superexec()


if __name__ == '__main__':
  main()
