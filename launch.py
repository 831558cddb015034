r"""fedblood's command line (intentionally short: the logic lives in fedblood/).

  python launch.py --workdir /tmp/demo                                  # the demo study (train)
  python launch.py --config configs/wbc.py --config.fl.rounds=30 --workdir /tmp/wbc
  python launch.py --config configs/paper.py --sweep --workdir /tmp/sweep  # all get_sweep() points
  python launch.py --config configs/wbc.py --seeds 0-4 --workdir /tmp/wbc5  # + seeds_report.md
  python launch.py --mode inspect --workdir /tmp/demo
  python launch.py --mode evaluate --workdir /tmp/demo --eval_dir /data/new_center [--round 5]
  python launch.py --mode predict --workdir /tmp/demo --input /data/cells --output preds.csv

Running the same train command again in the same workdir resumes it.
"""

from pathlib import Path

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedblood import lock  # light: no JAX

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
_VECTORIZE = flags.DEFINE_bool('vectorize', False,
                               '--seeds: train the seeds\' federated rounds as one vmapped program '
                               '(docs/performance.md: slower on CPU).')
_EVAL_DIR = flags.DEFINE_string('eval_dir', None, 'evaluate: a <class>/<images> folder.')
_ROUND = flags.DEFINE_integer('round', None,
                              'evaluate/predict: FL round (default latest; 0 = reference).')
_INPUT = flags.DEFINE_string('input', None, 'predict: an image or a folder of images.')
_OUTPUT = flags.DEFINE_string('output', None, 'evaluate: JSON path; predict: CSV path.')
_CROP = flags.DEFINE_float('crop', None,
                           'evaluate / predict: the central fraction of each image side to keep '
                           "(that site's scale normalisation, as data.crop); default: the run's "
                           'data.crop of the center named like the folder, else 1 (all of it).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v 0 brings it back
  try:
    _run(_MODE.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError, lock.WorkdirBusy) as e:
    # Bad input and divergence are the user's to fix: the message, not a traceback.
    raise SystemExit(f'fedblood: {type(e).__name__}: {e}') from e


def _run(mode, workdir):
  # Imports per mode: inspect and bad command lines answer without loading JAX's whole stack.
  if mode == 'inspect':
    from fedblood import checkpoint_listing  # pylint: disable=g-import-not-at-top
    print(checkpoint_listing.inspect(workdir))
  elif mode == 'evaluate':
    from fedblood import inference  # pylint: disable=g-import-not-at-top
    if not _EVAL_DIR.value:
      raise app.UsageError('--mode evaluate needs --eval_dir')
    result = inference.evaluate_folder(workdir, _EVAL_DIR.value, _ROUND.value, _OUTPUT.value,
                                       crop=_CROP.value)
    print(inference.format_metrics(result))
    print(f'written: {result["output"]}')
  elif mode == 'predict':
    from fedblood import inference  # pylint: disable=g-import-not-at-top
    if not _INPUT.value or not _OUTPUT.value:
      raise app.UsageError('--mode predict needs --input and --output')
    count = inference.predict_folder(workdir, _INPUT.value, _OUTPUT.value, _ROUND.value,
                                     crop=_CROP.value)
    print(f'{count} images classified: {_OUTPUT.value}')
  elif _VECTORIZE.value and _SEEDS.value is None:
    raise app.UsageError('--vectorize needs --seeds')
  elif _SEEDS.value is not None:
    from fedblood import seeds  # pylint: disable=g-import-not-at-top
    if _SWEEP.value:
      raise app.UsageError('--seeds and --sweep cannot be combined')
    path = seeds.run(_CONFIG.value, workdir, seeds.parse_seeds(_SEEDS.value), _VECTORIZE.value)
    print(f'report: {path}')
  elif _SWEEP.value:
    from fedblood import sweep  # pylint: disable=g-import-not-at-top
    config_file = config_flags.get_config_filename(flags.FLAGS['config'])
    print(sweep.run(_CONFIG.value, config_file, workdir))
  else:
    from fedblood import train  # pylint: disable=g-import-not-at-top
    train.run(_CONFIG.value, workdir)
    print(f'report: {workdir}/report.md')


def parse_flags(argv):
  """absl's parser, with a one-line message for an unknown --config.* field."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = str(e).strip('"\'').replace('\\n', ' ').replace("\\'", "'")
    raise SystemExit(f'fedblood: bad --config override: no such config field {message}') from None


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
