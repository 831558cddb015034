r"""fedblood's command line (intentionally short: the logic lives in fedblood/).

  python launch.py --workdir /tmp/demo                                  # the demo study (train)
  python launch.py --config configs/wbc.py --config.fl.rounds=30 --workdir /tmp/wbc
  python launch.py --config configs/paper.py --sweep --workdir /tmp/sweep  # all get_sweep() points
  python launch.py --config configs/wbc.py --seeds 0-4 --workdir /tmp/wbc5  # + seeds_report.md
  python launch.py --config configs/wbc.py --folds 5 --workdir /tmp/wbc5f   # + folds_report.md
  python launch.py --config configs/wbc.py --folds 5 --only_folds 0-2 --workdir /tmp/wbc5f  # 3 now
  python launch.py --config configs/wbc.py --sweep --folds 3 --workdir /tmp/abl  # + sweep_folds.md
  python launch.py --mode inspect --workdir /tmp/demo
  python launch.py --mode evaluate --workdir /tmp/demo --eval_dir /data/new_center [--round 5]
  python launch.py --mode predict --workdir /tmp/demo --input /data/cells --output preds.csv

Running the same train command again in the same workdir resumes it.

A failure the user can fix (a refused setting or workdir, a missing file, a full or read-only
disk, a missing extra) ends in one line ``fedblood: error: ...`` and exit code 1; anything else
is a bug and keeps its traceback. ``--debug`` (or ``FEDBLOOD_DEBUG=1``) shows the traceback of
every failure, for a bug report.
"""

import logging as std_logging
import os
from pathlib import Path
import re
import sys
import threading

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedblood.rundir import lock  # light: no JAX

_CONFIG = config_flags.DEFINE_config_file('config', str(Path(__file__).parent / 'configs/demo.py'),
                                          'Config file[:arg].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory of the run (created; resumed if present).', required=True)
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict', 'inspect'],
                          'What to do.')
_SWEEP = flags.DEFINE_bool('sweep', False, "Run every point of the config file's get_sweep().")
_SEEDS = flags.DEFINE_string('seeds', None,
                             "Run the study once per seed ('0-4', '0,3,7'), each in "
                             '<workdir>/seed=S, and write seeds_report.md (mean ± sd over seeds).')
_FOLDS = flags.DEFINE_integer('folds', None,
                              'Run the study once per fold of a stratified K-fold split of every '
                              'center (fold i: data.folds=K, data.fold=i, seed + i), each in '
                              '<workdir>/fold=I, and write folds_report.md: every image is a test '
                              'image once.')
_ONLY_FOLDS = flags.DEFINE_string('only_folds', None,
                                  "With --folds K: run only these of the K folds ('0-2', '0,3'); "
                                  'the others can run later into the same workdir, and the '
                                  'report covers every fold finished there with this config.')
_VECTORIZE = flags.DEFINE_bool('vectorize', False,
                               '--seeds: train the seeds\' federated rounds as one vmapped program '
                               '(docs/performance.md: slower on CPU).')
_EVAL_DIR = flags.DEFINE_string('eval_dir', None, 'evaluate: a <class>/<images> folder.')
_ROUND = flags.DEFINE_integer('round', None,
                              'evaluate/predict: FL round (default: the round Table 2 reports, '
                              'chosen by fl.select; 0 = reference).')
_INPUT = flags.DEFINE_string('input', None, 'predict: an image or a folder of images.')
_OUTPUT = flags.DEFINE_string('output', None, 'evaluate: JSON path; predict: CSV path.')
_PRIORS = flags.DEFINE_enum('priors', 'train', ['train', 'em'],
                            "evaluate / predict: 'train' (the model as trained) or 'em' (the "
                            "folder's class priors re-estimated on its images by EM, Saerens et "
                            'al. 2002, and the predictions corrected for them).')
