"""A site: its own center's data, its client state on its own disk, the three requests it answers.

No Flower here (:mod:`fedblood.deploy.client_app` wraps it): every request carries the
study's config, the center the server takes this site for and its index ``k``, and the
server state; the site answers

* ``query``: its center and split sizes (and, if asked, evaluations);
* ``train``: ONE local update with the simulation's jitted client function
  (:func:`fedblood.simulate.client_fn`), on its training split padded to the
  federation's ``Nmax``, with weight ``w_k`` and key ``fold_in(fold_in(key, r), k)``
  as the simulation derives them, from its client state of the round the server last
  accepted from it (``committed``);
* ``evaluate``: full metrics of the requested models on its val/test splits.

Client state (FedDyn's lambda_k, SCAFFOLD's c_k) lives in an Orbax directory
``<state-dir>/<study>/client_state/<round>``. Round ``r``'s state is saved before the
reply leaves; a state the server never accepted (the reply was lost, refused, or the
server restarted) is replaced when that round is trained again from ``committed``. So a
SuperNode killed at any instant and restarted with the same state dir resumes exactly.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedblood import checkpoint, simulate
from fedblood.deploy import study as study_lib
from fedblood.deploy import wire


class SiteError(ValueError):
  """A request this site refuses (names the node config key or request field at fault)."""


def settings(node_config) -> tuple[str, Path]:
  """``(center, state_dir)`` from the SuperNode's ``--node-config``."""
  missing = [k for k in ('center', 'state-dir') if not str(node_config.get(k, ''))]
  if missing:
    raise SiteError(f'node config is missing {missing} (flower-supernode --node-config '
                    '"center=\'<name>\' state-dir=\'<dir>\' [data-root=... data-source=...]")')
  return str(node_config['center']), Path(str(node_config['state-dir'])).expanduser()


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


def _state_manager(state_dir: Path, study_id: str, every: int):
  # The server commits a round each `every` rounds (checkpoint.every): a restarted server asks
  # for the state of a round up to `every` trained rounds back, plus one never accepted.
  return checkpoint.manager(state_dir / study_id / 'client_state', keep=every + 2)


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

  Args:
    kind: 'query', 'train' or 'evaluate'.
    request: the request's fields (``config``, ``study``, ``center``, ``index``, ...).
    server_rec, frozen_rec: ArrayRecords of the server state and the frozen params
      (None for a bare query).
    node_config: the SuperNode's node config.
  """
  name, state_dir = settings(node_config)
  enable_compile_cache(state_dir)
  st = study_lib.build(wire.config_from_json(request['config']))
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
  reply['eval'] = _evaluate(st, center, server_state, frozen, request)
  if kind != 'train':
    return reply
  r, k, committed = int(request['round']), int(request['index']), int(request['committed'])
  mngr = _state_manager(state_dir, request['study'], st.config.checkpoint.get('every', 1))
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

