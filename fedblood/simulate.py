"""One federated round over all centers, jitted, with the data kept on the device.

API (stable: the pipeline codes against it)::

  centers = Centers(examples={'image': uint8[C, Nmax, H, W, 3], 'label': int32[C, Nmax]},
                    sizes=int32[C])                       # real examples per center; rest padding
  loss_fn = classifier_loss(model, augment_fn=None)  # (trainable, frozen, batch, rng) -> (loss, aux)
  alg, round_fn = build(config.fl, loss_fn)               # or algorithms.build + build_round
  server_state, client_states = alg.init(trainable, num_clients=C)
  for r in range(rounds):
    server_state, client_states, metrics = round_fn(
        server_state, client_states, frozen, centers, active, key, r)
    models = alg.eval_params(server_state)    # {'server': ...} (+ FedDyn's 'active_mean')
  predict = make_predict(model, batch_size)   # logits = predict(trainable, frozen, images)

* ``round_fn(server_state, client_states, frozen, centers, active, key, round_index)``
  -> ``(server_state, client_states, metrics)``. ``frozen`` is an argument (never a
  baked constant); algorithms see only ``trainable``. ``active``: bool[C] (inactive
  centers' states are returned unchanged). ``key``: the run's base key; center k
  draws from ``fold_in(fold_in(key, round_index), k)``, so a checkpoint needs only
  the round number. ``round_index`` is traced: later rounds never recompile.
  ``metrics``: dict of [C] arrays: ``loss`` and the loss's aux (e.g. ``accuracy``)
  averaged over each center's local steps, and ``num_steps`` (int32); zero for
  inactive centers.
  With ``donate=True`` (default) the server and client states passed in are consumed.
* Each epoch, center k visits its ``n_k`` examples in a fresh random order, in
  ``ceil(n_k / batch_size)`` batches; the last batch is partial: ``batch['mask']``
  (float32[B], 1 for real examples) tells the loss which rows count. So center k
  runs exactly ``local_epochs * ceil(n_k / batch_size)`` steps.
* ``execution`` (identical results up to float rounding, see tests):
  ``'vmap'`` vmaps the local update over centers (centers short of the longest
  one's steps are masked no-ops); ``'loop'`` calls one jitted client step per
  active center (each runs exactly its own steps; inactive centers are skipped),
  then a jitted server step; ``'unroll'`` is the same loop unrolled inside one
  jit; ``'shard'`` splits the center axis over devices (``shard_map``, vmap on
  each device; the center axis is padded with empty centers to a multiple of the
  device count, which copies the data each round unless it divides evenly);
  ``'auto'`` (the default of :func:`build`) picks one of these at the first call
  from the backend, the device count and the centers' step counts
  (:func:`choose_execution`).
  Measured on 2 CPU cores (bench/bench_round.py, docs/performance.md; the CPU
  study's VGG16 at 64 px, 5 unequal centers): 'loop' 1.00x, 'unroll' 1.00x (with
  5x the client compiles), 'vmap' 0.60x (it pays for the longest center's steps on
  every center, and per-center weights make grouped convolutions).
"""

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from fedblood import algorithms, partition
from fedblood.algorithms import base
from fedblood.algorithms import dp as dp_lib

EXECUTIONS = ('auto', 'vmap', 'loop', 'unroll', 'shard')


class Centers(NamedTuple):
  """Per-center training data, padded to a common length Nmax.

  Attributes:
    examples: dict of arrays ``[C, Nmax, ...]`` (e.g. ``image``, ``label``).
    sizes: int32 ``[C]``, each center's number of real examples (the first ``n_k`` rows).
  """
  examples: dict
  sizes: Any


def _ceil_div(a, b):
  return (a + b - 1) // b


def epoch_orders(rng, size, nmax: int, epochs: int):
  """``[epochs, nmax]`` visiting orders: a permutation of ``0..size-1``, then the padding rows."""
  # One sort of uniform keys, with the padding rows' keys above every real one.
  keys = jax.random.uniform(rng, (epochs, nmax))
  keys = jnp.where(jnp.arange(nmax) < size, keys, 2.0)
  return jnp.argsort(keys, axis=-1).astype(jnp.int32)


