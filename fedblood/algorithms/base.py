"""The federated-algorithm interface and the local SGD every algorithm shares.

An algorithm is a builder that closes over its hyper-parameters and returns a
:class:`FedAlgorithm`, a NamedTuple of pure functions over a pytree of
*trainable* parameters (any pytree, any differentiable loss: frozen parameters
never reach an algorithm). Per-client state is ONE pytree whose leaves carry a
leading client axis ``[C, ...]``; an algorithm without client state uses ``()``.

The four functions' contracts are the Protocols below (:class:`InitFn`, :class:`ClientUpdateFn`,
:class:`ServerUpdateFn`, :class:`EvalParamsFn`), in the style of optax's ``TransformInitFn``:

* ``init(params, num_clients) -> (server_state, client_states)``
* ``client_update(server_state, client_state, *, weight, loss_fn, batch_fn, num_steps, rng,
  round_index=None) -> ClientUpdate(local_params, client_state, metrics)``: one client's local
  training (``client_state`` without the client axis; ``vmap`` it for many clients).
* ``server_update(server_state, client_states, *, local_params, new_client_states, weights,
  active) -> (server_state, client_states)``: the round's end, over ALL ``C`` clients; inactive
  clients keep their states (the algorithm selects them itself).
* ``eval_params(server_state) -> {name: params}``: the models worth evaluating.

Local training is clipped SGD through optax, in FedDyn's order (docs/feddyn.md); heavy-ball
with ``momentum`` > 0 (``fl.local_momentum``), its buffer zero at every call, i.e. every round::

  g = clip_by_global_norm(grad(loss + penalty), max_grad_norm)
  params <- params - lr * (g + weight_decay * params)

The gradient goes through ``rewrite`` (a parameter of every builder and of :func:`local_sgd`),
per backend :func:`fedblood.backend.platform.gradient_rewrite` (on CPU
:func:`fedblood.backend.xla_cpu.fast_gradients`: inside the ``fori_loop`` XLA:CPU would otherwise
run the backward convolutions as naive loops; docs/performance.md). Algorithms differ only in
``penalty`` (e.g. FedProx's ``mu/2 |p - theta_s|^2``), ``weight_decay`` and their server rule.
"""

from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import optax

from fedblood.algorithms import dp as dp_lib
from fedblood.backend import platform

Params = Any  # a pytree of trainable parameters
State = Any   # a pytree; client states carry a leading client axis [C, ...] where stacked


class ClientUpdate(NamedTuple):
  """What one client's local training returns.

  Attributes:
    local_params: the client's model after its local steps.
    client_state: its new state (``()`` for algorithms without client state).
    metrics: ``{'loss', **aux}`` averaged over the real steps, and ``num_steps``.
  """
  local_params: Params
  client_state: State
  metrics: dict


class InitFn(Protocol):
  """``(params, num_clients) -> (server_state, client_states)``; client leaves ``[C, ...]``."""

  def __call__(self, params: Params, num_clients: int) -> tuple[State, State]:
    ...


class ClientUpdateFn(Protocol):
  """One client's local training from the server state.

  Args:
    server_state: the server's state (the model the client starts from, and more).
    client_state: this client's state, without the client axis.
    weight: the client's training size normalised to mean 1 over ALL clients,
      ``w_k = n_k / sum(n) * C`` (:func:`client_weights`); FedDyn derives
      ``alpha_k = alpha / w_k`` from it.
    loss_fn: ``(params, batch, rng) -> (loss, aux)``, ``aux`` a dict of scalars.
    batch_fn: ``step -> batch`` for ``step`` an int32 scalar in ``[0, num_steps)``.
    num_steps: int32 scalar, may be traced. Local training is a ``lax.fori_loop`` with this
      trip count: run alone a client takes exactly its own number of steps; under ``vmap``
      the loop runs to the largest count and the clients already done keep their carry
      (params, optimizer state, metric sums) untouched, i.e. their padded steps are no-ops.
    rng: the client's key for this round; step ``s`` uses ``fold_in(rng, s)``.
    round_index: the round (1-based; int32 scalar, may be traced): the local lr of round ``r``
      is ``lr * lr_decay ** (r - 1)`` (:func:`round_lr`). Only read with ``lr_decay != 1``.
  """

  def __call__(self, server_state: State, client_state: State, *, weight, loss_fn: Callable,
               batch_fn: Callable, num_steps, rng: jax.Array, round_index=None) -> ClientUpdate:
    ...


