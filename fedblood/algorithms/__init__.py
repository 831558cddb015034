"""Federated algorithms as pure functions (see :mod:`fedblood.algorithms.base` for the API).

Usage on any differentiable loss over any params pytree::

  alg = algorithms.fed_dyn(lr=0.05, alpha=0.1)
  server, clients = alg.init(params, num_clients=2)
  outs = [alg.client_update(server, jax.tree.map(lambda c: c[k], clients), weight=w[k],
                            loss_fn=loss_fn, batch_fn=lambda step: data[k], num_steps=50,
                            rng=jax.random.key(k))
          for k in range(2)]
  ...stack outs (base.ClientUpdate), then
  server, clients = alg.server_update(server, clients, local_params=..., new_client_states=...,
                                      weights=w, active=active)

or, with per-center arrays, :func:`fedblood.core.simulate.build_round`.

From a config, :func:`build` looks ``fl.algorithm`` up in :data:`BUILDERS`, whose entry reads
that algorithm's keys of ``fl`` by name (``fl.alpha`` -> ``fed_dyn(alpha=...)``).
"""

from typing import Callable, Optional

import jax.numpy as jnp

from fedblood.algorithms import base
from fedblood.algorithms import dp
from fedblood.algorithms import dp_fedavg
from fedblood.algorithms import swa
from fedblood.algorithms.base import ClientUpdate, FedAlgorithm, client_weights
from fedblood.algorithms.fed_avg import fed_avg, fed_prox
from fedblood.algorithms.fed_dyn import fed_dyn
from fedblood.algorithms.scaffold import scaffold

# optional keys of every algorithm's local step; SCAFFOLD's control variates divide a move by
# steps * lr, which holds for plain SGD only: it refuses fl.local_momentum
_LOCAL_SGD = ('weight_decay', 'max_grad_norm', 'lr_decay')
_LOCAL = _LOCAL_SGD + ('local_momentum',)
_SERVER = ('server_lr', 'server_momentum')  # optional keys of the FedAvg-type server rule


def _required(fl_cfg, key: str):
  if key not in fl_cfg:
    raise ValueError(f'fl.{key} is required by fl.algorithm={fl_cfg["algorithm"]!r} but missing '
                     'from the config')
  return fl_cfg[key]


def _given(fl_cfg, keys) -> dict:
  """The keys of ``fl_cfg`` among ``keys`` (the builder's defaults stand for the others)."""
  return {k: fl_cfg[k] for k in keys if k in fl_cfg}


def _unused(fl_cfg, defaults: dict, why: str) -> None:
  """Refuses a key set away from the value the algorithm runs with anyway (it would be ignored)."""
  for key, value in defaults.items():
    if key in fl_cfg and fl_cfg[key] != value:
      raise ValueError(f'config fl.{key}={fl_cfg[key]!r}: fl.algorithm={fl_cfg["algorithm"]!r} '
                       f'{why}; set fl.{key}={value!r}')


def _fed_dyn(fl_cfg, **backend) -> FedAlgorithm:
  _unused(fl_cfg, {'server_lr': 1.0, 'server_momentum': 0.0},
          "has no server step size (the authors' server sets the model, FEDDYN.md)")
  return fed_dyn(lr=_required(fl_cfg, 'lr'), alpha=_required(fl_cfg, 'alpha'),
                 **_given(fl_cfg, _LOCAL), **backend)


def _fed_avg(fl_cfg, **backend) -> FedAlgorithm:
  return fed_avg(lr=_required(fl_cfg, 'lr'), **_given(fl_cfg, _LOCAL + _SERVER), **backend)


def _fed_prox(fl_cfg, **backend) -> FedAlgorithm:
  return fed_prox(lr=_required(fl_cfg, 'lr'), mu=_required(fl_cfg, 'mu'),
                  **_given(fl_cfg, _LOCAL + _SERVER), **backend)


