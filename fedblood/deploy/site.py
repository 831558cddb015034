"""A site: its own center's data, its client state on its own disk, the three requests it answers.

No Flower here (:mod:`fedblood.deploy.client_app` wraps it): every request carries the
study's config, the center the server takes this site for and its index ``k``, and the
server state; the site answers

* ``query``: its center and split sizes (and, if asked, evaluations);
* ``train``: ONE local update with the simulation's jitted client function
  (:func:`fedblood.core.simulate.client_fn`), on its training split padded to the
  federation's ``Nmax``, with weight ``w_k`` and key ``fold_in(fold_in(key, r), k)``
  as the simulation derives them, from its client state of the round the server last
  accepted from it (``committed``);
* ``evaluate``: full metrics of the requested models on its val/test splits.

Client state (FedDyn's lambda_k, SCAFFOLD's c_k) lives in an Orbax directory
``<state-dir>/<study>/client_state/<round>``. Round ``r``'s state is saved before the
reply leaves; a state the server never accepted (the reply was lost, refused, or the
server restarted) is replaced when that round is trained again from ``committed``. So a
SuperNode killed at any instant and restarted with the same state dir resumes exactly.

A site trusts nothing the server sends beyond the study's numbers:

* every file or folder it reads or writes comes from its own node config: the config
  fields naming one (:data:`PATH_FIELDS`: ``data.root``, ``data.cache_dir``,
  ``model.pretrained``, ``reference.restore``) are replaced by the node config's value or
  emptied, whatever the server sent (logged when they differed). Overriding rather than
  refusing is what lets the server's config name its own machine's folders and the
  deployed run still equal the simulated one; ``data.source`` (a format, not a folder) is
  the node config's ``data-source`` when set, else the study's;
* the study id names a folder in the state dir only if it is a study id
  (:data:`fedblood.deploy.wire.STUDY_ID`) that resolves to a direct child of the state
  dir; the folder records the digest of the config that made it (``study.json``), so a
  request carrying another study's id with another config is refused and touches nothing;
* the center index, round and ``committed`` are checked against the site's own study;
* one process at a time holds the state dir (:func:`fedblood.rundir.lock.hold`, ``run.lock``),
  and the state dir belongs to one center (``site.json``): a second SuperNode on the same
  state dir is refused.
"""

import hashlib
import json
import os
from pathlib import Path

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fedblood.core import simulate
from fedblood.deploy import study as study_lib
from fedblood.deploy import wire
from fedblood.rundir import checkpoint, lock


class SiteError(ValueError):
  """A request this site refuses (names the node config key or request field at fault)."""


def settings(node_config) -> tuple[str, Path]:
  """``(center, state_dir)`` from the SuperNode's ``--node-config``."""
  missing = [k for k in ('center', 'state-dir') if not str(node_config.get(k, ''))]
  if missing:
    raise SiteError(f'node config is missing {missing} (flower-supernode --node-config '
                    '"center=\'<name>\' state-dir=\'<dir>\' [data-root=... data-source=... '
                    'cache-dir=...]")')
  return str(node_config['center']), Path(str(node_config['state-dir'])).expanduser().absolute()


# Config fields naming a file or folder: ``{field: the node config key a site takes it from}``
# (None: never read on a site, always emptied there).
PATH_FIELDS = {'data.root': 'data-root', 'data.cache_dir': 'cache-dir',
               'model.pretrained': None, 'reference.restore': None}


