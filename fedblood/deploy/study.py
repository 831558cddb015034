"""What the server and every site derive from the study's config alone, identically.

Both ends build the model, the algorithm, the trainable/frozen split and the state
templates from the same config, so a received tree can be checked against the
receiver's own template and a site's update is the simulation's to the bit.
"""

from typing import Any, NamedTuple

import jax
import ml_collections

from fedblood import data
from fedblood.algorithms import base
from fedblood.core import rounds
from fedblood.data import loader
from fedblood.study import experiment as experiment_lib


class Study(NamedTuple):
  """Attributes:
    config: the fedblood config.
    experiment: its :class:`fedblood.study.experiment.Experiment` (model, partition, loss, ...).
    algorithm: the :class:`fedblood.algorithms.FedAlgorithm` of ``config.fl``.
    centers: center names in the simulation's order (reference first): center ``k`` is
      client ``k`` everywhere (its weight, its key ``fold_in(fold_in(key, r), k)``).
    trainable: ShapeDtypeStructs of the trainable params.
    frozen: ShapeDtypeStructs of the frozen params.
    server: ShapeDtypeStructs of the server state.
    client: ShapeDtypeStructs of ONE client's state (no client axis).
  """
  config: Any
  experiment: experiment_lib.Experiment
  algorithm: base.FedAlgorithm
  centers: tuple
  trainable: Any
  frozen: Any
  server: Any
  client: Any

  @property
  def model(self):
    """The Flax module."""
    return self.experiment.model


def center_names(data_cfg) -> tuple:
  """The federation's centers, reference first, as the simulation orders them.

  Synthetic centers are known from the config; for real data the server has no images,
  so ``data.centers`` must name the sites' centers.
  """
  if data_cfg.source == 'synthetic':
    specs = loader.center_specs(data_cfg)
    return tuple(name for name, _ in specs)
  names = tuple(data_cfg.centers)
  if not names:
    raise ValueError('data.centers must list the sites\' center names for a deployed run '
                     f'(data.source={data_cfg.source!r}: the server holds no images to list)')
  reference = data_cfg.reference or names[0]
  if reference not in names:
    raise ValueError(f'data.reference={reference!r} is not one of data.centers {names}')
  return (reference,) + tuple(n for n in names if n != reference)


def build(config) -> Study:
  """The study's :class:`Study` from its config."""
  if config.fl.get('dp') is not None and config.fl.dp.mode == 'client':
    # DP-FedAvg adds its noise to the sum of the updates at the server, which would have to be
    # trusted with them; DP-SGD at each site (mode 'example') trusts no one.
    raise ValueError("fl.dp.mode='client' adds its noise at the server; a deployed run takes "
                     "fl.dp.mode='example' (DP-SGD at each site, fedblood.deploy.site_privacy) "
                     "or 'off'")
  exp = experiment_lib.build(config)
  algorithm = rounds.algorithm_of(rounds.spec(exp.loss, config.fl))
  trainable, frozen = exp.split(exp.shapes)
  names = center_names(config.data)
  server, clients = jax.eval_shape(lambda p: algorithm.init(p, len(names)), trainable)
  client = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), clients)
  return Study(config, exp, algorithm, names, trainable, frozen, server, client)


def rng(seed: int, round_index: int, k: int) -> jax.Array:
  """Center ``k``'s key for round ``round_index``: the simulation's ``fl_stage`` derivation."""
  fl_key = jax.random.fold_in(jax.random.key(seed), experiment_lib.STAGE['fl'])
  return jax.random.fold_in(jax.random.fold_in(fl_key, round_index), k)


def client_step(study: Study, dp_plan=None):
  """Jitted ``(server_state, client_state, weight, frozen, examples, size, rng) -> update``.

  ``examples``: the site's training split padded to the federation's ``Nmax`` by
  :func:`fedblood.core.simulate.pad_centers`, as the simulation pads every center's.
  ``dp_plan``: the site's :class:`fedblood.privacy.Plan` (its noise multiplier) under ``fl.dp``.
  """
  return rounds.compiled(rounds.spec(study.experiment.loss, study.config.fl, dp_plan),
                         'client')[1]


def server_step(study: Study):
  """The simulation's own jitted server step (``execution='loop'``) for this study.

  ``(server_state, client_states, outs, sizes, active) -> (server_state, client_states,
  metrics)``; ``outs``: one ``(local_params, client_state, metrics)`` per center.
  """
  return rounds.compiled(rounds.spec(study.experiment.loss, study.config.fl), 'server')[1]


def load_site_center(data_cfg, name: str, node_config: dict) -> data.Center:
  """The site's own center (of ``config.data``) through fedblood's loaders, at the site's data.

  ``node_config``: ``data-source`` (default the study's), ``data-root`` (the folder holding
  ``<center>/<class>/<images>``, or the named sets' download folder), ``cache-dir``.
  """
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.source = str(node_config.get('data-source', cfg.source))
  if 'data-root' in node_config:
    cfg.root = str(node_config['data-root'])
  if 'cache-dir' in node_config:
    cfg.cache_dir = str(node_config['cache-dir'])
  cfg.centers, cfg.reference = (name,), ''
  # The site's own scale normalisation only (the other sites' entries name no center here).
  cfg.crop = {name: data.crop_of(data_cfg, name)}
  if cfg.source not in ('synthetic', 'folder'):
    cfg.centers = ()  # a named public set is one center, named after the set
  (center,) = data.load_centers(cfg)
  if center.name != name:
    raise ValueError(f'the site\'s data holds center {center.name!r}, its node config says '
                     f'center={name!r}')
  return center
