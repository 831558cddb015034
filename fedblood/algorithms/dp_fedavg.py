"""DP-FedAvg (McMahan et al., ICLR 2018): client-level differential privacy around an algorithm.

``fl.dp.mode='client'``: :func:`client_level` clips each center's model update
``theta_k - theta_s`` to L2 norm ``clip``, adds ``N(0, (noise_multiplier * clip)^2 I)`` to their
sum and divides by the number of centers; the server's rule (and its optimizer) then runs on that
noisy mean. FedAvg and FedProx only (:func:`fedblood.algorithms.dp.check_config`): the servers of
FedDyn and SCAFFOLD also read client state (``lambda_k``, ``c_k``) that this noise does not cover.

A wrapper sits above what it wraps: this module imports :mod:`fedblood.algorithms.base`, which
knows nothing of it (DP-SGD's pieces, used inside the local step, sit below base in
:mod:`fedblood.algorithms.dp`).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedblood.algorithms import base


class ClientDpServerState(NamedTuple):
  """Attributes: inner (the wrapped algorithm's server state), key (noise key data)."""
  inner: Any
  key: Any


def client_level(algorithm: base.FedAlgorithm, clip: float, noise_multiplier: float,
                 seed: int = 0) -> base.FedAlgorithm:
  """DP-FedAvg around a FedAvg-type ``algorithm`` (see the module docstring).

  The server state becomes :class:`ClientDpServerState`; the noise key advances once per
  server update, so a resumed run draws the noise of an uninterrupted one. Every center is
  assumed to take part in every round (the noisy sum is divided by the number of centers).
  """

  def init(params, num_clients):
    server, clients = algorithm.init(params, num_clients)
    return ClientDpServerState(server, jax.random.key_data(jax.random.key(seed))), clients

  def client_update(server_state, client_state, **local):
    return algorithm.client_update(server_state.inner, client_state, **local)

  def server_update(server_state, client_states, *, local_params, new_client_states, weights,
                    active):
    theta = algorithm.eval_params(server_state.inner)['server']
    active = jnp.asarray(active, bool)
    num = active.shape[0]
    key, noise_key = jax.random.split(jax.random.wrap_key_data(server_state.key))
    noisy = _noisy_mean(theta, local_params, active, clip, noise_multiplier, noise_key)
    noisy = jax.tree.map(lambda t, m: jnp.broadcast_to(t + m, (num,) + t.shape), theta, noisy)
    inner, client_states = algorithm.server_update(
        server_state.inner, client_states, local_params=noisy, new_client_states=new_client_states,
        weights=weights, active=active)
    return ClientDpServerState(inner, jax.random.key_data(key)), client_states

  def eval_params(server_state):
    return algorithm.eval_params(server_state.inner)

  return base.FedAlgorithm(init, client_update, server_update, eval_params)


def _noisy_mean(theta, local_params, active, clip, noise_multiplier, noise_key):
  """``(sum_k clip(theta_k - theta) + N(0, (sigma clip)^2 I)) / C`` over the active ``k``."""
  num = active.shape[0]
  deltas = jax.tree.map(lambda l, t: l - t[None], local_params, theta)
  norms = jax.vmap(optax.tree.norm)(deltas)
  factor = jnp.where(active, clip / jnp.maximum(norms, clip), 0.0)
  total = jax.tree.map(lambda d: jnp.tensordot(factor.astype(d.dtype),
                                               jnp.where(base.bcast(active, d), d, 0), 1),
                       deltas)
  leaves, tree = jax.tree.flatten(total)
  keys = jax.random.split(noise_key, len(leaves))
  mean = [(s + noise_multiplier * clip * jax.random.normal(k, s.shape, s.dtype)) / num
          for s, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, mean)