def site_config(config, node_config):
  """The server's ``config`` with every :data:`PATH_FIELDS` entry the site's own (in place).

  Each path field becomes the node config's value (``''``, the loaders' default, when the
  node config has none); a server value that differs is logged and ignored. ``data.source``
  is the node config's ``data-source`` when set.

  Raises:
    SiteError: ``data.source='folder'`` without a ``data-root`` in the node config.
  """
  for field, key in PATH_FIELDS.items():
    group, name = field.split('.')
    if group not in config or name not in config[group]:
      continue
    sent = str(config[group][name] or '')
    own = str(node_config.get(key, '')) if key else ''
    if sent and sent != own:
      logging.warning('ignored the server\'s %s=%r: this site takes it from its node config '
                      '(%s)', field, sent, f'{key}={own!r}' if key else 'never read here')
    config[group][name] = own
  if 'data-source' in node_config:
    config.data.source = str(node_config['data-source'])
  if config.data.source == 'folder' and not config.data.root:
    raise SiteError('data.source=\'folder\': the node config needs data-root=\'<folder holding '
                    '<center>/<class>/<images>>\' (a site never reads a folder the server names)')
  return config


def study_dir(state_dir: Path, study) -> Path:
  """``<state-dir>/<study>``, resolved, if ``study`` is a study id naming a child of it.

  Raises:
    SiteError: naming the id, for anything else (``..``, a separator, an absolute path).
  """
  reason = wire.check_study_id(study)
  root = state_dir.resolve()
  path = None if reason else (root / study).resolve()
  if path is not None and path.parent != root:  # (a symlink the site's admin made)
    reason = f'study id {study!r} resolves to {path}, outside the state dir {root}'
  if reason:
    raise SiteError(f'refused the server\'s request: {reason}')
  return path


def _write_json(path: Path, data: dict) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(data, sort_keys=True) + '\n')
  os.replace(tmp, path)


def _claim(path: Path, data: dict, what: str) -> None:
  """Writes ``data`` to ``path`` on first use; refuses when ``path`` records other values."""
  if path.exists():
    held = json.loads(path.read_text())
    differ = {k: (held.get(k), v) for k, v in data.items() if held.get(k) != v}
    if differ:
      raise SiteError(f'{what}: {path} records {({k: a for k, (a, _) in differ.items()})}, this '
                      f'request has {({k: b for k, (_, b) in differ.items()})}; refused, nothing '
                      'touched')
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_json(path, data)


def enable_compile_cache(state_dir: Path) -> None:
  """JAX's persistent compilation cache in the state dir.

  Flower starts a fresh ClientApp process per message, so without it every round would
  compile the local update again.
  """
  jax.config.update('jax_compilation_cache_dir', str(state_dir / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def _sizes(center) -> dict:
  return {'center': center.name, 'train_size': len(center.train.labels),
          'val_size': len(center.val.labels), 'test_size': len(center.test.labels)}


def _evaluate(st, center, server_state, frozen, request) -> dict:
  """``{model: {split: full metrics}}`` of the requested ``eval_params`` models."""
  wanted = json.loads(request.get('evaluate', '[]'))
  models = st.algorithm.eval_params(server_state)
  out = {}
  for name in wanted:
    if name not in models:
      raise SiteError(f'evaluate: no model {name!r} (have {sorted(models)})')
    out[name] = {s: st.experiment.evaluate(models[name], frozen, getattr(center, s))
                 for s in ('val', 'test') if len(getattr(center, s).labels)}
  return out


def _state_manager(folder: Path, every: int):
  # The server commits a round each `every` rounds (checkpoint.every): a restarted server asks
  # for the state of a round up to `every` trained rounds back, plus one never accepted.
  return checkpoint.manager(folder / 'client_state', keep=every + 2)


def _restore_client_state(mngr, st, committed: int, center: str):
  fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), st.client)
  if committed == 0 or not jax.tree.leaves(fresh):
    return fresh
  if committed not in mngr.all_steps():
    raise SiteError(f'center {center!r}: the server accepted round {committed} from this site, '
                    f'but {mngr.directory} holds rounds {list(mngr.all_steps())}: was the '
                    'state dir changed?')
  state, _ = checkpoint.restore(mngr, {'client': fresh}, committed)
  return state['client']


