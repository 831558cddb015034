"""fedblood's Flower ``ServerApp``: :func:`fedblood.deploy.server.run` under ``flwr run``.

Run config (``flower_app/pyproject.toml``, or ``flwr run ... --run-config``):

* ``config``: a fedblood config file, ``/abs/path/configs/demo.py[:arg]``;
* ``overrides``: space-separated ``field=value`` (Python literals), e.g.
  ``"fl.rounds=3 reference.restore='/srv/ref'"``;
* ``workdir``: the server's run directory (created; resumed when it holds a run);
* ``connect-timeout`` / ``round-timeout``: seconds to wait for every center to connect /
  for a round's replies (a run never hangs on vanished sites).

The run holds the workdir's lock (:func:`fedblood.rundir.lock.hold`): a second deployed server (or
a simulated run) on the same workdir stops at once, naming the holder's PID.
"""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedblood.deploy import polls, server, wire
from fedblood.rundir import lock

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
  polls.shorten()  # a reply's arrays are pulled 0.1 s after they are pushed, not 1 s
  rc = context.run_config
  if not str(rc.get('workdir', '')) or not str(rc.get('config', '')):
    raise ValueError("run config needs config='<config.py[:arg]>' and workdir='<dir>'")
  config = wire.load_config(str(rc['config']), str(rc.get('overrides', '')))
  workdir = Path(str(rc['workdir']))
  with lock.hold(workdir):  # before any write: a busy workdir's deploy.log is not ours
    try:
      server.run(grid, config, workdir, connect_timeout=float(rc.get('connect-timeout', 600.0)),
                 round_timeout=float(rc.get('round-timeout', 600.0)))
    except Exception as e:  # the run fails (Flower logs the traceback); deploy.log says why
      if workdir.is_dir():
        server.note(workdir, f'stopped: {type(e).__name__}: {e}')
      raise
