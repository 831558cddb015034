"""A site: its own center's data, its client state on its own disk, the three requests it answers.

No Flower here (:mod:`fedblood.deploy.client_app` wraps it): every request carries the
study's config, the center the server takes this site for and its index ``k``, and the
server state; the site answers

* ``query``: its center and split sizes (and, if asked, evaluations);
* ``train``: ONE local update with the simulation's jitted client function
  (:func:`fedblood.core.simulate.client_fn`), on its training split padded to the
  federation's ``Nmax``, with weight ``w_k`` and key ``fold_in(fold_in(key, r), k)``
  as the simulation derives them, from its client state of the round the server last
  accepted from it (``committed``). Under ``fl.dp`` the key is secret and the site accounts
  for and may decline the round (:mod:`fedblood.deploy.site_privacy`);
* ``evaluate``: full metrics of the requested models on its val/test splits.

Client state (FedDyn's lambda_k, SCAFFOLD's c_k) lives in an Orbax directory
``<state-dir>/<study>/client_state/<round>``. Round ``r``'s state is saved before the
reply leaves; a state the server never accepted (the reply was lost, refused, or the
server restarted) is replaced when that round is trained again from ``committed``. So a
SuperNode killed at any instant and restarted with the same state dir resumes exactly.

A site trusts nothing the server sends beyond the study's numbers
(:mod:`fedblood.deploy.trust`: paths from its own node config, study ids checked, claims
recorded); one process at a time holds the state dir (:func:`fedblood.rundir.lock.hold`,
``run.lock``): the warm worker (:mod:`fedblood.deploy.worker`), or one message's process.
"""

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedblood.core import rounds, simulate
from fedblood.deploy import site_privacy
from fedblood.deploy import study as study_lib
from fedblood.deploy import wire
from fedblood.deploy.relay import SiteError, settings
from fedblood.deploy.trust import claim, site_config, study_dir
from fedblood.rundir import checkpoint, lock


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


PER_IMAGE = ('labels', 'predictions')


def _evaluate(st, center, server_state, frozen, request) -> dict:
  """``{model: {split: full metrics}}`` of the requested ``eval_params`` models, without the
  per-image labels and predictions (they stay at the site)."""
  wanted = json.loads(request.get('evaluate', '[]'))
  models = st.algorithm.eval_params(server_state)
  out = {}
  for name in wanted:
    if name not in models:
      raise SiteError(f'evaluate: no model {name!r} (have {sorted(models)})')
    out[name] = {s: {k: v for k, v in st.experiment.evaluate(
        models[name], frozen, getattr(center, s)).items() if k not in PER_IMAGE}
                 for s in ('val', 'test') if len(getattr(center, s).labels)}
  return out


def _study(config_text: str, node_config, name: str):
  """``(study, center)``: the server's config with the site's own paths, and its center."""
  config = site_config(wire.config_from_json(config_text), node_config)
  st = study_lib.build(config)
  if name not in st.centers:
    raise SiteError(f'node config center={name!r} is not a center of this study {st.centers}')
  return st, study_lib.load_site_center(st.config.data, name, node_config)