def make_batch_fn(examples, center, size, rng, batch_size: int, local_epochs: int):
  """``step -> batch`` of center ``center`` of ``examples`` (leaves ``[C, Nmax, ...]``)."""
  nmax = jax.tree.leaves(examples)[0].shape[1]
  steps_per_epoch = jnp.maximum(_ceil_div(size, batch_size), 1)
  if batch_size >= nmax:  # full-batch steps: visiting order is irrelevant, skip the sorts
    orders = jnp.broadcast_to(jnp.arange(nmax, dtype=jnp.int32), (local_epochs, nmax))
  else:
    orders = epoch_orders(rng, size, nmax, local_epochs)

  def batch_fn(step):
    epoch = jnp.minimum(step // steps_per_epoch, local_epochs - 1)
    pos = (step % steps_per_epoch) * batch_size + jnp.arange(batch_size)
    idx = orders[epoch, jnp.minimum(pos, nmax - 1)]
    batch = {name: x[center, idx] for name, x in examples.items()}
    batch['mask'] = (pos < size).astype(jnp.float32)
    return batch

  return batch_fn


def make_poisson_fn(examples, center, size, rng, batch_size: int, microbatch: int):
  """DP-SGD's ``step -> dp.PoissonSample`` of center ``center`` (Poisson rate ``B / n_k``).

  Each step every real row is sampled independently with probability ``batch_size / size``
  (drawn from ``fold_in(rng, step)``); the sampled rows' indices come first in a fixed-shape
  array, so the sample's size is data, not shape. Rows are gathered per chunk.
  """
  nmax = jax.tree.leaves(examples)[0].shape[1]
  rate = batch_size / jnp.maximum(size, 1).astype(jnp.float32)
  padded = _ceil_div(nmax, microbatch) * microbatch

  def batch_fn(step):
    real = jnp.arange(nmax) < size
    chosen = real & (jax.random.uniform(jax.random.fold_in(rng, step), (nmax,)) < rate)
    count = jnp.sum(chosen, dtype=jnp.int32)
    order = jnp.nonzero(chosen, size=padded, fill_value=0)[0].astype(jnp.int32)

    def fetch(j):
      pos = j * microbatch + jnp.arange(microbatch)
      idx = jax.lax.dynamic_slice(order, (j * microbatch,), (microbatch,))
      batch = {name: x[center, idx] for name, x in examples.items()}
      batch['mask'] = (pos < count).astype(jnp.float32)
      return batch

    return dp_lib.PoissonSample(count, fetch)

  return batch_fn


def _check_centers(centers: Centers):
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


def local_steps(sizes, batch_size: int, local_epochs: int) -> list:
  """Each center's number of local steps per round: ``local_epochs * ceil(n_k / batch_size)``."""
  return [local_epochs * _ceil_div(int(n), batch_size) for n in np.asarray(sizes).tolist()]


def choose_execution(sizes, *, batch_size: int, local_epochs: int, backend: str,
                     num_devices: int = 1) -> str:
  """The execution ``'auto'`` runs for centers of ``sizes`` on ``num_devices`` of ``backend``.

  * CPU: ``'loop'``. Measured on 2 cores (docs/performance.md): as fast as 'unroll',
    which compiles C client programs instead of one, and 1.3-1.7x 'vmap';
    'shard' needs forced host devices, and that process's 'loop' was slower still.
  * GPU/TPU with several devices: ``'shard'`` when ``ceil(C / devices) * max_k s_k``
    (each device runs its centers in lock-step to the longest one) is at most 3/4
    of ``sum_k s_k`` (one device running every center in turn), else ``'loop'``;
    the margin covers vmap's grouped convolutions when a device holds several centers.
  * one GPU/TPU: ``'loop'``. One paper-scale center step (batch 64 of 224 px, ~3
    TFLOP) fills the device by itself, so 'vmap' could only add its padded
    no-op steps (40% of its work with the study's center sizes). Not yet measured:
    bench/gpu_round.py times 'loop' against 'vmap' to check it.

  Args:
    sizes: each center's number of training examples.
    batch_size, local_epochs: as in :func:`build_round`.
    backend: the devices' platform (``'cpu'``, ``'gpu'``, ``'cuda'``, ``'tpu'``...).
    num_devices: devices the round may use.
  """
  steps = local_steps(sizes, batch_size, local_epochs)
  if backend == 'cpu' or num_devices < 2:
    return 'loop'
  per_device = _ceil_div(len(steps), num_devices)
  return 'shard' if 4 * per_device * max(steps) <= 3 * sum(steps) else 'loop'


def _auto_round(build_fn: Callable, batch_size: int, local_epochs: int,
                devices: Optional[Sequence[Any]]) -> Callable:
  """``round_fn`` that resolves ``'auto'`` at its call from the centers' sizes; see above."""
  built = {}

  def round_fn(server_state, client_states, frozen, centers, active, key, round_index):
    _check_centers(centers)
    devs = list(devices) if devices is not None else jax.devices()
    name = choose_execution(centers.sizes, batch_size=batch_size, local_epochs=local_epochs,
                            backend=devs[0].platform, num_devices=len(devs))
    if name not in built:  # one build (hence one compile) per execution ever chosen
      built[name] = build_fn(execution=name)
    round_fn.execution = name
    return built[name](server_state, client_states, frozen, centers, active, key, round_index)

  round_fn.execution = None  # the execution of the latest call
  return round_fn


def client_fn(algorithm: base.FedAlgorithm, loss_fn: Callable, *, batch_size: int,
              local_epochs: int, dp: Optional[dp_lib.DpSgd] = None) -> Callable:
  """One center's local update exactly as every execution of the round runs it.

  ``client(server_state, client_state, weight, frozen, examples, center, size, rng)
  -> (local_params, new_client_state, metrics)``: center ``center`` of ``examples``
  (leaves ``[C, Nmax, ...]``), its ``size`` real examples, its key for the round
  (``fold_in(fold_in(key, round), k)``). A deployed site (:mod:`fedblood.deploy`)
  calls it on its own data padded to the federation's ``Nmax``, so the batches, and
  hence the update, are the simulation's. With ``dp`` (DP-SGD) the batches are Poisson
  samples (:func:`make_poisson_fn`).
  """
  def client(server_state, client_state, weight, frozen, examples, center, size, rng):
    perm_rng, step_rng = jax.random.split(rng)
    if dp is None:
      batch_fn = make_batch_fn(examples, center, size, perm_rng, batch_size, local_epochs)
    else:
      batch_fn = make_poisson_fn(examples, center, size, perm_rng, batch_size, dp.microbatch)
    local_loss = lambda p, batch, r: loss_fn(p, frozen, batch, r)
    num_steps = local_epochs * _ceil_div(size, batch_size)
    return algorithm.client_update(server_state, client_state, weight, local_loss, batch_fn,
                                   num_steps, step_rng)

  return client


def build_round(algorithm: base.FedAlgorithm, loss_fn: Callable, *, batch_size: int,
                local_epochs: int, execution: str = 'vmap', donate: bool = True,
                devices: Optional[Sequence[Any]] = None,
                dp: Optional[dp_lib.DpSgd] = None) -> Callable:
  """Builds ``round_fn`` (see the module docstring).

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
      (:func:`make_poisson_fn`); a center still takes ``local_epochs * ceil(n_k / B)`` steps.
  """
  if execution not in EXECUTIONS:
    raise ValueError(f'fl.execution must be one of {EXECUTIONS}, got {execution!r}')
  if batch_size < 1 or local_epochs < 1:
    raise ValueError(f'fl.batch_size and fl.local_epochs must be >= 1, got {batch_size}, '
                     f'{local_epochs}')
  if execution == 'auto':
    build_fn = functools.partial(build_round, algorithm, loss_fn, batch_size=batch_size,
                                 local_epochs=local_epochs, donate=donate, devices=devices,
                                 dp=dp)
    return _auto_round(build_fn, batch_size, local_epochs, devices)
  donated = (0, 1) if donate else ()
  client = client_fn(algorithm, loss_fn, batch_size=batch_size, local_epochs=local_epochs,
                     dp=dp)

  def round_keys(key, round_index, num):
    round_key = jax.random.fold_in(key, round_index)
    return jax.vmap(lambda k: jax.random.fold_in(round_key, k))(jnp.arange(num))

  def finish(server_state, client_states, outputs, sizes, active):
    """Keeps inactive centers' states, zeroes their metrics, runs the server update."""
    local_params, new_states, metrics = outputs
    active = jnp.asarray(active, bool)
    new_states = base.select_clients(active, new_states, client_states)
    metrics = jax.tree.map(lambda m: jnp.where(active, m, jnp.zeros_like(m)), metrics)
    weights = base.client_weights(sizes)
    server_state = algorithm.server_update(server_state, local_params, weights, active, new_states)
    return server_state, new_states, metrics

  mapped = (None, 0, 0, None, None, 0, 0, 0)

  def vmap_round(server_state, client_states, frozen, centers, active, key, round_index):
    num = centers.sizes.shape[0]
    outputs = jax.vmap(client, in_axes=mapped)(
        server_state, client_states, base.client_weights(centers.sizes), frozen, centers.examples,
        jnp.arange(num), centers.sizes, round_keys(key, round_index, num))
    return finish(server_state, client_states, outputs, centers.sizes, active)

  def unroll_round(server_state, client_states, frozen, centers, active, key, round_index):
    num = centers.sizes.shape[0]
    weights, rngs = base.client_weights(centers.sizes), round_keys(key, round_index, num)
    outs = [client(server_state, jax.tree.map(lambda x: x[k], client_states), weights[k], frozen,
                   centers.examples, k, centers.sizes[k], rngs[k]) for k in range(num)]
    outputs = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return finish(server_state, client_states, outputs, centers.sizes, active)

  def shard_round(server_state, client_states, frozen, centers, active, key, round_index):
    mesh_devices = np.asarray(devices if devices is not None else jax.devices())
    mesh = jax.sharding.Mesh(mesh_devices, ('centers',))
    num = centers.sizes.shape[0]
    pad = -num % mesh_devices.size
    pad_fn = lambda x, value=0: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1),
                                        constant_values=value) if pad else x
    weights = pad_fn(base.client_weights(centers.sizes), 1.0)  # empty centers take 0 steps
    rngs = round_keys(key, round_index, num + pad)

    def local(server_state, client_states, weights, frozen, examples, sizes, rngs):
      centers_here = jnp.arange(sizes.shape[0])
      return jax.vmap(client, in_axes=mapped)(server_state, client_states, weights, frozen,
                                              examples, centers_here, sizes, rngs)

    split = P('centers')
    in_specs = (P(), split, split, P(), split, split, split)
    outputs = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=split, check_vma=False)(
        server_state, jax.tree.map(pad_fn, client_states), weights, frozen,
        jax.tree.map(pad_fn, centers.examples), pad_fn(centers.sizes), rngs)
    outputs = jax.tree.map(lambda x: x[:num], outputs)
    return finish(server_state, client_states, outputs, centers.sizes, active)

  if execution != 'loop':
    body = dict(vmap=vmap_round, unroll=unroll_round, shard=shard_round)[execution]
    jitted = jax.jit(body, donate_argnums=donated)

    def round_fn(server_state, client_states, frozen, centers, active, key, round_index):
      _check_centers(centers)
      return jitted(server_state, client_states, frozen, centers, active, key, round_index)

    round_fn.jitted = jitted
    return round_fn

  @jax.jit
  def client_step(server_state, client_states, frozen, centers, key, round_index, k):
    rng = jax.random.fold_in(jax.random.fold_in(key, round_index), k)
    return client(server_state, jax.tree.map(lambda x: x[k], client_states),
                  base.client_weights(centers.sizes)[k], frozen, centers.examples, k,
                  centers.sizes[k], rng)

  @functools.partial(jax.jit, donate_argnums=donated)
  def server_step(server_state, client_states, outs, sizes, active):
    outputs = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return finish(server_state, client_states, outputs, sizes, active)

  def loop_round(server_state, client_states, frozen, centers, active, key, round_index):
    _check_centers(centers)
    active_host = np.asarray(active, bool)
    run = [k for k in range(active_host.size) if active_host[k]] or [0]
    done = {k: client_step(server_state, client_states, frozen, centers, key, round_index, k)
            for k in run}
    # Inactive centers' outputs are ignored by finish/server_update: any same-shaped value does.
    outs = [done.get(k, done[run[0]]) for k in range(active_host.size)]
    return server_step(server_state, client_states, outs, centers.sizes, active)

  loop_round.client_step, loop_round.server_step = client_step, server_step
  return loop_round


