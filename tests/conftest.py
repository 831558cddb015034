"""Fixtures shared by the test files (helpers they import live in study_helpers.py & co)."""

import pytest

from fedblood.study import train
from study_helpers import smoke_config


@pytest.fixture(scope='session')
def smoke(tmp_path_factory):
  """``(config, workdir)`` of one finished smoke run (3 centers, 3 rounds, baselines).

  The run happens once per test session; every test using it reuses its workdir (read-only:
  copy it to change it) and its compiled functions.
  """
  base = tmp_path_factory.getbasetemp()
  config = smoke_config(base / 'tfds')
  workdir = base / 'smoke'
  if not (workdir / 'results.json').exists():
    train.run(config, workdir)
  return config, workdir
