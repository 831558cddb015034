"""Helpers of the pipeline tests (test_train, test_launch, test_seeds, test_dp_pipeline, ...).

The ``smoke`` fixture that runs the smoke study once per session is in conftest.py.
"""

from pathlib import Path

import jax
import numpy as np

from configs import demo  # importable: pyproject sets pytest's pythonpath to the repo root
from fedblood.rundir import checkpoint, workdir as workdir_lib
from fedblood.study import inference
from fedblood.study.stages import fl


def smoke_config(cache_dir):
  """configs/demo.py:smoke with its synthetic centers built in ``cache_dir`` (hermetic)."""
  config = demo.get_config('smoke')
  config.data.cache_dir = str(cache_dir)
  return config


def fl_state(config, workdir, step=None, num_centers=3):
  """``(state, meta)`` of an FL checkpoint of a smoke workdir (default: the latest round)."""
  loaded = inference.load_model(workdir, 0)
  _, _, template, _ = fl.fl_template(loaded.experiment, config.fl, loaded.params, num_centers)
  mngr = checkpoint.manager(workdir_lib.checkpoints(Path(workdir), workdir_lib.FL))
  state, meta = checkpoint.restore(mngr, template, step)
  mngr.close()
  return state, meta


def assert_same_tree(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def interrupt_saves(monkeypatch, stop_before_save: int):
  """Makes ``checkpoint.save`` raise KeyboardInterrupt at its ``stop_before_save``-th call.

  Returns the real ``checkpoint.save`` (to put back before resuming).
  """
  real_save, calls = checkpoint.save, []

  def interrupted_save(*args, **kwargs):
    calls.append(1)
    if len(calls) == stop_before_save:
      raise KeyboardInterrupt('simulated interruption')
    return real_save(*args, **kwargs)

  monkeypatch.setattr(checkpoint, 'save', interrupted_save)
  return real_save