class ServerUpdateFn(Protocol):
  """The server's rule at the end of a round, over ALL ``C`` clients.

  Args:
    server_state: the server state the round started from.
    client_states: the clients' states before the round, stacked ``[C, ...]``.
    local_params: the clients' models after the round, stacked; inactive clients' entries
      are ignored whatever they hold (selected out with ``jnp.where``, never multiplied).
    new_client_states: the clients' states as their updates returned them, stacked; only
      active clients' entries are kept (:func:`select_clients`).
    weights: float ``[C]``, as :class:`ClientUpdateFn`'s ``weight``.
    active: bool ``[C]``, the clients that took part.

  Returns:
    ``(server_state, client_states)``: with no active client the server state is unchanged.
  """

  def __call__(self, server_state: State, client_states: State, *, local_params: Params,
               new_client_states: State, weights, active) -> tuple[State, State]:
    ...


class EvalParamsFn(Protocol):
  """``server_state -> {name: params}``; every algorithm has ``'server'``, the model clients
  start the next round from."""

  def __call__(self, server_state: State) -> dict:
    ...


class FedAlgorithm(NamedTuple):
  """A federated algorithm as pure functions (see the Protocols of its fields)."""
  init: InitFn
  client_update: ClientUpdateFn
  server_update: ServerUpdateFn
  eval_params: EvalParamsFn


class ServerState(NamedTuple):
  """Server state of algorithms that move the server model with an optimizer (FedAvg, FedProx).

  Attributes:
    params: the server model.
    opt_state: state of the server optimizer (empty for plain averaging).
  """
  params: Any
  opt_state: Any


def client_weights(sizes) -> jax.Array:
  """Training sizes ``[C]`` -> weights ``n_k / sum(n) * C`` (mean 1), as in FedDyn's code."""
  sizes = jnp.asarray(sizes, jnp.float32)
  return sizes / jnp.sum(sizes) * sizes.shape[0]


WEIGHTINGS = ('size', 'equal')  # fl.weighting


def copy_tree(tree):
  """Fresh buffers, so donating a state never deletes the caller's arrays."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def round_lr(lr: float, lr_decay: float, round_index):
  """Round ``round_index``'s local lr, ``lr * lr_decay ** (round_index - 1)`` (the
  ``lr_decay_per_round`` of FedDyn's and SCAFFOLD's authors' code); ``lr`` itself, unchanged,
  when ``lr_decay`` is 1. ``round_index`` may be traced: later rounds never recompile."""
  if lr_decay == 1.0:
    return lr
  if round_index is None:
    raise ValueError(f'lr_decay={lr_decay}: the local lr depends on the round, and '
                     'client_update was given no round_index')
  return lr * jnp.asarray(lr_decay, jnp.float32) ** (jnp.asarray(round_index, jnp.float32) - 1)


def local_tx(lr, max_grad_norm: Optional[float], weight_decay,
             momentum: float = 0.0) -> optax.GradientTransformation:
  """Clip, add ``weight_decay * params``, then SGD (FedDyn's order), heavy-ball at momentum > 0."""
  clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm else optax.identity()
  return optax.chain(clip, optax.add_decayed_weights(weight_decay),
                     optax.sgd(lr, momentum=momentum or None))


def check_momentum(momentum) -> float:
  """``fl.local_momentum`` as a float in [0, 1), else a ValueError naming it."""
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f'fl.local_momentum must be in [0, 1), got {momentum}')
  return float(momentum)


def gradient(objective: Callable, rewrite: Callable) -> Callable:
  """``rewrite(jax.grad(objective, has_aux=True))``: the gradient as local SGD takes it."""
  return rewrite(jax.grad(objective, has_aux=True))