_CROP = flags.DEFINE_string('crop', None,
                            'evaluate / predict: the central fraction of each image side to keep '
                            "(that site's scale normalisation, as data.crop), or 'auto': the crop "
                            "under which the model's predictions on the folder's own images carry "
                            'the most information (fedblood/study/scale.py). Default: for a center '
                            "of the run, its data.crop; for any other folder, 'auto'.")

_DEBUG = flags.DEFINE_bool('debug', False, 'On a failure, show the Python traceback (for a bug '
                           'report); also FEDBLOOD_DEBUG=1.')

# What a user fixes (bad input, the machine's limits, divergence, a missing extra): one line.
EXPECTED = (ValueError, OSError, FloatingPointError, lock.WorkdirBusy, ImportError)


def debugging() -> bool:
  return _DEBUG.value or os.environ.get('FEDBLOOD_DEBUG', '') not in ('', '0')


def expected(error: BaseException) -> bool:
  """Whether ``error`` (or what caused it) is one a user fixes, not a bug of fedblood."""
  while error is not None:
    if isinstance(error, ImportError):  # a missing extra, not one of fedblood's own modules
      return not (error.name or '').startswith('fedblood')
    if isinstance(error, EXPECTED):
      return True
    error = error.__cause__ or error.__context__
  return False


def one_line(error: BaseException) -> str:
  """``fedblood: error: <message>`` of an expected error (an OSError: what, which file)."""
  cause = error
  while cause is not None and not isinstance(cause, EXPECTED):
    cause = cause.__cause__ or cause.__context__
  error = cause or error
  if isinstance(error, OSError) and error.strerror:
    message = error.strerror + (f': {error.filename}' if error.filename else '')
  else:
    message = str(error).strip() or type(error).__name__
  return f'fedblood: error: {message}'