class Warm:
  """What a site keeps between requests (:mod:`fedblood.deploy.worker`): built studies with
  their centers, open checkpoint managers, and each study's newest client state, which is
  also on disk. A fresh one (a request answered in its own process) rebuilds all of it."""

  def __init__(self):
    self.tables, self.states = {}, {}

  def get(self, table: str, key, make):
    """``make()``'s value, made once per ``(table, key)``."""
    entries = self.tables.setdefault(table, {})
    if key not in entries:
      entries[key] = make()
    return entries[key]

  def client_state(self, folder: Path, committed: int, restore):
    """The client state of round ``committed``: the one kept, if it is that round's."""
    kept = self.states.get(folder)
    return kept[1] if kept is not None and kept[0] == committed else restore()

  def keep_client_state(self, folder: Path, round_index: int, state) -> None:
    self.states[folder] = (round_index, state)

  def clear(self) -> None:
    for mngr in self.tables.get('manager', {}).values():
      mngr.close()
    self.tables, self.states = {}, {}


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
  """Answers one request in this process; returns :func:`answer`'s reply.

  Holds the state dir's lock throughout (:func:`fedblood.rundir.lock.hold`); the warm worker
  (:mod:`fedblood.deploy.worker`) holds it for its life and calls :func:`answer` instead.

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
  _, state_dir = settings(node_config)
  if 'study' in request:
    study_dir(state_dir, request['study'])  # refused before the state dir is even created
  warm = Warm()
  try:
    with lock.hold(state_dir):
      return answer(kind, request, server_rec, frozen_rec, node_config, warm)
  except lock.WorkdirBusy as e:
    raise SiteError(f'state-dir={str(state_dir)!r} is in use by another process (two '
                    'SuperNodes on one state dir would overwrite each other\'s client state; '
                    f'give each its own state-dir): {e}') from None
  finally:
    warm.clear()


def answer(kind: str, request: dict, server_rec, frozen_rec, node_config, warm) -> dict:
  """``{'site': ..., 'eval': ..., ['params', 'state', 'train']}``: one request answered.

  The caller holds the state dir's lock. ``warm`` (a :class:`Warm`) keeps what the next
  request can reuse; the reply is the same with a fresh one.
  """
  name, state_dir = settings(node_config)
  if 'study' in request:
    study_dir(state_dir, request['study'])
  claim(state_dir / 'site.json', {'center': name}, f'state-dir={str(state_dir)!r}')
  return _handle(kind, request, server_rec, frozen_rec, node_config, name, state_dir, warm)


def records(out: dict) -> dict:
  """:func:`answer`'s reply with its ``params`` and ``state`` trees as ArrayRecords."""
  return {k: wire.to_record(v) if k in ('params', 'state') else v for k, v in out.items()}


def _handle(kind, request, server_rec, frozen_rec, node_config, name, state_dir, warm) -> dict:
  enable_compile_cache(state_dir)
  st, center = warm.get('study', (request['config'], json.dumps(dict(node_config), sort_keys=True)),
                        lambda: _study(request['config'], node_config, name))
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
  claim(folder / 'study.json', {'config_sha256': digest, 'center': name},
         f'study {request["study"]!r}')
  reply['eval'] = _evaluate(st, center, server_state, frozen, request)
  dp = site_privacy.prepare(st.config.fl, name, len(center.train.labels), state_dir,
                            request['study'], r, node_config)
  if dp is not None and dp.declined:
    return {**reply, 'declined': dp.declined, 'privacy': dp.report}
  mngr = warm.get('manager', folder,
                  lambda: _state_manager(folder, st.config.checkpoint.get('every', 1)))
  client_state = warm.client_state(folder, committed,
                                   lambda: _restore_client_state(mngr, st, committed, name))
  examples = simulate.pad_centers(  # the class prior (fl.logit_adjust) from its own labels
      [center.train], int(request['nmax']),
      rounds.prior_classes(st.config.fl, st.experiment.model.num_classes)).examples
  size = jnp.int32(len(center.train.labels))
  # Under DP the key is secret (the server knows the seed); else the simulation's own.
  key = site_privacy.secret_key() if dp else study_lib.rng(st.config.seed, r, k)
  local, new_state, metrics = study_lib.client_step(st, dp and dp.plan)(
      server_state, client_state, jnp.float32(request['weight']), frozen, examples, size, key,
      jnp.int32(r))
  for step in [s for s in mngr.all_steps() if s > committed]:
    mngr.delete(step)  # never accepted by the server: superseded by this round's state
  if jax.tree.leaves(new_state):
    checkpoint.save(mngr, r, {'client': new_state},
                    {'kind': 'client state', 'center': name, 'round': r,
                     'study': request['study']})
  warm.keep_client_state(folder, r, new_state)
  if dp:
    site_privacy.spend(state_dir, dp)  # before the reply that releases the update leaves
    reply['privacy'] = dp.report
  reply.update(params=local, state=new_state,
               train={m: np.asarray(v).item() for m, v in metrics.items()})
  return reply