def handle(kind: str, request: dict, server_rec, frozen_rec, node_config) -> dict:
  """Answers one request; returns ``{'site': ..., 'eval': ..., ['params', 'state', 'train']}``.

  Holds the state dir's lock throughout (:func:`fedblood.rundir.lock.hold`).

  Args:
    kind: 'query', 'train' or 'evaluate'.
    request: the request's fields (``config``, ``study``, ``center``, ``index``, ...).
    server_rec, frozen_rec: ArrayRecords of the server state and the frozen params
      (None for a bare query).
    node_config: the SuperNode's node config.

  Raises:
    SiteError: a request or node config this site refuses (Flower sends the server the
      message as the reply's error), before anything on disk changed.
  """
  name, state_dir = settings(node_config)
  if 'study' in request:
    study_dir(state_dir, request['study'])  # refused before the state dir is even created
  try:
    with lock.hold(state_dir):
      _claim(state_dir / 'site.json', {'center': name}, f'state-dir={str(state_dir)!r}')
      return _handle(kind, request, server_rec, frozen_rec, node_config, name, state_dir)
  except lock.WorkdirBusy as e:
    raise SiteError(f'state-dir={str(state_dir)!r} is in use by another process (two '
                    'SuperNodes on one state dir would overwrite each other\'s client state; '
                    f'give each its own state-dir): {e}') from None


def _handle(kind, request, server_rec, frozen_rec, node_config, name, state_dir) -> dict:
  enable_compile_cache(state_dir)
  config = site_config(wire.config_from_json(request['config']), node_config)
  st = study_lib.build(config)
  if name not in st.centers:
    raise SiteError(f'node config center={name!r} is not a center of this study {st.centers}')
  center = study_lib.load_site_center(st.config.data, name, node_config)
  reply = {'site': _sizes(center)}
  if kind == 'query' and server_rec is None:
    return reply
  if kind != 'query' and request.get('center') != name:
    raise SiteError(f'the server sent center {request.get("center")!r}\'s request to the site '
                    f'of center {name!r}')
  for rec, template, what in ((server_rec, st.server, 'server state'),
                              (frozen_rec, st.frozen, 'frozen params')):
    reason = wire.check_tree(rec, template, what)
    if reason:
      raise SiteError(f'refused the server\'s {kind} request: {reason}')
  server_state = wire.from_record(server_rec, st.server)
  frozen = wire.from_record(frozen_rec, st.frozen)
  if kind != 'train':
    reply['eval'] = _evaluate(st, center, server_state, frozen, request)
    return reply
  r, k, committed = int(request['round']), int(request['index']), int(request['committed'])
  if k != st.centers.index(name) or not 0 <= committed < r:
    raise SiteError(f'refused the server\'s train request: index {k}, round {r}, committed '
                    f'{committed} (center {name!r} is index {st.centers.index(name)}; '
                    'committed must be in [0, round))')
  folder = study_dir(state_dir, request.get('study'))
  digest = hashlib.sha256(request['config'].encode()).hexdigest()
  _claim(folder / 'study.json', {'config_sha256': digest, 'center': name},
         f'study {request["study"]!r}')
  reply['eval'] = _evaluate(st, center, server_state, frozen, request)
  mngr = _state_manager(folder, st.config.checkpoint.get('every', 1))
  client_state = _restore_client_state(mngr, st, committed, name)
  examples = simulate.pad_centers([center.train], int(request['nmax'])).examples
  size = jnp.int32(len(center.train.labels))
  local, new_state, metrics = study_lib.client_step(st)(
      server_state, client_state, jnp.float32(request['weight']), frozen, examples, size,
      study_lib.rng(st.config.seed, r, k))
  for step in [s for s in mngr.all_steps() if s > committed]:
    mngr.delete(step)  # never accepted by the server: superseded by this round's state
  if jax.tree.leaves(new_state):
    checkpoint.save(mngr, r, {'client': new_state},
                    {'kind': 'client state', 'center': name, 'round': r,
                     'study': request['study']})
  mngr.close()
  reply.update(params=local, state=new_state,
               train={m: np.asarray(v).item() for m, v in metrics.items()})
  return reply
