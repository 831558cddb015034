"""SCAFFOLD (Karimireddy et al., ICML 2020), option II control variates.

Client k starts from the server model x, takes K_k steps on its loss plus
``<c - c_k, p>`` (so each step follows ``grad f_k - c_k + c``, which cancels
client drift), then sets ``c_k <- c_k - c + (x - y_k) / (K_k lr)``. The server
model moves to the sample-weighted mean of the active clients' models through
the same server rule as FedAvg (so round one equals FedAvg), and the server
control is ``c = sum_k p_k c_k`` over ALL clients (``p_k = n_k / sum(n)``,
matching the sample-weighted objective; inactive clients keep their stale
``c_k``), which equals the paper's running update ``c += sum_{k active} p_k dc_k``.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedblood.algorithms import base
from fedblood.algorithms import dp as dp_lib


class ScaffoldServerState(NamedTuple):
  """Attributes: params (server model x), opt_state (server optimizer), control (c)."""
  params: Any
  opt_state: Any
  control: Any


def scaffold(lr: float, *, weight_decay: float = 0.0, max_grad_norm: Optional[float] = 10.0,
             server_lr: float = 1.0, server_momentum: float = 0.0, lr_decay: float = 1.0,
             dp: Optional[dp_lib.DpSgd] = None,
             rewrite: Optional[Callable] = None) -> base.FedAlgorithm:
  """SCAFFOLD; client state is the control variate ``c_k`` (args as :func:`fed_avg`).

  With ``dp`` (DP-SGD), the correction ``<c - c_k, p>`` is added after the noise. With
  ``lr_decay`` the control variate divides by the round's own lr.
  """
  server_tx = optax.sgd(server_lr, momentum=server_momentum or None)

  def init(params, num_clients):
    params = base.copy_tree(params)
    control = optax.tree.zeros_like(params)
    clients = jax.tree.map(lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype), params)
    return ScaffoldServerState(params, server_tx.init(params), control), clients

  def client_update(server_state, client_state, *, weight, loss_fn, batch_fn, num_steps, rng,
                    round_index=None):
    del weight
    lr_r = base.round_lr(lr, lr_decay, round_index)
    client_control = client_state
    x, c = server_state.params, server_state.control
    correction = optax.tree.sub(c, client_control)
    penalty_fn = lambda p: optax.tree.vdot(correction, p)
    y, metrics = base.local_sgd(x, loss_fn, batch_fn, num_steps, rng, lr=lr_r,
                                max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                                penalty_fn=penalty_fn, dp=dp, rewrite=rewrite)
    steps = jnp.maximum(metrics['num_steps'], 1).astype(jnp.float32)
    new_control = jax.tree.map(lambda ck, ci, xi, yi: ck - ci + (xi - yi) / (steps * lr_r),
                               client_control, c, x, y)
    new_control = base.keep_if(metrics['num_steps'] > 0, new_control, client_control)
    return base.ClientUpdate(y, new_control, metrics)

  def server_update(server_state, client_states, *, local_params, new_client_states, weights,
                    active):
    client_states = base.select_clients(active, new_client_states, client_states)
    moved = base.server_step(base.ServerState(server_state.params, server_state.opt_state),
                             local_params, weights, active, server_tx)
    everyone = jnp.ones(jnp.shape(active), bool)
    control, _ = base.masked_mean(client_states, weights, everyone)
    return ScaffoldServerState(moved.params, moved.opt_state, control), client_states

  def eval_params(server_state):
    return {'server': server_state.params}

  return base.FedAlgorithm(init, client_update, server_update, eval_params)
