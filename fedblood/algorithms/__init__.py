"""Federated algorithms as pure functions (see :mod:`fedblood.algorithms.base` for the API).

Usage on any differentiable loss over any params pytree::

  alg = algorithms.fed_dyn(lr=0.05, alpha=0.1)
  server, clients = alg.init(params, num_clients=2)
  outs = [alg.client_update(server, jax.tree.map(lambda c: c[k], clients), w[k], loss_fn,
                            lambda step: data[k], num_steps=50, rng=jax.random.key(k))
          for k in range(2)]
  ...stack outs, then alg.server_update(server, local_params, w, active, new_clients)

or, with per-center arrays, :func:`fedblood.simulate.build_round`.
"""

import inspect

from fedblood.algorithms import dp
from fedblood.algorithms.base import FedAlgorithm, client_weights
from fedblood.algorithms.fed_avg import fed_avg, fed_prox
from fedblood.algorithms.fed_dyn import fed_dyn
from fedblood.algorithms.scaffold import scaffold

NAMES = ('fed_dyn', 'fed_avg', 'fed_prox', 'scaffold')


def build(fl_cfg) -> FedAlgorithm:
  """Builds the algorithm named by ``fl_cfg.algorithm``.

  The builder's arguments are read from ``fl_cfg`` by name (``lr``, ``alpha``, ``mu``,
  ``weight_decay``, ``max_grad_norm``, ``server_lr``, ``server_momentum``); keys the
  algorithm does not use are ignored, so one config can sweep over algorithms.
  ``fl_cfg.dp`` (optional, :mod:`fedblood.algorithms.dp`): ``mode='example'`` passes DP-SGD to
  the local step, ``mode='client'`` wraps the algorithm in DP-FedAvg.
  """
  name = fl_cfg['algorithm']
  if name not in NAMES:
    raise ValueError(f'fl.algorithm must be one of {NAMES}, got {name!r}')
  builder = globals()[name]
  dp.check_config(fl_cfg)
  kwargs = {}
  for arg in inspect.signature(builder).parameters.values():
    if arg.name == 'dp':
      kwargs['dp'] = dp.from_config(fl_cfg)
    elif arg.name in fl_cfg:
      kwargs[arg.name] = fl_cfg[arg.name]
    elif arg.default is inspect.Parameter.empty:
      raise ValueError(f'fl.{arg.name} is required by fl.algorithm={name!r} but missing from '
                       'the config')
  algorithm = builder(**kwargs)
  if 'dp' in fl_cfg and fl_cfg['dp']['mode'] == 'client':
    cfg = fl_cfg['dp']
    algorithm = dp.client_level(algorithm, float(cfg['clip']), float(cfg['noise_multiplier']),
                                int(cfg.get('seed', 0)))
  return algorithm


__all__ = ['FedAlgorithm', 'build', 'client_weights', 'fed_avg', 'fed_dyn', 'fed_prox', 'scaffold',
           'NAMES']