def build(fl_cfg, loss_fn: Callable, **kwargs) -> tuple[base.FedAlgorithm, Callable]:
  """``(algorithm, round_fn)`` from ``config.fl``: algorithm, batch_size, local_epochs, execution.

  ``fl.execution`` defaults to ``'auto'`` (see :func:`choose_execution`).
  """
  for key in ('batch_size', 'local_epochs'):
    if key not in fl_cfg:
      raise ValueError(f'fl.{key} is missing from the config')
  algorithm = algorithms.build(fl_cfg)
  execution = fl_cfg['execution'] if 'execution' in fl_cfg else 'auto'
  return algorithm, build_round(algorithm, loss_fn, batch_size=fl_cfg['batch_size'],
                                local_epochs=fl_cfg['local_epochs'], execution=execution,
                                dp=dp_lib.from_config(fl_cfg), **kwargs)


def to_float(images):
  """uint8 images -> float32 in [0, 1]; float images pass through as float32."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def classifier_loss(model, augment_fn: Optional[Callable] = None) -> Callable:
  """Masked softmax cross-entropy of a Flax classifier over (trainable, frozen) params.

  Args:
    model: a linen module taking float images in [0, 1] and ``train`` (dropout rng 'dropout').
    augment_fn: optional ``(rng, images) -> images`` on float32 images in [0, 1].

  Returns:
    ``loss_fn(trainable, frozen, batch, rng) -> (loss, {'accuracy': ...})`` for batches
    ``{'image', 'label'[, 'mask']}``; rows with mask 0 do not count.
  """
  def loss_fn(trainable, frozen, batch, rng):
    aug_rng, dropout_rng = jax.random.split(rng)
    images = to_float(batch['image'])
    if augment_fn is not None:
      images = augment_fn(aug_rng, images)
    logits = model.apply({'params': partition.merge(trainable, frozen)}, images, train=True,
                         rngs={'dropout': dropout_rng})
    labels = batch['label']
    mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32))
    count = jnp.maximum(jnp.sum(mask), 1.0)
    loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask) / count
    accuracy = jnp.sum((jnp.argmax(logits, -1) == labels) * mask) / count
    return loss, {'accuracy': accuracy}

  return loss_fn


def make_predict(model, batch_size: int = 64) -> Callable:
  """Jitted ``predict(trainable, frozen, images[..., H, W, 3]) -> logits[..., K]``.

  Runs the model in eval mode over fixed-size batches (``lax.map``), padding the
  last one, so memory stays bounded; it compiles once per input shape, so feed it
  padded arrays (e.g. ``Centers.examples['image']``) to keep that shape fixed.
  """
  @jax.jit
  def predict(trainable, frozen, images):
    params = {'params': partition.merge(trainable, frozen)}
    lead, image_shape = images.shape[:-3], images.shape[-3:]
    flat = images.reshape((-1,) + image_shape)
    num = flat.shape[0]
    flat = jnp.pad(flat, [(0, -num % batch_size)] + [(0, 0)] * 3)
    batches = flat.reshape((-1, batch_size) + image_shape)
    logits = jax.lax.map(lambda x: model.apply(params, to_float(x), train=False), batches)
    logits = logits.reshape((-1, logits.shape[-1]))[:num]
    return logits.reshape(lead + logits.shape[-1:])

  return predict
