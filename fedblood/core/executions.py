"""The bodies of the round's executions (:func:`fedblood.core.simulate.build_round` builds them).

Each takes the round's arguments ``(server_state, client_states, frozen, centers, active, key,
round_index)`` plus, keyword-only, ``algorithm`` (a :class:`fedblood.algorithms.FedAlgorithm`)
and ``client`` (:func:`fedblood.core.simulate.client_fn`); ``build_round`` binds those and jits the
result. 'loop' has two jitted parts, :func:`loop_client_step` and :func:`loop_server_step`,
driven from the host by :func:`loop_round`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fedblood.algorithms import base


def _round_keys(key, round_index, num):
  round_key = jax.random.fold_in(key, round_index)
  return jax.vmap(lambda k: jax.random.fold_in(round_key, k))(jnp.arange(num))


def _finish(algorithm, server_state, client_states, outputs, sizes, active):
  """Zeroes inactive centers' metrics and runs the server update (it keeps their states)."""
  local_params, new_states, metrics = outputs
  active = jnp.asarray(active, bool)
  metrics = jax.tree.map(lambda m: jnp.where(active, m, jnp.zeros_like(m)), metrics)
  server_state, client_states = algorithm.server_update(
      server_state, client_states, local_params=local_params, new_client_states=new_states,
      weights=base.client_weights(sizes), active=active)
  return server_state, client_states, metrics


_MAPPED = (None, 0, 0, None, None, 0, 0, 0, None)  # client()'s vmapped arguments


def vmap_round(server_state, client_states, frozen, centers, active, key, round_index, *,
               algorithm, client):
  """Every center's update in one ``vmap`` (centers short of the longest's steps: no-ops)."""
  num = centers.sizes.shape[0]
  outputs = jax.vmap(client, in_axes=_MAPPED)(
      server_state, client_states, base.client_weights(centers.sizes), frozen, centers.examples,
      jnp.arange(num), centers.sizes, _round_keys(key, round_index, num), round_index)
  return _finish(algorithm, server_state, client_states, outputs, centers.sizes, active)


def unroll_round(server_state, client_states, frozen, centers, active, key, round_index, *,
                 algorithm, client):
  """The centers' updates one after the other, unrolled in one program."""
  num = centers.sizes.shape[0]
  weights, rngs = base.client_weights(centers.sizes), _round_keys(key, round_index, num)
  outs = [client(server_state, jax.tree.map(lambda x: x[k], client_states), weights[k], frozen,
                 centers.examples, k, centers.sizes[k], rngs[k], round_index)
          for k in range(num)]
  outputs = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  return _finish(algorithm, server_state, client_states, outputs, centers.sizes, active)


def shard_round(server_state, client_states, frozen, centers, active, key, round_index, *,
                algorithm, client, devices=None):
  """The center axis split over ``devices`` (``shard_map``; vmap on each device)."""
  mesh_devices = np.asarray(devices if devices is not None else jax.devices())
  mesh = jax.sharding.Mesh(mesh_devices, ('centers',))
  num = centers.sizes.shape[0]
  pad = -num % mesh_devices.size
  pad_fn = lambda x, value=0: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1),
                                      constant_values=value) if pad else x
  weights = pad_fn(base.client_weights(centers.sizes), 1.0)  # empty centers take 0 steps
  rngs = _round_keys(key, round_index, num + pad)

  def local(server_state, client_states, weights, frozen, examples, sizes, rngs, round_index):
    centers_here = jnp.arange(sizes.shape[0])
    return jax.vmap(client, in_axes=_MAPPED)(server_state, client_states, weights, frozen,
                                             examples, centers_here, sizes, rngs, round_index)

  split = P('centers')
  in_specs = (P(), split, split, P(), split, split, split, P())
  outputs = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=split, check_vma=False)(
      server_state, jax.tree.map(pad_fn, client_states), weights, frozen,
      jax.tree.map(pad_fn, centers.examples), pad_fn(centers.sizes), rngs,
      jnp.asarray(round_index, jnp.int32))
  outputs = jax.tree.map(lambda x: x[:num], outputs)
  return _finish(algorithm, server_state, client_states, outputs, centers.sizes, active)


def loop_client_step(server_state, client_states, frozen, centers, key, round_index, k, *,
                     client):
  """'loop': center ``k``'s update (``k`` traced: one program for every center)."""
  rng = jax.random.fold_in(jax.random.fold_in(key, round_index), k)
  return client(server_state, jax.tree.map(lambda x: x[k], client_states),
                base.client_weights(centers.sizes)[k], frozen, centers.examples, k,
                centers.sizes[k], rng, round_index)


def loop_server_step(server_state, client_states, outs, sizes, active, *, algorithm):
  """'loop': the server update from one ClientUpdate per center."""
  outputs = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  return _finish(algorithm, server_state, client_states, outputs, sizes, active)


def loop_round(server_state, client_states, frozen, centers, active, key, round_index, *,
               client_step, server_step):
  """'loop': one jitted client step per active center, then the jitted server step."""
  active_host = np.asarray(active, bool)
  run = [k for k in range(active_host.size) if active_host[k]] or [0]
  done = {k: client_step(server_state, client_states, frozen, centers, key, round_index, k)
          for k in run}
  # Inactive centers' outputs are ignored by the server update: any same-shaped value does.
  outs = [done.get(k, done[run[0]]) for k in range(active_host.size)]
  return server_step(server_state, client_states, outs, centers.sizes, active)
