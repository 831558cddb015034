"""K federated runs that differ only in their seed, as ONE program over a leading sweep axis.

A seed sweep trains the same model on the same centers K times; what differs is the
starting point (each seed's reference model), the round keys (batches, dropout,
augmentation) and the participation draws. :func:`build_sweep_round` maps
:func:`fedblood.core.simulate.build_round`'s round over a leading axis of those::

  round_fn = build_sweep_round(algorithm, loss_fn, batch_size=32, local_epochs=1)  # a Round
  servers, clients = stack([alg.init(trainable_i, C) for i in range(K)])   # leaves [K, ...]
  servers, clients, metrics = round_fn(servers, clients, frozen,           # frozen: [K, ...]
                                       centers, active, keys, round_index) # active [K, C], keys [K]

Point ``i`` of the result equals (to float rounding) ``simulate.build_round``'s round
run alone on ``servers[i], clients[i], frozen[i], active[i], keys[i]``: the same
function, batched by ``jax.vmap``. The centers' data is shared, not copied K times.
Batching changes float rounding (a convolution with K weight sets becomes a grouped
convolution), so runs agree to a tolerance, not bit for bit (tests/test_vectorized.py).

Executions: ``'vmap'`` and ``'unroll'`` vmap their whole jitted round over the sweep
axis. ``'loop'`` calls one jitted, sweep-vmapped client step per center that is
active in ANY point (a point's inactive centers are discarded exactly as in its own
run), then the sweep-vmapped server step. ``'auto'`` resolves like
:func:`fedblood.core.simulate.choose_execution` on one device ('shard' is not offered:
it already spends the devices on centers).

Only the seed is swept. Scalar hyper-parameters (``fl.alpha``, ``fl.lr``) are closed over
by the algorithm builders as Python floats, so sweeping them would need the builders to
take traced values; not done.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedblood.algorithms import base
from fedblood.core import executions, simulate

SWEEP_EXECUTIONS = ('auto', 'vmap', 'loop', 'unroll')


def stack(trees):
  """A list of K same-structured pytrees -> one pytree with leaves ``[K, ...]``."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, num: int) -> list:
  """The inverse of :func:`stack`: point ``i``'s pytree for ``i < num``."""
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(num)]


def build_sweep_round(algorithm: base.FedAlgorithm, loss_fn: Callable, *, batch_size: int,
                      local_epochs: int, execution: str = 'auto',
                      local_steps: int = 0) -> simulate.Round:
  """The :class:`fedblood.core.simulate.Round` of K sweep points (see the module docstring).

  Input states are donated. Its ``fn`` checks ``active`` (bool ``[K, C]``); for 'auto' its
  ``resolve(centers)`` is the Round it runs.

  Args:
    algorithm, loss_fn, batch_size, local_epochs, local_steps: as
      :func:`fedblood.core.simulate.build_round`.
    execution: 'auto', 'vmap', 'loop' or 'unroll'.
  """
  if execution not in SWEEP_EXECUTIONS:
    raise ValueError(f'fl.execution must be one of {SWEEP_EXECUTIONS} for a vectorized sweep, '
                     f'got {execution!r}')
  build = functools.partial(simulate.build_round, algorithm, loss_fn, batch_size=batch_size,
                            local_epochs=local_epochs, local_steps=local_steps, donate=False)
  built = {}

  def resolve(centers) -> simulate.Round:
    name = execution
    if name == 'auto':  # one device: the choice simulate makes for a single run
      name = simulate.choose_execution(centers.sizes, batch_size=batch_size,
                                       local_epochs=local_epochs, local_steps=local_steps,
                                       backend=jax.devices()[0].platform, num_devices=1)
    if name not in built:
      built[name] = _loop(build(execution='loop')) if name == 'loop' else _whole(
          build(execution=name))
    return built[name]

  def round_fn(server_states, client_states, frozen, centers, active, keys, round_index):
    simulate.check_centers(centers)
    active = np.asarray(active, bool)
    if active.ndim != 2 or active.shape[1] != np.shape(centers.sizes)[0]:
      raise ValueError(f'active must be bool [K, C={np.shape(centers.sizes)[0]}], got shape '
                       f'{active.shape}')
    return resolve(centers).fn(server_states, client_states, frozen, centers, active, keys,
                               round_index)

  return simulate.Round(round_fn, execution, resolve=resolve if execution == 'auto' else None)


def _whole(single: simulate.Round) -> simulate.Round:
  """The jitted single round, vmapped over the sweep axis (centers and round index shared)."""
  swept = jax.jit(jax.vmap(single.jitted, in_axes=(0, 0, 0, None, 0, 0, None)),
                  donate_argnums=(0, 1))
  fn = lambda s, c, frozen, centers, active, keys, r: swept(s, c, frozen, centers,
                                                            jnp.asarray(active), keys, r)
  return simulate.Round(fn, single.execution, jitted=swept)


def _loop(single: simulate.Round) -> simulate.Round:
  """The 'loop' round: per center, one client step vmapped over the sweep axis."""
  client_step = jax.jit(jax.vmap(single.client_step, in_axes=(0, 0, 0, None, 0, None, None)))
  server_step = jax.jit(jax.vmap(single.server_step, in_axes=(0, 0, 0, None, 0)),
                        donate_argnums=(0, 1))

  def loop_round(server_states, client_states, frozen, centers, active, keys, round_index):
    # The centers active in ANY point run; a point's inactive centers are discarded by its
    # server update (simulate.executions.loop_round's rule, per point).
    return executions.loop_round(server_states, client_states, frozen, centers,
                                 active.any(axis=0), keys, round_index,
                                 client_step=client_step,
                                 server_step=lambda s, c, outs, sizes, _: server_step(
                                     s, c, outs, sizes, jnp.asarray(active)))

  return simulate.Round(loop_round, 'loop', client_step=client_step, server_step=server_step)