class _NoTracebacks(std_logging.Filter):
  """Drops the tracebacks libraries log with their errors (Orbax on a full disk): lines only."""

  def filter(self, record):
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _quiet() -> None:
  """Without --debug: errors logged by libraries or raised in their threads show one line each.

  A full disk fails Orbax's writer threads; TensorStore's callbacks then print, through
  ``sys.unraisablehook``, a traceback per pending write. The main thread's own uncaught errors (a
  bug) keep theirs.
  """
  std_logging.getLogger().addFilter(_NoTracebacks())
  for handler in std_logging.getLogger().handlers + std_logging.getLogger('absl').handlers:
    handler.addFilter(_NoTracebacks())
  shown, main_hook = set(), sys.excepthook

  def line(kind, value, where):
    text = f'fedblood: {where}: {kind.__name__}: {value}'
    if text not in shown:
      shown.add(text)
      print(text, file=sys.stderr)

  def excepthook(kind, value, tb):
    if threading.current_thread() is threading.main_thread():
      return main_hook(kind, value, tb)
    return line(kind, value, f'in thread {threading.current_thread().name}')

  sys.excepthook = excepthook
  sys.unraisablehook = lambda u: line(u.exc_type, u.exc_value, 'in a callback')
  threading.excepthook = lambda a: line(a.exc_type, a.exc_value,
                                        f'in thread {a.thread.name if a.thread else "?"}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v 0 brings it back
  if not debugging():
    _quiet()
  try:
    _run(_MODE.value, _WORKDIR.value)
  except Exception as e:  # pylint: disable=broad-except
    if debugging() or not expected(e):
      raise  # a bug (or --debug): the traceback, for a report
    raise SystemExit(one_line(e)) from None


def _config():
  """The --config, or one line naming the file that does not load."""
  name = config_flags.get_config_filename(flags.FLAGS['config'])
  if not Path(name.split(':')[0]).is_file():  # the flag's value would fail at first use
    raise FileNotFoundError(f'--config {name}: no such config file')
  return _CONFIG.value


def _run(mode, workdir):
  # Imports per mode: inspect and bad command lines answer without loading JAX's whole stack.
  if mode == 'inspect':
    from fedblood.rundir import checkpoint_listing  # pylint: disable=g-import-not-at-top
    print(checkpoint_listing.inspect(workdir))
  elif mode == 'evaluate':
    from fedblood.study import inference  # pylint: disable=g-import-not-at-top
    if not _EVAL_DIR.value:
      raise app.UsageError('--mode evaluate needs --eval_dir')
    result = inference.evaluate_folder(workdir, _EVAL_DIR.value, _ROUND.value, _OUTPUT.value,
                                       crop=_CROP.value, priors=_PRIORS.value)
    print(inference.format_metrics(result))
    print(f'written: {result["output"]}, {result["report"]}')
  elif mode == 'predict':
    from fedblood.study import inference  # pylint: disable=g-import-not-at-top
    if not _INPUT.value or not _OUTPUT.value:
      raise app.UsageError('--mode predict needs --input and --output')
    count = inference.predict_folder(workdir, _INPUT.value, _OUTPUT.value, _ROUND.value,
                                     crop=_CROP.value, priors=_PRIORS.value)
    print(f'{count} images classified: {_OUTPUT.value}')
  elif _VECTORIZE.value and _SEEDS.value is None:
    raise app.UsageError('--vectorize needs --seeds')
  elif _ONLY_FOLDS.value is not None and _FOLDS.value is None:
    raise app.UsageError('--only_folds needs --folds K')
  elif _SWEEP.value and (_FOLDS.value is not None or _SEEDS.value is not None):
    from fedblood.study import seeds  # pylint: disable=g-import-not-at-top
    if _FOLDS.value is not None and _SEEDS.value is not None:
      raise app.UsageError('--folds cannot be combined with --seeds (fold i takes seed '
                           'config.seed + i)')
    if _VECTORIZE.value:
      raise app.UsageError('--vectorize is not supported with --sweep')
    config_file = config_flags.get_config_filename(flags.FLAGS['config'])
    path = seeds.run_sweep(_config(), config_file, workdir, folds=_FOLDS.value,
                           seeds=None if _SEEDS.value is None else seeds.parse_seeds(_SEEDS.value),
                           only_folds=_ONLY_FOLDS.value)
    print(f'table: {path}')
  elif _FOLDS.value is not None:
    from fedblood.study import seeds  # pylint: disable=g-import-not-at-top
    if _SEEDS.value is not None:
      raise app.UsageError('--folds cannot be combined with --seeds (fold i takes seed '
                           'config.seed + i)')
    print(f'report: {seeds.run_folds(_config(), workdir, _FOLDS.value, _ONLY_FOLDS.value)}')
  elif _SEEDS.value is not None:
    from fedblood.study import seeds  # pylint: disable=g-import-not-at-top
    path = seeds.run(_config(), workdir, seeds.parse_seeds(_SEEDS.value), _VECTORIZE.value)
    print(f'report: {path}')
  elif _SWEEP.value:
    from fedblood.study import sweep  # pylint: disable=g-import-not-at-top
    config_file = config_flags.get_config_filename(flags.FLAGS['config'])
    print(sweep.run(_config(), config_file, workdir))
  else:
    from fedblood.study import train  # pylint: disable=g-import-not-at-top
    train.run(_config(), workdir)
    print(f'report: {workdir}/report.md')


def parse_flags(argv):
  """absl's parser, with one line for an unknown --config.* field or a config that fails."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    message = str(e).strip('"\'').replace('\\n', ' ').replace("\\'", "'")
    raise SystemExit(f'fedblood: bad --config override: no such config field {message}') from None
  except flags.Error as e:
    message = str(e)
    if 'Traceback' in message and not ('--debug' in argv or os.environ.get('FEDBLOOD_DEBUG')):
      last = [l.strip() for l in message.splitlines() if re.match(r'\s*\w+(Error|Exception)', l)]
      message = f'{message.splitlines()[0].rstrip(": ")}: {last[-1] if last else ""}'
    raise SystemExit(f'fedblood: error: {message}\n'
                     'Pass --helpshort or --helpfull to see help on flags.') from None


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
