"""What travels between the server and the sites: a pytree as its layout and its bytes, the config as JSON.

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


LAYOUT, DATA = 'layout', 'data'


def _layout(tree) -> list:
  """``[[leaf path, dtype string, shape], ...]`` in ``jax.tree`` order."""
  return [[n, np.dtype(x.dtype).str, list(np.shape(x))]
          for n, x in zip(leaf_names(tree), jax.tree.leaves(tree))]


def to_record(tree) -> ArrayRecord:
  """A pytree of arrays as an ``ArrayRecord`` of two arrays: ``layout`` (the leaves' paths,
  dtypes and shapes as JSON text) and ``data`` (their bytes, one after the other).

  Two arrays, not one per leaf: Flower moves every array as its own objects, one request
  each, so a VGG16 tree of ~30 leaves cost hundreds of requests a round (docs/performance.md).
  """
  leaves = [np.ascontiguousarray(x) for x in jax.tree.leaves(tree)]
  spec = json.dumps(_layout(tree)).encode()
  data = (np.concatenate([x.reshape(-1).view(np.uint8) for x in leaves]) if leaves
          else np.zeros(0, np.uint8))
  return ArrayRecord(array_dict={LAYOUT: Array(np.frombuffer(spec, np.uint8).copy()),
                                 DATA: Array(data)})


def _read(record, key: str) -> np.ndarray:
  """``record[key]`` as a 1-D uint8 array (never unpickled); ValueError saying why not."""
  try:
    x = record[key].numpy()
  except (TypeError, ValueError) as e:  # not a numpy array, or one np.load refuses
    raise ValueError(f'unreadable ({e})') from None
  if x.dtype != np.uint8 or x.ndim != 1:
    raise ValueError(f'{x.dtype}{list(x.shape)}, expected a 1-D uint8 array')
  return x


def check_tree(record, template, what: str) -> str | None:
  """Why ``record`` cannot stand for ``template`` (None when it can).

  Args:
    record: the received ``ArrayRecord`` (or None when missing).
    template: a pytree of arrays / ShapeDtypeStructs the receiver expects.
    what: named in the reason, e.g. ``"params"``.

  Returns:
    A one-line reason: not a packed tree, missing or unexpected leaves, a wrong shape or
    dtype, data of the wrong length, or non-finite values; None if every leaf matches and
    is finite.
  """
  if record is None:
    return f'{what}: missing'
  if set(record.keys()) != {LAYOUT, DATA}:
    return f'{what}: holds {sorted(record.keys())[:4]}, expected {[DATA, LAYOUT]}'
  try:
    got = json.loads(_read(record, LAYOUT).tobytes().decode())
    got = {str(n): (str(d), [int(k) for k in s]) for n, d, s in got}
  except (ValueError, TypeError) as e:
    return f'{what}/{LAYOUT}: unreadable ({e})'
  expected = _layout(template)
  names = [n for n, _, _ in expected]
  if set(got) != set(names):
    missing, extra = sorted(set(names) - set(got)), sorted(set(got) - set(names))
    return f'{what}: leaves differ (missing {missing[:3]}, unexpected {extra[:3]})'
  for name, dtype, shape in expected:
    if got[name] != (dtype, shape):
      d, s = got[name]
      return f'{what}/{name}: {_dtype_name(d)}{s}, expected {_dtype_name(dtype)}{shape}'
  try:
    data = _read(record, DATA)
  except ValueError as e:
    return f'{what}/{DATA}: {e}'
  size = sum(np.dtype(d).itemsize * int(np.prod(s)) for _, d, s in expected)
  if data.size != size:
    return f'{what}/{DATA}: {data.size} bytes, expected {size}'
  for name, x in zip(names, _split(data, template)):
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
      return f'{what}/{name}: non-finite values'
  return None


def _dtype_name(text: str) -> str:
  """``'<f4'`` as ``'float32'``; a string numpy does not know, quoted (it came off the wire)."""
  try:
    return np.dtype(text).name
  except TypeError:
    return repr(text)


def _split(data: np.ndarray, template) -> list:
  """``data``'s bytes as ``template``'s leaves (own, aligned copies)."""
  out, offset = [], 0
  for leaf in jax.tree.leaves(template):
    dtype, shape = np.dtype(leaf.dtype), tuple(np.shape(leaf))
    count = int(np.prod(shape))
    out.append(np.frombuffer(data, dtype, count, offset).reshape(shape).copy())
    offset += count * dtype.itemsize
  return out


def from_record(record, template):
  """The pytree of ``template``'s structure holding ``record``'s arrays (check it first)."""
  leaves = _split(_read(record, DATA), template)
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


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
