"""One federated round over all centers, jitted, with the data kept on the device.

API (stable: the pipeline codes against it)::

  centers = Centers(examples={'image': uint8[C, Nmax, H, W, 3], 'label': int32[C, Nmax]},
                    sizes=int32[C])                       # real examples per center; rest padding
  loss_fn = classifier.classifier_loss(model)  # (trainable, frozen, batch, rng) -> (loss, aux)
  alg, round_fn = build(config.fl, loss_fn)               # or algorithms.build + build_round
  server_state, client_states = alg.init(trainable, num_clients=C)
  for r in range(rounds):
    server_state, client_states, metrics = round_fn(
        server_state, client_states, frozen, centers, active, key, r)
    models = alg.eval_params(server_state)    # {'server': ...} (+ FedDyn's 'active_mean')

* ``round_fn`` is a :class:`Round` (its ``fn``, its execution and its jitted parts):
  ``(server_state, client_states, frozen, centers, active, key, round_index)
  -> (server_state, client_states, metrics)``. ``frozen`` is an argument (never a
  baked constant); algorithms see only ``trainable``. ``active``: bool[C] (inactive
  centers' states are returned unchanged). ``key``: the run's base key; center k
  draws from ``fold_in(fold_in(key, round_index), k)``, so a checkpoint needs only
  the round number. ``round_index`` is traced: later rounds never recompile.
  ``metrics``: dict of [C] arrays: ``loss`` and the loss's aux (e.g. ``accuracy``) averaged
  over each center's local steps, and ``num_steps`` (int32); zero for inactive centers.
  With ``donate=True`` (default) the server and client states passed in are consumed.
* Center k runs exactly ``local_epochs * ceil(n_k / batch_size)`` steps over batches of
  :mod:`fedblood.core.batches` (``fl.local_steps`` > 0: that many whatever its size, none if empty).
* ``execution`` (identical results up to float rounding, see tests), each a function of
  :mod:`fedblood.core.executions`: ``'vmap'`` (:func:`vmap_round`) vmaps the local update over
  centers (centers short of the longest one's steps are masked no-ops); ``'loop'``
  (:func:`loop_round`) calls one jitted client step per active center (each runs exactly its
  own steps; inactive centers are skipped), then a jitted server step; ``'unroll'``
  (:func:`unroll_round`) is the same loop unrolled inside one jit; ``'shard'``
  (:func:`shard_round`) splits the center axis over devices (``shard_map``, vmap on each
  device; the center axis is padded with empty centers to a multiple of the device count,
  which copies the data each round unless it divides evenly); ``'auto'`` (the default of
  :func:`build`) picks one of these at each call from the backend, the device count and the
  centers' step counts (:func:`choose_execution`).
  Their measured speeds: docs/performance.md.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedblood import algorithms
from fedblood.algorithms import base
from fedblood.algorithms import dp as dp_lib
from fedblood.core import batches, executions

EXECUTIONS = ('auto', 'vmap', 'loop', 'unroll', 'shard')


class Centers(NamedTuple):
  """Per-center training data, padded to a common length Nmax.

  Attributes:
    examples: dict of arrays ``[C, Nmax, ...]`` (e.g. ``image``, ``label``).
    sizes: int32 ``[C]``, each center's number of real examples (the first ``n_k`` rows).
  """
  examples: dict
  sizes: Any


def pad_centers(splits, nmax: Optional[int] = None, num_classes: int = 0) -> Centers:
  """:class:`Centers` of training splits (``images``, ``labels``), each padded to ``nmax``.

  ``nmax`` defaults to the longest split. The simulation pads every center's split; a deployed
  site pads its own one to the federation's ``Nmax`` with this same function, so both see the
  same ``[C, Nmax, ...]`` rows (``C = 1`` at a site). ``num_classes > 0`` adds ``log_prior``,
  float32 ``[C, Nmax, K]``: on every row its own center's class log-frequencies in its training
  split, add-one smoothed (``log((n_kc + 1) / (n_k + K))``), for ``fl.logit_adjust``; a site
  computes its own from its own labels.
  """
  sizes = [len(s.labels) for s in splits]
  nmax = max(sizes) if nmax is None else nmax
  if max(sizes) > nmax:
    raise ValueError(f'a center has {max(sizes)} training images, more than the federation\'s '
                     f'Nmax={nmax}')

  def pad(x):
    return np.concatenate([x, np.zeros((nmax - len(x),) + x.shape[1:], x.dtype)])

  examples = {'image': jnp.asarray(np.stack([pad(s.images) for s in splits])),
              'label': jnp.asarray(np.stack([pad(s.labels.astype(np.int32)) for s in splits]))}
  if num_classes:
    counts = np.stack([np.bincount(s.labels, minlength=num_classes) for s in splits])
    if counts.shape[1] != num_classes:
      raise ValueError(f'a training split has a label >= num_classes={num_classes}')
    log_prior = np.log((counts + 1) / (counts.sum(1, keepdims=True) + num_classes))
    examples['log_prior'] = jnp.asarray(
        np.broadcast_to(log_prior[:, None], (len(splits), nmax, num_classes)), jnp.float32)
  return Centers(examples=examples, sizes=jnp.asarray(sizes, jnp.int32))


def check_centers(centers: Centers):
  """Raises ValueError on ``centers`` the round cannot run, naming the entry."""
  if not isinstance(centers.examples, dict) or not centers.examples:
    raise ValueError('Centers.examples must be a non-empty dict of [C, Nmax, ...] arrays, got '
                     f'{type(centers.examples).__name__}')
  if 'mask' in centers.examples:
    raise ValueError("Centers.examples may not have a 'mask' entry: the round adds it to batches")
  num = np.shape(centers.sizes)
  for name, x in centers.examples.items():
    if np.ndim(x) < 2 or (np.shape(x)[0],) != num:
      raise ValueError(f'Centers.examples[{name!r}] has shape {np.shape(x)}; expected '
                       f'[C={num[0] if num else "?"}, Nmax, ...] to match Centers.sizes {num}')


def choose_execution(sizes, *, batch_size: int, local_epochs: int, backend: str,
                     num_devices: int = 1, local_steps: int = 0) -> str:
  """The execution ``'auto'`` runs for centers of ``sizes`` on ``num_devices`` of ``backend``.

  * CPU: ``'loop'``. As fast as 'unroll', which compiles C client programs instead of one,
    and faster than 'vmap' (measured: docs/performance.md); 'shard' needs forced host
    devices, and that process's 'loop' was slower still.
  * GPU/TPU with several devices: ``'shard'`` when ``ceil(C / devices) * max_k s_k`` (each
    device runs its centers in lock-step to the longest one) is at most 3/4 of ``sum_k s_k``
    (one device running every center in turn), else ``'loop'``; the margin covers vmap's
    grouped convolutions when a device holds several centers.
  * one GPU/TPU: ``'loop'``. One paper-scale center step (batch 64 of 224 px, ~3 TFLOP)
    fills the device by itself, so 'vmap' could only add its padded no-op steps (40% of its
    work with the study's center sizes). On an H200 (bench/gpu_round.py): 'vmap' ran 0.53x
    'loop' at paper scale.

  Args:
    sizes: each center's number of training examples.
    batch_size, local_epochs, local_steps: as in :func:`build_round`.
    backend: the devices' platform (``'cpu'``, ``'gpu'``, ``'cuda'``, ``'tpu'``...).
    num_devices: devices the round may use.
  """
  steps = batches.local_steps(sizes, batch_size, local_epochs, local_steps)
  if backend == 'cpu' or num_devices < 2:
    return 'loop'
  per_device = batches.ceil_div(len(steps), num_devices)
  return 'shard' if 4 * per_device * max(steps) <= 3 * sum(steps) else 'loop'


class Round(NamedTuple):
  """A built round. Calling it calls ``fn``.

  Attributes:
    fn: ``(server_state, client_states, frozen, centers, active, key, round_index)
      -> (server_state, client_states, metrics)`` (see the module docstring).
    execution: 'vmap', 'loop', 'unroll', 'shard', or 'auto' (then see ``resolve``).
    jitted: 'vmap', 'unroll', 'shard': the jitted whole round (``fn`` without its checks).
    client_step: 'loop': jitted ``(server_state, client_states, frozen, centers, key,
      round_index, k) -> base.ClientUpdate`` of center ``k``.
    server_step: 'loop': jitted ``(server_state, client_states, outs, sizes, active)
      -> (server_state, client_states, metrics)``; ``outs`` one ClientUpdate per center.
    resolve: 'auto': ``centers -> Round``, the round it runs for those centers (each execution
      built once, :func:`choose_execution`).
  """
  fn: Callable
  execution: str
  jitted: Optional[Callable] = None
  client_step: Optional[Callable] = None
  server_step: Optional[Callable] = None
  resolve: Optional[Callable] = None

  def __call__(self, *args):
    return self.fn(*args)

  def resolved(self, centers: Centers) -> 'Round':
    """The Round that runs for ``centers``: this one, or the one 'auto' chooses for them."""
    return self if self.resolve is None else self.resolve(centers)


def _auto_round(build_fn: Callable, devices: Optional[Sequence[Any]], steps: dict) -> Round:
  """The 'auto' :class:`Round`: resolves its execution at each call from the centers' sizes."""
  built = {}

  def resolve(centers: Centers) -> Round:
    devs = list(devices) if devices is not None else jax.devices()
    name = choose_execution(centers.sizes, backend=devs[0].platform, num_devices=len(devs),
                            **steps)
    if name not in built:  # one build (hence one compile) per execution ever chosen
      built[name] = build_fn(execution=name)
    return built[name]

  def round_fn(server_state, client_states, frozen, centers, active, key, round_index):
    check_centers(centers)
    return resolve(centers).fn(server_state, client_states, frozen, centers, active, key,
                               round_index)

  return Round(round_fn, 'auto', resolve=resolve)


def client_fn(algorithm: base.FedAlgorithm, loss_fn: Callable, *, batch_size: int,
              local_epochs: int, dp: Optional[dp_lib.DpSgd] = None,
              local_steps: int = 0) -> Callable:
  """One center's local update exactly as every execution of the round runs it.

  ``client(server_state, client_state, weight, frozen, examples, center, size, rng,
  round_index) -> base.ClientUpdate``: center ``center`` of ``examples`` (leaves
  ``[C, Nmax, ...]``), its ``size`` real examples, its key for the round
  (``fold_in(fold_in(key, round), k)``), the round (the local lr's, ``fl.lr_decay``).
  A deployed site (:mod:`fedblood.deploy`) calls it on its own data padded to the
  federation's ``Nmax``, so the batches, and hence the update, are the simulation's. With
  ``dp`` (DP-SGD) the batches are Poisson samples (:func:`fedblood.core.batches.make_poisson_fn`).
  """
  batches.check_steps(batch_size, local_epochs, local_steps)

  def client(server_state, client_state, weight, frozen, examples, center, size, rng,
             round_index):
    perm_rng, step_rng = jax.random.split(rng)
    if dp is None:
      batch_fn = batches.make_batch_fn(examples, center, size, perm_rng, batch_size,
                                       local_epochs, local_steps)
    else:
      batch_fn = batches.make_poisson_fn(examples, center, size, perm_rng, batch_size,
                                         dp.microbatch)
    local_loss = lambda p, batch, r: loss_fn(p, frozen, batch, r)
    steps = batches.num_steps(size, batch_size, local_epochs, local_steps)
    return algorithm.client_update(server_state, client_state, weight=weight, loss_fn=local_loss,
                                   batch_fn=batch_fn, num_steps=steps, rng=step_rng,
                                   round_index=round_index)

  return client


def _checked(jitted: Callable) -> Callable:
  """``jitted`` behind the host-side check of its ``centers`` (clear errors before tracing)."""
  def round_fn(server_state, client_states, frozen, centers, active, key, round_index):
    check_centers(centers)
    return jitted(server_state, client_states, frozen, centers, active, key, round_index)
  return round_fn


def build_round(algorithm: base.FedAlgorithm, loss_fn: Callable, *, batch_size: int,
                local_epochs: int, execution: str = 'vmap', donate: bool = True,
                devices: Optional[Sequence[Any]] = None, dp: Optional[dp_lib.DpSgd] = None,
                compiler_options: Optional[dict] = None, local_steps: int = 0) -> Round:
  """Builds the :class:`Round` (see the module docstring).

  Args:
    algorithm: a :class:`fedblood.algorithms.FedAlgorithm`.
    loss_fn: ``(trainable, frozen, batch, rng) -> (loss, aux)``; ``batch`` holds the
      examples' entries for the step plus ``'mask'``.
    batch_size: local batch size.
    local_epochs: passes over its data each center makes per round.
    execution: 'auto', 'vmap', 'loop', 'unroll' or 'shard' (see the module docstring).
    donate: let XLA reuse the input states' buffers for the outputs.
    devices: devices of the 'shard' mesh (default: all).
    dp: DP-SGD (the ``dp`` the algorithm was built with): batches become Poisson samples
      (:func:`fedblood.core.batches.make_poisson_fn`); a center still takes
      ``local_epochs * ceil(n_k / B)`` steps (or ``local_steps``).
    compiler_options: XLA options every jitted part is compiled with (``jax.jit``'s
      ``compiler_options``; default none beyond the process's XLA_FLAGS, see
      :mod:`fedblood.backend.platform`).
    local_steps: > 0: each center's steps a round, whatever its size (0: ``local_epochs``).
  """
  if execution not in EXECUTIONS:
    raise ValueError(f'fl.execution must be one of {EXECUTIONS}, got {execution!r}')
  batches.check_steps(batch_size, local_epochs, local_steps)
  steps = dict(batch_size=batch_size, local_epochs=local_epochs, local_steps=local_steps)
  if execution == 'auto':
    build_fn = functools.partial(build_round, algorithm, loss_fn, donate=donate, devices=devices,
                                 dp=dp, compiler_options=compiler_options, **steps)
    return _auto_round(build_fn, devices, steps)
  jit = functools.partial(jax.jit, compiler_options=compiler_options)
  donated = (0, 1) if donate else ()
  client = client_fn(algorithm, loss_fn, dp=dp, **steps)
  if execution == 'loop':
    client_step = jit(functools.partial(executions.loop_client_step, client=client))
    server_step = jit(functools.partial(executions.loop_server_step, algorithm=algorithm),
                      donate_argnums=donated)
    fn = _checked(functools.partial(executions.loop_round, client_step=client_step,
                                    server_step=server_step))
    return Round(fn, execution, client_step=client_step, server_step=server_step)
  body = dict(vmap=executions.vmap_round, unroll=executions.unroll_round,
              shard=functools.partial(executions.shard_round, devices=devices))[execution]
  jitted = jit(functools.partial(body, algorithm=algorithm, client=client),
               donate_argnums=donated)
  return Round(_checked(jitted), execution, jitted=jitted)


def build(fl_cfg, loss_fn: Callable, *, rewrite: Optional[Callable] = None,
          **kwargs) -> tuple[base.FedAlgorithm, Round]:
  """``(algorithm, round)`` from ``config.fl``: algorithm, batch_size, local_epochs (or _steps),
  execution.

  ``fl.execution`` defaults to ``'auto'`` (see :func:`choose_execution`). ``rewrite``: the
  algorithm's gradient rewrite (:func:`fedblood.algorithms.build`); ``kwargs`` go to
  :func:`build_round` (``donate``, ``devices``, ``compiler_options``).
  """
  for key in ('batch_size', 'local_epochs'):
    if key not in fl_cfg:
      raise ValueError(f'fl.{key} is missing from the config')
  algorithm = algorithms.build(fl_cfg, rewrite=rewrite)
  execution = fl_cfg['execution'] if 'execution' in fl_cfg else 'auto'
  return algorithm, build_round(algorithm, loss_fn, batch_size=fl_cfg['batch_size'],
                                local_epochs=fl_cfg['local_epochs'], execution=execution,
                                dp=dp_lib.from_config(fl_cfg),
                                local_steps=batches.steps_of(fl_cfg), **kwargs)
