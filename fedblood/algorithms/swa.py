"""Weight averaging over rounds on the server (``fl.swa_start``), around any algorithm.

Stochastic weight averaging (Izmailov et al., UAI 2018) averages the models an optimiser passes
through late in training; averaged densely it finds flatter optima that generalise better to
domains never seen in training (SWAD, Cha et al., NeurIPS 2021), and in federated learning the
server's models over rounds (Caldarola et al., ECCV 2022). Here the server keeps, next to the
wrapped algorithm's state, the running mean of each model it evaluates over the rounds from
``start`` on::

  swa_<name> = mean(model_<name> after round r, for r = start .. the current round)

(before ``start`` it is the current model itself). Training is untouched: clients start each
round from the wrapped algorithm's model exactly as without the average, so every other model
of a run is the same with or without it. ``eval_params`` returns the wrapped models and the
averages as ``swa_server`` / ``swa_active_mean``; ``fl.eval_model='swa_active_mean'`` (or
``swa_server``) evaluates, selects and reports the average.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedblood.algorithms import base

PREFIX = 'swa_'


class SwaServerState(NamedTuple):
  """Attributes:
    inner: the wrapped algorithm's server state.
    average: ``{name: params}``: each evaluated model's mean over the rounds from ``start``.
    rounds: int32, the rounds completed.
  """
  inner: Any
  average: Any
  rounds: Any


def swa(algorithm: base.FedAlgorithm, start: int) -> base.FedAlgorithm:
  """``algorithm`` whose server also averages its evaluated models over rounds ``>= start``."""
  if isinstance(start, bool) or not isinstance(start, int) or start < 1:
    raise ValueError(f'fl.swa_start must be a round >= 1 (0 turns averaging off), got {start!r}')

  def init(params, num_clients):
    server, clients = algorithm.init(params, num_clients)
    average = base.copy_tree(algorithm.eval_params(server))
    return SwaServerState(server, average, jnp.zeros((), jnp.int32)), clients

  def client_update(server_state, client_state, **local):
    return algorithm.client_update(server_state.inner, client_state, **local)

  def server_update(server_state, client_states, **round_outputs):
    inner, client_states = algorithm.server_update(server_state.inner, client_states,
                                                   **round_outputs)
    r = server_state.rounds + 1
    count = jnp.maximum(r - start + 1, 1).astype(jnp.float32)  # models averaged after round r
    current = algorithm.eval_params(inner)
    average = jax.tree.map(lambda a, x: jnp.where(r >= start, a + (x - a) / count, x),
                           server_state.average, current)
    return SwaServerState(inner, average, r), client_states

  def eval_params(server_state):
    return {**algorithm.eval_params(server_state.inner),
            **{PREFIX + name: p for name, p in server_state.average.items()}}

  return base.FedAlgorithm(init, client_update, server_update, eval_params)
