"""TFDS without its chatter: one line per prepared center instead.

Building a center's dataset makes TFDS print "Downloading and preparing dataset Unknown size
...", "Dataset ... downloaded and prepared to ...", one progress bar per split and a "Using
custom data configuration" warning with the whole config, for every center, none of which is
news to someone running fedblood (nothing is downloaded). :func:`tfds_quiet` silences exactly
those while a center is built; set ``FEDBLOOD_TFDS_VERBOSE=1`` to see them again.
"""

import contextlib
import io
import logging as py_logging
import os
import sys

from absl import logging
from tensorflow_datasets.core.utils import tqdm_utils

_DROPPED = ('Using custom data configuration',)


class _DropTfdsChatter(py_logging.Filter):

  def filter(self, record):
    return not str(record.msg).startswith(_DROPPED)


@contextlib.contextmanager
def tfds_quiet():
  """Silences TFDS's prints, progress bars and config warnings inside the block."""
  if os.environ.get('FEDBLOOD_TFDS_VERBOSE'):
    yield
    return
  absl_logger = logging.get_absl_logger()
  chatter = _DropTfdsChatter()
  absl_logger.addFilter(chatter)
  was_active = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tqdm_utils.display_progress_bar(was_active)
    absl_logger.removeFilter(chatter)


def announce(message: str) -> None:
  """The one line a prepared center gets (stderr, beside fedblood's progress bars)."""
  print(f'fedblood: {message}', file=sys.stderr, flush=True)