def _scaffold(fl_cfg, **backend) -> FedAlgorithm:
  _unused(fl_cfg, {'local_momentum': 0.0},
          "runs plain local SGD (its control variates divide a center's move by steps * lr)")
  return scaffold(lr=_required(fl_cfg, 'lr'), **_given(fl_cfg, _LOCAL_SGD + _SERVER), **backend)


# fl.algorithm -> the builder reading its keys of ``fl`` (``backend``: ``dp`` and ``rewrite``).
BUILDERS: dict = {'fed_dyn': _fed_dyn, 'fed_avg': _fed_avg, 'fed_prox': _fed_prox,
                  'scaffold': _scaffold}
NAMES = tuple(BUILDERS)


def equal_weights(algorithm: FedAlgorithm) -> FedAlgorithm:
  """``algorithm`` with every center weighted 1 whatever its size (``fl.weighting='equal'``).

  The algorithms receive ``w_k = n_k / sum(n) * C`` (:func:`base.client_weights`); this passes
  1 to both sides instead: the server averages the centers uniformly (FedAvg, FedProx, SCAFFOLD) and
  FedDyn's ``alpha_k = alpha / w_k`` becomes ``alpha`` at every center, so the federation
  minimises the mean of the centers' risks rather than the size-weighted one. Each center still
  makes its own number of local steps.
  """

  def client_update(server_state, client_state, *, weight, **local):
    return algorithm.client_update(server_state, client_state, weight=jnp.ones_like(weight),
                                   **local)

  def server_update(server_state, client_states, *, weights, **rest):
    return algorithm.server_update(server_state, client_states, weights=jnp.ones_like(weights),
                                   **rest)

  return algorithm._replace(client_update=client_update, server_update=server_update)


def build(fl_cfg, *, rewrite: Optional[Callable] = None) -> FedAlgorithm:
  """Builds the algorithm named by ``fl_cfg.algorithm`` (see :data:`BUILDERS`).

  Keys the algorithm does not use are ignored, so one config can sweep over algorithms.
  ``fl_cfg.weighting`` (optional): ``'size'`` (default, the authors' weights ``n_k / sum(n)``)
  or ``'equal'`` (:func:`equal_weights`).
  ``fl_cfg.dp`` (optional, :mod:`fedblood.algorithms.dp`): ``mode='example'`` passes DP-SGD to
  the local step, ``mode='client'`` wraps the algorithm in DP-FedAvg.
  ``fl_cfg.swa_start`` (optional, 0 = off): the server also averages its models over the rounds
  from that one on (:func:`fedblood.algorithms.swa.swa`; ``fl.eval_model='swa_active_mean'``).
  ``rewrite``: the local gradient's backend rewrite (default
  :func:`fedblood.backend.platform.gradient_rewrite`).
  """
  name = fl_cfg['algorithm']
  if name not in BUILDERS:
    raise ValueError(f'fl.algorithm must be one of {NAMES}, got {name!r}')
  weighting = fl_cfg['weighting'] if 'weighting' in fl_cfg else 'size'
  if weighting not in base.WEIGHTINGS:
    raise ValueError(f'fl.weighting must be one of {base.WEIGHTINGS}, got {weighting!r}')
  dp.check_config(fl_cfg)
  algorithm = BUILDERS[name](fl_cfg, dp=dp.from_config(fl_cfg), rewrite=rewrite)
  if weighting == 'equal':
    algorithm = equal_weights(algorithm)
  if 'dp' in fl_cfg and fl_cfg['dp']['mode'] == 'client':
    cfg = fl_cfg['dp']
    algorithm = dp_fedavg.client_level(algorithm, float(cfg['clip']),
                                       float(cfg['noise_multiplier']), int(cfg.get('seed', 0)))
  swa_start = fl_cfg['swa_start'] if 'swa_start' in fl_cfg else 0
  if swa_start:
    algorithm = swa.swa(algorithm, swa_start)
  return algorithm


__all__ = ['BUILDERS', 'ClientUpdate', 'FedAlgorithm', 'NAMES', 'build', 'client_weights',
           'fed_avg', 'fed_dyn', 'fed_prox', 'scaffold']
