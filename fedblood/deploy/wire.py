"""What travels between the server and the sites: pytrees as flat named arrays, the config as JSON.

Nothing is pickled: arrays go as ``.npy`` bytes (Flower's ``Array``, saved and loaded with
``allow_pickle=False``), every other value as JSON text or Flower's typed scalar records.
A received tree is checked against the template the receiver builds from the config
(:func:`check_tree`) before any of it is used.
"""

import ast
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flwr.app import Array, ArrayRecord

from fedblood.rundir import workdir as workdir_lib


def leaf_names(tree) -> list[str]:
  """``'/'``-joined key paths of a pytree's leaves, in ``jax.tree`` order."""
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  return ['/'.join(_key(k) for k in path) or '.' for path, _ in paths]


def _key(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def to_record(tree) -> ArrayRecord:
  """A pytree of arrays as an ``ArrayRecord`` keyed by leaf path."""
  names, leaves = leaf_names(tree), jax.tree.leaves(tree)
  return ArrayRecord(array_dict={n: Array(np.asarray(x)) for n, x in zip(names, leaves)})


def check_tree(record, template, what: str) -> str | None:
  """Why ``record`` cannot stand for ``template`` (None when it can).

  Args:
    record: the received ``ArrayRecord`` (or None when missing).
    template: a pytree of arrays / ShapeDtypeStructs the receiver expects.
    what: named in the reason, e.g. ``"params"``.

  Returns:
    A one-line reason: missing or unexpected leaves, a wrong shape or dtype, or
    non-finite values; None if every leaf matches and is finite.
  """
  names = leaf_names(template)
  if record is None:
    return f'{what}: missing'
  got = set(record.keys())
  if got != set(names):
    missing, extra = sorted(set(names) - got), sorted(got - set(names))
    return f'{what}: leaves differ (missing {missing[:3]}, unexpected {extra[:3]})'
  for name, leaf in zip(names, jax.tree.leaves(template)):
    try:
      x = record[name].numpy()
    except (TypeError, ValueError) as e:  # not a numpy array, or one np.load refuses
      return f'{what}/{name}: unreadable ({e})'
    shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
    if x.shape != shape or x.dtype != dtype:
      return f'{what}/{name}: {x.dtype}{list(x.shape)}, expected {dtype}{list(shape)}'
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
      return f'{what}/{name}: non-finite values'
  return None


def from_record(record, template):
  """The pytree of ``template``'s structure holding ``record``'s arrays (check it first)."""
  names = leaf_names(template)
  return jax.tree.unflatten(jax.tree.structure(template), [record[n].numpy() for n in names])


# ------------------------------------------------------------------------------------ config
def config_json(config) -> str:
  return json.dumps(workdir_lib.config_dict(config), sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def study_id(config, workdir) -> str:
  """Names a study: its config and the server's workdir (a site keeps one state per study)."""
  key = config_json(config) + '\n' + str(Path(workdir).absolute())
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_config(spec: str, overrides: str = '') -> ml_collections.ConfigDict:
  """A fedblood config from ``'path/to/config.py[:arg]'`` and ``'a.b=1 c=x'`` overrides.

  Override values are Python literals (``2``, ``0.1``, ``'fed_avg'``, ``(1, 2)``); anything
  else is taken as a string. Unknown fields are an error naming them.
  """
  path, _, arg = spec.partition(':')
  file = Path(path).expanduser().absolute()
  if not file.is_file():
    raise FileNotFoundError(f'config={spec!r}: no such file {file}')
  if (file.parent / '__init__.py').exists() and str(file.parent.parent) not in sys.path:
    sys.path.insert(0, str(file.parent.parent))  # configs/ files import `from configs import`
  module_spec = importlib.util.spec_from_file_location(f'_fedblood_config_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for item in overrides.split():
    key, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'overrides: {item!r} is not key=value')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p] if p in node else None
      if node is None:
        break
    if node is None or leaf not in node:
      raise ValueError(f'overrides: no such config field {key!r}')
    node[leaf] = value
  return config
