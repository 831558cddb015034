"""What the server and every site derive from the study's config alone, identically.

Both ends build the model, the algorithm, the trainable/frozen split and the state
templates from the same config, so a received tree can be checked against the
receiver's own template and a site's update is the simulation's to the bit.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedblood import algorithms, data, simulate
from fedblood import experiment as experiment_lib
from fedblood.stages import fl as fl_lib
from fedblood.algorithms import base
from fedblood.data import loader


class Study(NamedTuple):
  """Attributes:
    config: the fedblood config.
    experiment: its :class:`fedblood.experiment.Experiment` (model, partition, loss, ...).
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
    specs = loader._center_specs(data_cfg)  # pylint: disable=protected-access
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
  if config.fl.get('dp') is not None and config.fl.dp.mode != 'off':
    # The sites would need the server's calibrated noise and the report the accountant's
    # epsilon; neither travels over the wire yet.
    raise ValueError(f'fl.dp.mode={config.fl.dp.mode!r}: differential privacy runs in the '
                     'simulation only; a deployed run needs fl.dp.mode=\'off\'')
  exp = experiment_lib.build(config)
  algorithm = algorithms.build(config.fl)
  trainable, frozen = exp.split(exp.shapes)
  names = center_names(config.data)
  server, clients = jax.eval_shape(lambda p: algorithm.init(p, len(names)), trainable)
  client = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), clients)
  return Study(config, exp, algorithm, names, trainable, frozen, server, client)


def rng(config, round_index: int, k: int) -> jax.Array:
  """Center ``k``'s key for round ``round_index``: the simulation's ``fl_stage`` derivation."""
  fl_key = jax.random.fold_in(jax.random.key(config.seed), experiment_lib.STAGE['fl'])
  return jax.random.fold_in(jax.random.fold_in(fl_key, round_index), k)


def client_step(study: Study):
  """Jitted ``(server_state, client_state, weight, frozen, examples, size, rng) -> update``.

  ``examples``: the site's training split padded to the federation's ``Nmax``
  (leaves ``[1, Nmax, ...]``), as :func:`fedblood.stages.fl.stack_centers` pads it.
  """
  return _client_step(study.experiment.loss, fl_lib.round_settings(study.config.fl))


@functools.lru_cache(maxsize=4)
def _client_step(loss, settings: ml_collections.FrozenConfigDict):
  fl = settings.as_configdict()
  client = simulate.client_fn(algorithms.build(fl), loss, batch_size=fl.batch_size,
                              local_epochs=fl.local_epochs)

  @jax.jit
  def step(server_state, client_state, weight, frozen, examples, size, rng_key):
    return client(server_state, client_state, weight, frozen, examples, 0, size, rng_key)

  return step


def server_step(study: Study):
  """The simulation's own jitted server step (``execution='loop'``) for this study.

  ``(server_state, client_states, outs, sizes, active) -> (server_state, client_states,
  metrics)``; ``outs``: one ``(local_params, client_state, metrics)`` per center.
  """
  return simulate.build_round(study.algorithm, study.experiment.loss,
                              batch_size=study.config.fl.batch_size,
                              local_epochs=study.config.fl.local_epochs,
                              execution='loop').server_step


def padded_examples(split, nmax: int) -> dict:
  """A training split as the round's ``examples`` of one center: ``[1, nmax, ...]``."""
  n = len(split.labels)
  if n > nmax:
    raise ValueError(f'the center has {n} training images, more than the federation\'s Nmax={nmax}')

  def pad(x):
    return jnp.asarray(np.concatenate([x, np.zeros((nmax - n,) + x.shape[1:], x.dtype)])[None])

  return {'image': pad(split.images), 'label': pad(split.labels.astype('int32'))}


def load_site_center(config, name: str, node_config: dict) -> data.Center:
  """The site's own center through fedblood's loaders, with the site's data location.

  ``node_config``: ``data-source`` (default the study's), ``data-root`` (the folder holding
  ``<center>/<class>/<images>``, or the named sets' download folder), ``cache-dir``.
  """
  cfg = ml_collections.ConfigDict(config.data.to_dict())
  cfg.source = str(node_config.get('data-source', cfg.source))
  if 'data-root' in node_config:
    cfg.root = str(node_config['data-root'])
  if 'cache-dir' in node_config:
    cfg.cache_dir = str(node_config['cache-dir'])
  cfg.centers, cfg.reference = (name,), ''
  # The site's own scale normalisation only (the other sites' entries name no center here).
  cfg.crop = {name: data.crop_of(config.data, name)}
  if cfg.source not in ('synthetic', 'folder'):
    cfg.centers = ()  # a named public set is one center, named after the set
  (center,) = data.load_centers(cfg)
  if center.name != name:
    raise ValueError(f'the site\'s data holds center {center.name!r}, its node config says '
                     f'center={name!r}')
  return center
