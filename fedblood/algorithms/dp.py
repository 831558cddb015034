"""Differential privacy in the local step (DP-SGD) and the settings of ``fl.dp``.

Record level, ``fl.dp.mode='example'`` (DP-SGD, Abadi et al. 2016), per center and step:

* the sample: every training example of center k is in the step's sample independently with
  probability ``q_k = B / n_k`` (Poisson sampling, ``B = fl.batch_size``: the expected size);
  :func:`fedblood.core.batches.make_poisson_fn` draws it as a fixed-shape mask, the sampled rows
  first, so no step recompiles whatever its size;
* each sampled example's gradient of the loss alone (``vmap`` over the examples, in chunks of
  ``microbatch`` examples, as many chunks as the sample needs) is clipped to L2 norm ``clip``;
* ``g = (sum of clipped gradients + N(0, (noise_multiplier * clip)^2 I)) / B``.

Everything after ``g`` is post-processing of a private value, hence free under DP: the
algorithm's data-independent terms (FedDyn's linear and quadratic terms, FedProx's proximal
term, SCAFFOLD's correction: gradients of ``penalty_fn`` and the weight decay), then the local
optimizer (its global-norm clipping, SGD). The accountant (:mod:`fedblood.privacy`) sees
``steps`` compositions of a Poisson-sampled Gaussian of rate ``q_k`` per center; the number of
examples ``n_k`` is treated as public.

Client level, ``fl.dp.mode='client'`` (DP-FedAvg, McMahan et al. 2018): a wrapper of a built
algorithm, so it lives above :mod:`fedblood.algorithms.base`, in
:mod:`fedblood.algorithms.dp_fedavg`; its settings are checked here with the others.
"""

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedblood.backend import platform

MODES = ('off', 'example', 'client')


class DpSgd(NamedTuple):
  """DP-SGD of the local step.

  Attributes:
    clip: L2 bound of each example's gradient.
    noise_multiplier: noise std / clip.
    expected_batch: the Poisson sample's expected size ``q_k * n_k`` (= ``fl.batch_size``).
    microbatch: examples per per-example-gradient chunk (bounds the memory of the
      per-example gradients: ``microbatch`` copies of the trainable params).
  """
  clip: float
  noise_multiplier: float
  expected_batch: int
  microbatch: int


class PoissonSample(NamedTuple):
  """One step's Poisson sample of a center, as DP-SGD's ``batch_fn(step)`` returns it.

  Attributes:
    count: int32 scalar, the number of examples sampled.
    fetch: ``j -> batch`` of chunk ``j``: ``microbatch`` rows (the sampled examples
      ``j * microbatch ...``), ``batch['mask']`` 1 for sampled rows, 0 past ``count``.
  """
  count: Any
  fetch: Callable


def from_config(fl_cfg) -> Optional[DpSgd]:
  """``DpSgd`` of ``fl.dp`` when ``fl.dp.mode == 'example'``, else None."""
  cfg = fl_cfg['dp'] if 'dp' in fl_cfg else None
  if cfg is None or cfg['mode'] != 'example':
    return None
  batch = int(fl_cfg['batch_size'])
  microbatch = int(cfg['microbatch']) if cfg.get('microbatch') else batch
  return DpSgd(float(cfg['clip']), float(cfg['noise_multiplier']), batch, microbatch)


def check_config(fl_cfg):
  """Raises ValueError on an ``fl.dp`` that cannot run, naming the key."""
  cfg = fl_cfg['dp'] if 'dp' in fl_cfg else None
  if cfg is None:
    return
  if cfg['mode'] not in MODES:
    raise ValueError(f'fl.dp.mode must be one of {MODES}, got {cfg["mode"]!r}')
  if cfg['mode'] == 'off':
    return
  if not 0 < cfg['clip'] < math.inf:
    raise ValueError(f'fl.dp.clip must be a finite number > 0, got {cfg["clip"]}')
  if not 0 <= cfg['noise_multiplier'] < math.inf:
    raise ValueError(f'fl.dp.noise_multiplier must be a finite number >= 0, got '
                     f'{cfg["noise_multiplier"]}')
  if cfg.get('microbatch', 0) < 0:
    raise ValueError(f'fl.dp.microbatch must be >= 0 (0: fl.batch_size), got {cfg["microbatch"]}')
  if cfg['mode'] == 'client' and fl_cfg['algorithm'] not in ('fed_avg', 'fed_prox'):
    raise ValueError(f"fl.dp.mode='client' supports fl.algorithm 'fed_avg' and 'fed_prox', got "
                     f"{fl_cfg['algorithm']!r}: its server also reads client state the noise does "
                     "not cover")
  if cfg['mode'] == 'client' and fl_cfg.get('participation', 1.0) != 1.0:
    raise ValueError("fl.dp.mode='client' is accounted for full participation; set "
                     f"fl.participation=1.0 (got {fl_cfg['participation']})")