def local_sgd(params, loss_fn, batch_fn, num_steps, rng, *, lr, max_grad_norm, weight_decay,
              penalty_fn: Optional[Callable] = None, dp: Optional[dp_lib.DpSgd] = None,
              rewrite: Optional[Callable] = None, momentum: float = 0.0):
  """Runs ``num_steps`` steps of clipped SGD on ``loss_fn + penalty_fn`` from ``params``.

  Args:
    params: starting point (trainable pytree).
    loss_fn: ``(params, batch, rng) -> (loss, aux)``.
    batch_fn: ``step -> batch``.
    num_steps: int32 scalar (may be traced).
    rng: key; step ``s`` draws ``fold_in(rng, s)``.
    lr, max_grad_norm, weight_decay: see :func:`local_tx` (``lr`` and ``weight_decay`` may be
      traced).
    penalty_fn: optional ``params -> scalar`` added to the loss before differentiation.
    dp: DP-SGD (:mod:`fedblood.algorithms.dp`): ``batch_fn(step)`` then returns a
      ``dp.PoissonSample``; the loss's gradient is the private one and ``penalty_fn``'s
      gradient (data-independent) is added after the noise.
    rewrite: ``grad_fn -> grad_fn`` applied to the gradient (and DP-SGD's clipped sums)
      before tracing; default :func:`fedblood.backend.platform.gradient_rewrite` of this backend.
    momentum: heavy-ball momentum of the local SGD (:func:`local_tx`; 0: plain SGD).

  Returns:
    ``(params, metrics)``, metrics ``{'loss', **aux}`` averaged over the steps taken
    (zero when none) and ``'num_steps'``.
  """
  tx = local_tx(lr, max_grad_norm, weight_decay, momentum)
  rewrite = platform.gradient_rewrite() if rewrite is None else rewrite

  def objective(p, batch, step_rng):
    loss, aux = loss_fn(p, batch, step_rng)
    total = loss if penalty_fn is None else loss + penalty_fn(p)
    return total, dict(loss=loss, **aux)

  if dp is None:
    grad_fn = gradient(objective, rewrite)
    probe = jax.eval_shape(lambda: objective(params, batch_fn(jnp.int32(0)), rng)[1])
  else:
    grad_fn = _dp_gradient(dp, loss_fn, penalty_fn, rewrite)
    probe = jax.eval_shape(lambda: grad_fn(params, batch_fn(jnp.int32(0)), rng)[1])
  sums = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), probe)

  def body(step, carry):
    p, opt_state, sums = carry
    grads, stats = grad_fn(p, batch_fn(step), jax.random.fold_in(rng, step))
    updates, opt_state = tx.update(grads, opt_state, p)
    sums = jax.tree.map(lambda s, x: s + x.astype(jnp.float32), sums, stats)
    return optax.apply_updates(p, updates), opt_state, sums

  num_steps = jnp.asarray(num_steps, jnp.int32)
  params, _, sums = jax.lax.fori_loop(0, num_steps, body, (params, tx.init(params), sums))
  metrics = jax.tree.map(lambda s: s / jnp.maximum(num_steps, 1), sums)
  metrics['num_steps'] = num_steps
  return params, metrics


def _dp_gradient(dp, loss_fn, penalty_fn, rewrite):
  """DP-SGD's ``(params, sample, rng) -> (grads, stats)``: private loss gradient + penalty's."""
  private = dp_lib.private_gradient(dp, loss_fn, rewrite)

  def grad_fn(p, sample, step_rng):
    grads, stats = private(p, sample, step_rng)
    if penalty_fn is not None:  # post-processing: the penalty never sees the data
      grads = jax.tree.map(jnp.add, grads, jax.grad(penalty_fn)(p))
    return grads, stats

  return grad_fn


def bcast(mask, x):
  """``mask [C]`` reshaped to broadcast against ``x [C, ...]`` (trailing axes of size 1)."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def select_clients(active, new, old):
  """Per client (leading axis), ``new`` where ``active`` else ``old``: inactive states stay put."""
  active = jnp.asarray(active, bool)
  return jax.tree.map(lambda n, o: jnp.where(bcast(active, n), n, o), new, old)


def masked_mean(stacked, weights, active):
  """``sum_k w_k x_k / sum_k w_k`` over active ``k`` of a pytree stacked on axis 0.

  Inactive entries are selected out (``jnp.where``), so NaNs there cannot leak.
  Returns ``(mean, any_active)``; the mean is zero when no client is active.
  """
  active = jnp.asarray(active, bool)
  w = jnp.where(active, jnp.asarray(weights, jnp.float32), 0.0)
  total = jnp.sum(w)
  safe_total = jnp.where(total > 0, total, 1.0)

  def mean(x):
    x = jnp.where(bcast(active, x), x, 0)
    return (jnp.tensordot(w, x, axes=1) / safe_total).astype(x.dtype)

  return jax.tree.map(mean, stacked), total > 0


def keep_if(cond, new, old):
  """``new`` where the scalar ``cond`` holds, else ``old`` (leafwise)."""
  return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


def server_step(state: ServerState, local_params, weights, active, server_tx) -> ServerState:
  """Moves the server model towards the weighted mean of the active clients' models.

  The pseudo-gradient ``params - mean_k(local_k)`` goes through ``server_tx``
  (``sgd(1.0)`` gives plain averaging; a momentum or lr != 1 gives FedAvgM / server lr).
  """
  mean, any_active = masked_mean(local_params, weights, active)
  pseudo_grad = jax.tree.map(jnp.subtract, state.params, mean)
  updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.params)
  new = ServerState(optax.apply_updates(state.params, updates), opt_state)
  return keep_if(any_active, new, state)
