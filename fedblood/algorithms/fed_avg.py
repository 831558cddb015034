"""FedAvg (McMahan et al., AISTATS 2017) and FedProx (Li et al., MLSys 2020).

FedAvg: every client runs local SGD from the server model; the server moves to
the sample-weighted mean of the active clients' models, optionally through a
server optimizer (server lr / momentum: FedAvgM, Hsu et al. 2019).
FedProx is FedAvg with the proximal term ``mu/2 |p - theta_s|^2`` in the local
loss; ``mu = 0`` gives FedAvg's updates exactly.
"""

from typing import Callable, Optional

import optax

from fedblood.algorithms import base
from fedblood.algorithms import dp as dp_lib


def _build(lr: float, weight_decay: float, max_grad_norm: Optional[float], server_lr: float,
           server_momentum: float, mu: Optional[float], dp=None,
           rewrite: Optional[Callable] = None, lr_decay: float = 1.0,
           local_momentum: float = 0.0) -> base.FedAlgorithm:
  local_momentum = base.check_momentum(local_momentum)
  server_tx = optax.sgd(server_lr, momentum=server_momentum or None)

  def init(params, num_clients):
    del num_clients  # stateless clients
    params = base.copy_tree(params)
    return base.ServerState(params, server_tx.init(params)), ()

  def client_update(server_state, client_state, *, weight, loss_fn, batch_fn, num_steps, rng,
                    round_index=None):
    del weight  # FedAvg weighs clients only on the server
    theta_s = server_state.params
    penalty_fn = None
    if mu is not None:
      penalty_fn = lambda p: 0.5 * mu * optax.tree.norm(optax.tree.sub(p, theta_s), squared=True)
    local, metrics = base.local_sgd(theta_s, loss_fn, batch_fn, num_steps, rng,
                                    lr=base.round_lr(lr, lr_decay, round_index),
                                    max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                                    penalty_fn=penalty_fn, dp=dp, rewrite=rewrite,
                                    momentum=local_momentum)
    return base.ClientUpdate(local, client_state, metrics)

  def server_update(server_state, client_states, *, local_params, new_client_states, weights,
                    active):
    del new_client_states  # stateless clients
    return base.server_step(server_state, local_params, weights, active, server_tx), client_states

  def eval_params(server_state):
    return {'server': server_state.params}

  return base.FedAlgorithm(init, client_update, server_update, eval_params)


def fed_avg(lr: float, *, weight_decay: float = 0.0, max_grad_norm: Optional[float] = 10.0,
            server_lr: float = 1.0, server_momentum: float = 0.0, lr_decay: float = 1.0,
            local_momentum: float = 0.0, dp: Optional[dp_lib.DpSgd] = None,
            rewrite: Optional[Callable] = None) -> base.FedAlgorithm:
  """FedAvg with sample-weighted averaging.

  Args:
    lr: local SGD learning rate.
    weight_decay: local weight decay, added after clipping.
    max_grad_norm: local gradient clipping (global norm); None or 0 turns it off.
    server_lr: server learning rate on the averaged update (1.0: plain averaging).
    server_momentum: server heavy-ball momentum (0: none).
    lr_decay: round r's local lr is ``lr * lr_decay ** (r - 1)`` (``base.round_lr``).
    local_momentum: heavy-ball momentum of the local SGD, reset every round (0: plain SGD).
    dp: DP-SGD in the local step (``base.local_sgd``).
    rewrite: the local gradient's backend rewrite (``base.local_sgd``; default the platform's).
  """
  return _build(lr, weight_decay, max_grad_norm, server_lr, server_momentum, mu=None, dp=dp,
                rewrite=rewrite, lr_decay=lr_decay, local_momentum=local_momentum)


def fed_prox(lr: float, mu: float, *, weight_decay: float = 0.0,
             max_grad_norm: Optional[float] = 10.0, server_lr: float = 1.0,
             server_momentum: float = 0.0, lr_decay: float = 1.0,
             local_momentum: float = 0.0, dp: Optional[dp_lib.DpSgd] = None,
             rewrite: Optional[Callable] = None) -> base.FedAlgorithm:
  """FedProx: FedAvg plus ``mu/2 |p - theta_s|^2`` in each client's loss (see :func:`fed_avg`)."""
  if mu < 0:
    raise ValueError(f'fl.mu must be >= 0, got {mu}')
  return _build(lr, weight_decay, max_grad_norm, server_lr, server_momentum, mu=float(mu), dp=dp,
                rewrite=rewrite, lr_decay=lr_decay, local_momentum=local_momentum)