def clipped_sum(loss_fn: Callable, clip: float, rewrite: Optional[Callable] = None) -> Callable:
  """``(params, batch, rngs) -> (sum_i clip(grad_i), stats sums)`` over a batch's rows.

  Row ``i`` is differentiated alone (a batch of one, ``rngs[i]`` its key); its gradient
  is scaled by ``clip / max(|g_i|, clip)`` and by its mask (masked rows add exactly zero).
  ``stats``: ``{'loss', **aux}`` summed over the masked-in rows. The computation goes through
  ``rewrite`` (default :func:`fedblood.backend.platform.gradient_rewrite`: on CPU
  :func:`fedblood.backend.xla_cpu.fast_gradients`), as local SGD's plain gradient does.
  """
  def one(params, example, rng):
    batch = jax.tree.map(lambda x: x[None], example)
    grad_fn = jax.grad(lambda p: (lambda l, a: (l, (l, a)))(*loss_fn(p, batch, rng)),
                       has_aux=True)
    grads, (loss, aux) = grad_fn(params)
    keep = example['mask'] > 0
    factor = jnp.where(keep, clip / jnp.maximum(optax.tree.norm(grads), clip), 0.0)
    grads = jax.tree.map(lambda g: jnp.where(keep, g * factor.astype(g.dtype), 0), grads)
    stats = jax.tree.map(lambda s: jnp.where(keep, s, 0).astype(jnp.float32),
                         dict(loss=loss, **aux))
    return grads, stats

  def total(params, batch, rngs):
    grads, stats = jax.vmap(one, in_axes=(None, 0, 0))(params, batch, rngs)
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), (grads, stats))

  return (platform.gradient_rewrite() if rewrite is None else rewrite)(total)


def private_gradient(dp: DpSgd, loss_fn: Callable,
                     rewrite: Optional[Callable] = None) -> Callable:
  """``(params, sample, rng) -> (noisy mean gradient, stats)`` of one DP-SGD step.

  ``stats``: ``{'loss', **aux}`` averaged over the sampled examples (training metrics for
  monitoring; NOT covered by the privacy guarantee).
  """
  chunk = clipped_sum(loss_fn, dp.clip, rewrite)
  std = dp.noise_multiplier * dp.clip

  def grad_fn(params, sample: PoissonSample, rng):
    loss_rng, noise_rng = jax.random.split(rng)
    probe = jax.eval_shape(chunk, params, sample.fetch(jnp.int32(0)),
                           jax.random.split(loss_rng, dp.microbatch))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), probe)

    def body(j, acc):
      rows = j * dp.microbatch + jnp.arange(dp.microbatch)
      rngs = jax.vmap(lambda i: jax.random.fold_in(loss_rng, i))(rows)
      return jax.tree.map(jnp.add, acc, chunk(params, sample.fetch(j), rngs))

    count = jnp.asarray(sample.count, jnp.int32)
    chunks = (count + dp.microbatch - 1) // dp.microbatch
    grads, stats = jax.lax.fori_loop(0, chunks, body, zeros)
    leaves, tree = jax.tree.flatten(grads)
    keys = jax.random.split(noise_rng, len(leaves))
    noisy = [(g + std * jax.random.normal(k, g.shape, g.dtype)) / dp.expected_batch
             for g, k in zip(leaves, keys)]
    stats = jax.tree.map(lambda s: s / jnp.maximum(count, 1).astype(s.dtype), stats)
    return jax.tree.unflatten(tree, noisy), stats

  return grad_fn
