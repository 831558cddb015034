"""FedDyn (Acar et al., ICLR 2021) exactly as the authors' code runs it (docs/feddyn.md).

Client k keeps ``lambda_k`` (zero at start; ``lambda_k = -g_k / alpha`` in the
paper's notation). In a round it starts from the corrected server model
``theta_s`` and takes SGD steps on::

  g = clip_by_global_norm(grad[CE(p) + alpha_k <p, lambda_k - theta_s>], max_grad_norm)
  p <- p - lr * (g + (alpha_k + wd) * p)

(the ``alpha_k/2 |p|^2`` half of the quadratic is the weight decay ``alpha_k``, applied
after clipping), with ``alpha_k = alpha / w_k``, ``w_k = n_k / sum(n) * m``. Then
``lambda_k += theta_k - theta_s``. The server sets::

  active_mean = mean_{k active}(theta_k)          (unweighted)
  theta       = active_mean + mean_{ALL k}(lambda_k)

Inactive clients' stale ``lambda_k`` stay in the second mean; that is how the
paper's ``h`` works under partial participation (``mean(lambda) = -h / alpha``).
``eval_params`` returns both models: ``'server'`` (theta, the corrected model
clients start from) and ``'active_mean'`` (what the paper reports accuracy on).
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedblood.algorithms import base
from fedblood.algorithms import dp as dp_lib


class FedDynServerState(NamedTuple):
  """Attributes:
    params: theta, the corrected server model (clients start here).
    active_mean: plain mean of the last round's active clients' models.
  """
  params: Any
  active_mean: Any


class FedDynClientState(NamedTuple):
  """Attributes: lam, the client's lambda_k (sum of its past local moves theta_k - theta_s)."""
  lam: Any


def fed_dyn(lr: float, alpha: float, *, weight_decay: float = 0.0,
            max_grad_norm: Optional[float] = 10.0, lr_decay: float = 1.0,
            local_momentum: float = 0.0, dp: Optional[dp_lib.DpSgd] = None,
            rewrite: Optional[Callable] = None) -> base.FedAlgorithm:
  """FedDyn.

  Args:
    lr: local SGD learning rate (no momentum, as in the authors' code).
    alpha: the dynamic regulariser's strength; client k uses ``alpha / w_k``.
    weight_decay: ordinary weight decay on top of ``alpha_k`` (1e-3 in the paper's CIFAR runs).
    max_grad_norm: global-norm clipping of the regularised gradient (10 in the authors' code).
    lr_decay: round r's local lr is ``lr * lr_decay ** (r - 1)`` (the authors'
      ``lr_decay_per_round``; 1 in their CIFAR runs).
    local_momentum: heavy-ball momentum of the local SGD on the regularised objective, its
      buffer reset every round (0: plain SGD, the authors' code).
    dp: DP-SGD in the local step (``base.local_sgd``); the regulariser is added after the noise.
    rewrite: the local gradient's backend rewrite (``base.local_sgd``; default the platform's).
  """
  if alpha <= 0:
    raise ValueError(f'fl.alpha must be > 0 for fed_dyn, got {alpha}')
  local_momentum = base.check_momentum(local_momentum)

  def init(params, num_clients):
    params = base.copy_tree(params)
    lam = jax.tree.map(lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype), params)
    return FedDynServerState(params, base.copy_tree(params)), FedDynClientState(lam)

  def client_update(server_state, client_state, *, weight, loss_fn, batch_fn, num_steps, rng,
                    round_index=None):
    theta_s = server_state.params
    alpha_k = alpha / jnp.asarray(weight, jnp.float32)
    direction = optax.tree.sub(client_state.lam, theta_s)
    penalty_fn = lambda p: alpha_k * optax.tree.vdot(p, direction)
    local, metrics = base.local_sgd(theta_s, loss_fn, batch_fn, num_steps, rng,
                                    lr=base.round_lr(lr, lr_decay, round_index),
                                    max_grad_norm=max_grad_norm,
                                    weight_decay=alpha_k + weight_decay, penalty_fn=penalty_fn,
                                    dp=dp, rewrite=rewrite, momentum=local_momentum)
    lam = jax.tree.map(lambda l, t, s: l + (t - s), client_state.lam, local, theta_s)
    return base.ClientUpdate(local, FedDynClientState(lam), metrics)

  def server_update(server_state, client_states, *, local_params, new_client_states, weights,
                    active):
    del weights  # FedDyn averages unweighted; sizes enter through alpha_k
    client_states = base.select_clients(active, new_client_states, client_states)
    active = jnp.asarray(active, bool)
    active_mean, any_active = base.masked_mean(local_params, jnp.ones(active.shape), active)
    lam_mean, _ = base.masked_mean(client_states.lam, jnp.ones(active.shape),
                                   jnp.ones(active.shape, bool))
    theta = jax.tree.map(jnp.add, active_mean, lam_mean)
    new = base.keep_if(any_active, FedDynServerState(theta, active_mean), server_state)
    return new, client_states

  def eval_params(server_state):
    return {'server': server_state.params, 'active_mean': server_state.active_mean}

  return base.FedAlgorithm(init, client_update, server_update, eval_params)
