"""Sweeps: every point of a config file's ``get_sweep()`` in its own sub-workdir, then a summary.

``get_sweep()`` returns a list of flat override dicts (``{'fl.alpha': 0.1, 'seed': 1}``),
applied on top of the command line's config. Each point trains (or resumes) in
``<workdir>/<key=value,...>``; rerunning the sweep skips finished points and resumes
an interrupted one. ``sweep_summary.md`` / ``.csv`` hold every point's headline numbers.

Before any point trains, every point is validated and its sub-workdir checked against the
point's config (its config.json is the point's fingerprint, :func:`fedblood.rundir.workdir.check_config`):
a rerun with another config (``--config.fl.rounds=4`` over a 3-round sweep) is refused naming
the point and the differing fields, never reported done from a stale results.json. At most
:data:`MAX_POINTS` points.
"""

import importlib.util
import itertools
import json
from pathlib import Path
import re

from fedblood.reporting import sweep_summary
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import train, validate

MAX_POINTS = 1000


def load_sweep(config_file: str) -> list[dict]:
  """The override dicts of ``get_sweep()`` in ``config_file`` (a path, ``:arg`` allowed)."""
  path = config_file.split(':')[0]
  spec = importlib.util.spec_from_file_location('_fedblood_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'--sweep: {path} defines no get_sweep()')
  points = list(itertools.islice(module.get_sweep(), MAX_POINTS + 1))
  if not points or not all(isinstance(p, dict) for p in points):
    raise ValueError(f'--sweep: {path}:get_sweep() must return a non-empty list of dicts')
  if len(points) > MAX_POINTS:
    raise ValueError(f'--sweep: {path}:get_sweep() returns more than {MAX_POINTS} points')
  return points


def point_name(overrides: dict) -> str:
  """A directory name from overrides, e.g. ``fl.alpha=0.1,seed=1``."""
  name = ','.join(f'{k}={v}' for k, v in sorted(overrides.items())) or 'base'
  return re.sub(r'[^A-Za-z0-9_.,=+-]', '_', name)


def apply(config, overrides: dict):
  """A copy of ``config`` with flat ``overrides``; unknown keys or wrong types are errors."""
  point = config.copy_and_resolve_references()
  for key, value in overrides.items():
    parent, _, leaf = key.rpartition('.')
    node = point
    for part in parent.split('.') if parent else []:
      if part not in node:
        raise ValueError(f'sweep override {key!r}: no config field {part!r}')
      node = node[part]
    if leaf not in node:
      raise ValueError(f'sweep override {key!r}: no config field {leaf!r}')
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f'sweep override {key}={value!r}: {e}') from e
  return point


def points(config, config_file: str) -> list[dict]:
  """``[{'name', 'overrides', 'config'}]`` of every sweep point, each validated (before any
  trains)."""
  out = []
  for overrides in load_sweep(config_file):
    point = apply(config, overrides)
    validate.check(point)
    out.append({'name': point_name(overrides), 'overrides': overrides, 'config': point})
  return out


def run(config, config_file: str, workdir) -> str:
  """Runs every sweep point; returns the summary markdown."""
  workdir = Path(workdir)
  points_ = points(config, config_file)
  for p in points_:  # a point's workdir of another config (a stale result): refused before any work
    if (workdir / p['name']).exists():
      workdir_lib.check_config(p['config'], workdir / p['name'], write=False)
  for p in points_:
    results_path = workdir / p['name'] / 'results.json'
    p['results'] = (json.loads(results_path.read_text()) if results_path.exists()
                    else train.run(p['config'], workdir / p['name']))
  md, _ = sweep_summary.write_sweep_summary(points_, workdir)
  return md.read_text()
