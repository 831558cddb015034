"""The classifier's training loss and batched prediction over (trainable, frozen) params.

Any Flax classifier taking float images in ``[0, 1]`` (e.g. :class:`fedblood.model.models.VGG`)::

  loss_fn = classifier.classifier_loss(model, augment_fn=None)  # (trainable, frozen, batch, rng)
  predict = classifier.make_predict(model, batch_size)          # (trainable, frozen, images)
  trunk = classifier.make_trunk(model, 3)   # (frozen, images) -> features after block3
  rest = classifier.make_rest(model, 3)     # (trainable, frozen, features) -> logits

Federated rounds (:mod:`fedblood.core.simulate`) and the pooled baseline
(:mod:`fedblood.study.centralized`) train with the same ``loss_fn``; evaluations run ``predict``,
or ``trunk`` once and ``rest`` per model when the first blocks stay fixed (FL).
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedblood.model import partition


def to_float(images):
  """uint8 images -> float32 in [0, 1]; float images pass through as float32."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def classifier_loss(model, augment_fn: Optional[Callable] = None,
                    logit_adjust: float = 0.0) -> Callable:
  """Masked softmax cross-entropy of a Flax classifier over (trainable, frozen) params.

  Args:
    model: a linen module taking float images in [0, 1] and ``train`` (dropout rng 'dropout').
    augment_fn: optional ``(rng, images) -> images`` on float32 images in [0, 1].
    logit_adjust: ``tau``; above 0 the loss is the logit-adjusted cross-entropy of Menon et al.
      (2021), as FedLC (Zhang et al. 2022) uses it in FL: ``tau * batch['log_prior']`` (each
      row's own class log-frequencies, ``[B, K]``) is added to the logits before the softmax, so
      the model is not rewarded for predicting a frequent class and its plain logits (what
      prediction uses) estimate the class-balanced posterior.

  Returns:
    ``loss_fn(trainable, frozen, batch, rng) -> (loss, {'accuracy': ...})`` for batches
    ``{'image', 'label'[, 'mask'][, 'log_prior']}``; rows with mask 0 do not count.
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
    fit = logits
    if logit_adjust:
      if 'log_prior' not in batch:
        raise KeyError("logit_adjust > 0 needs batch['log_prior'] (simulate.pad_centers with "
                       'num_classes)')
      fit = logits + logit_adjust * batch['log_prior']
    loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(fit, labels) * mask) / count
    accuracy = jnp.sum((jnp.argmax(logits, -1) == labels) * mask) / count
    return loss, {'accuracy': accuracy}

  return loss_fn


def make_predict(model, batch_size: int = 64) -> Callable:
  """Jitted ``predict(trainable, frozen, images[..., H, W, 3]) -> logits[..., K]``.

  Runs the model in eval mode over batches of ``batch_size`` images (``lax.map``), padding
  the last one, so memory stays bounded; fewer images than ``batch_size`` run as one batch of
  their own size. It compiles once per input shape, so feed it padded arrays (e.g.
  ``Centers.examples['image']``, or :func:`chunks`) to keep the shapes few.
  """
  @jax.jit
  def predict(trainable, frozen, images):
    params = {'params': partition.merge(trainable, frozen)}
    lead, image_shape = images.shape[:-3], images.shape[-3:]
    flat = images.reshape((-1,) + image_shape)
    num = flat.shape[0]
    step = max(1, min(batch_size, num))
    flat = jnp.pad(flat, [(0, -num % step)] + [(0, 0)] * 3)
    batches = flat.reshape((-1, step) + image_shape)
    logits = jax.lax.map(lambda x: model.apply(params, to_float(x), train=False), batches)
    logits = logits.reshape((-1, logits.shape[-1]))[:num]
    return logits.reshape(lead + logits.shape[-1:])

  return predict


@functools.lru_cache(maxsize=8)
def make_trunk(model, blocks: int) -> Callable:
  """Jitted ``trunk(frozen, images[B, H, W, 3]) -> features`` after ``block{blocks}``, eval mode.

  ``frozen`` holds (at least) the first ``blocks`` blocks' parameters: with
  ``model.frozen_blocks = blocks`` they never change in FL, so an evaluation repeated every round
  on the same images computes these features once and runs only :func:`make_rest` per round.
  """
  @jax.jit
  def trunk(frozen, images):
    return model.apply({'params': frozen}, to_float(images), train=False, stop=blocks)

  return trunk


@functools.lru_cache(maxsize=8)
def make_rest(model, blocks: int) -> Callable:
  """Jitted ``rest(trainable, frozen, features) -> logits``: the network after
  ``block{blocks}`` applied to :func:`make_trunk`'s features, eval mode."""
  @jax.jit
  def rest(trainable, frozen, features):
    params = {'params': partition.merge(trainable, frozen)}
    return model.apply(params, features, train=False, start=blocks)

  return rest


# The last chunk of an evaluation is padded to a multiple of this many images, not to a whole
# chunk: predictions compile for at most eval.batch_size / 16 + 1 shapes (~0.5 s each at the
# CPU study's scale), and a center's 38 validation images run as a chunk of 48 (384 views under
# model.tta), not of 128 (1024 views): the local-only fits' validation 2.2-2.9x cheaper
# (bench/bench_val.py).
CHUNK_MULTIPLE = 16


def chunks(images: list, batch_size: int) -> list:
  """The uint8 arrays ``images``, concatenated, in ``[batch_size, ...]`` chunks, the last one
  padded with zeros to the next multiple of :data:`CHUNK_MULTIPLE` (at most ``batch_size``)."""
  images = [x for x in images if len(x)]
  if not images:
    return []
  images = np.concatenate(images)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = min(batch_size, -(-len(chunk) // CHUNK_MULTIPLE) * CHUNK_MULTIPLE) - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out.append(jnp.asarray(chunk))
  return out


def probabilities(logits: list, num: int, num_classes: int) -> np.ndarray:
  """Softmax ``[num, K]`` (host) of the chunks' logits in turn, their padding rows dropped."""
  if not logits:
    return np.zeros((0, num_classes), np.float32)
  return np.concatenate([np.asarray(jax.nn.softmax(x, axis=-1)) for x in logits])[:num]
