"""VGG networks in Flax linen, pure-functional (params in, logits out).

The study (Natali et al., 2024) fine-tunes an ImageNet VGG16 with its first three
convolution blocks frozen. The stages are named ``block1`` .. ``block5`` and the
classifier ``head`` so that parameter paths read like the paper
(``block4/conv2/kernel``, ``head/fc1/kernel``) and regex partition rules can
address them (see :mod:`fedblood.model.partition`).

Usage::

  model = VGG16(num_classes=5, head='gap', width=0.25)
  params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))['params']
  logits = model.apply({'params': params}, images)            # images: float in [0, 1]
  logits = model.apply({'params': params}, images, train=True,
                       rngs={'dropout': rng})                  # dropout in the fc head
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedblood.backend import platform

# Channels of the five VGG stages and of the classic fully connected head.
STAGE_CHANNELS = (64, 128, 256, 512, 512)
FC_UNITS = 4096

# Input normalisations: torchvision's ImageNet mean/std on RGB in [0, 1], and the
# 'caffe' convention Keras' VGG16 weights were trained with (BGR, 0-255, mean only).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def normalize(images, input_norm: str):
  """Maps RGB images in [0, 1] to what the first convolution expects."""
  if input_norm == 'imagenet':
    return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  if input_norm == 'caffe':
    return images[..., ::-1] * 255.0 - jnp.asarray(CAFFE_MEAN_BGR)
  if input_norm == 'per_image':
    # Each image's channels to zero mean, unit variance: removes most of a center's stain and
    # white-balance cast (a global colour shift and gain per channel) before the first layer.
    mean = images.mean(axis=(-3, -2), keepdims=True)
    std = images.std(axis=(-3, -2), keepdims=True)
    return (images - mean) / jnp.maximum(std, 1e-3)
  if input_norm == 'none':
    return images
  raise ValueError(f"model.input_norm must be 'imagenet', 'caffe', 'per_image' or 'none', "
                   f"got {input_norm!r}")


def scaled(channels: int, width: float) -> int:
  """Channel count under a width multiplier (at least 1)."""
  return max(1, int(round(channels * width)))


# Convolution kernel initialisers: Flax's default (LeCun normal, variance 1/fan_in) halves the
# signal's variance at every ReLU, so 13 convolutions without normalisation layers start with
# near-zero logits and gradients; He normal (2/fan_in) keeps it constant (He et al., 2015).
CONV_INITS = {'lecun': nn.initializers.lecun_normal(), 'he': nn.initializers.he_normal()}


class VGGStage(nn.Module):
  """``num_convs`` 3x3 convolutions with ReLU, then 2x2 max-pooling."""
  num_convs: int
  features: int
  dtype: Any = jnp.float32
  conv_init: str = 'lecun'

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_convs):
      x = nn.Conv(self.features, (3, 3), padding='SAME', dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=CONV_INITS[self.conv_init],
                  name=f'conv{i + 1}')(x)
      x = nn.relu(x)
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class FCHead(nn.Module):
  """The classic VGG classifier: flatten, 4096-4096 with ReLU and dropout, logits."""
  num_classes: int
  units: int = FC_UNITS
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    # NHWC flatten order (h, w, c); torchvision flattens (c, h, w): see fedblood.model.weights.
    x = x.reshape((x.shape[0], -1))
    for name in ('fc1', 'fc2'):
      x = nn.Dense(self.units, dtype=self.dtype, param_dtype=jnp.float32, name=name)(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='out')(x)


class GAPHead(nn.Module):
  """Global average pooling then one dense layer: ~100x fewer head params than fc."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='out')(x)


class VGG(nn.Module):
  """VGG (Simonyan & Zisserman, 2015) with named stages and a pluggable head.

  Attributes:
    stages: convolutions per stage; VGG16 is (2, 2, 3, 3, 3).
    num_classes: number of output logits (5 leukocyte classes in fedblood).
    head: 'fc' (classic 4096-4096 with dropout) or 'gap' (global average pool + dense).
    width: multiplier on every channel count (1.0 is VGG16; 0.25 gives a CPU-sized net
      of the same depth).
    dropout: dropout rate of the fc head.
    input_norm: 'imagenet' (torchvision weights), 'caffe' (Keras weights), 'per_image'
      (each image's channels standardised; for training from scratch) or 'none'.
    dtype: computation dtype (bfloat16 on accelerators); params are always float32.
    conv_init: 'lecun' (Flax's default) or 'he' kernel init of the convolutions.
    tta: test-time averaging: in eval mode (``train=False``) the output is the log of the mean
      softmax over the 8 flips and quarter turns of each (square) image, so predictions are
      invariant to them; training is unchanged.
  """
  stages: Sequence[int] = (2, 2, 3, 3, 3)
  num_classes: int = 5
  head: str = 'fc'
  width: float = 1.0
  dropout: float = 0.5
  input_norm: str = 'imagenet'
  dtype: Any = jnp.float32
  conv_init: str = 'lecun'
  tta: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False, start: int = 0, stop: int | None = None):
    """Logits of ``images`` (float in [0, 1], NHWC); or a part of the network.

    ``stop=k`` (1..5) returns the features after ``block{k}`` (the 8 views on the batch axis
    under :attr:`tta` in eval mode); ``start=k`` takes those features and runs ``block{k+1}``
    onward and the head. ``apply(p, apply(p, x, stop=k), start=k)`` is
    ``apply(p, x)``: an evaluation that repeats with the first k blocks fixed (FL with
    ``model.frozen_blocks=k``) computes their features once (:func:`classifier.make_trunk`).
    """
    features = stop is not None
    stop = stop if features else len(self.stages)
    if not 0 <= start <= stop <= len(self.stages) or (features and stop < 1):
      raise ValueError(f'VGG: blocks {start}..{stop} are not within 0..{len(self.stages)}')
    averaged = self.tta and not train
    x = self._inputs(images, averaged) if start == 0 else images
    for i in range(start, stop):
      x = VGGStage(self.stages[i], scaled(STAGE_CHANNELS[i], self.width), dtype=self.dtype,
                   conv_init=self.conv_init, name=f'block{i + 1}')(x)
    if features:
      return x
    if self.head == 'fc':
      head = FCHead(self.num_classes, scaled(FC_UNITS, self.width), self.dropout,
                    dtype=self.dtype, name='head')
    elif self.head == 'gap':
      head = GAPHead(self.num_classes, dtype=self.dtype, name='head')
    else:
      raise ValueError(f"model.head must be 'fc' or 'gap', got {self.head!r}")
    logits = head(x, train).astype(jnp.float32)
    if averaged:
      probs = jax.nn.softmax(logits.reshape((8, x.shape[0] // 8, -1)), axis=-1).mean(axis=0)
      return jnp.log(probs)
    return logits

  def _inputs(self, images, averaged: bool):
    """The checked, normalised input of block1 (the 8 views stacked when ``averaged``)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'VGG expects NHWC RGB images, got shape {images.shape}')
    if averaged:  # the 8 views on the batch axis, one pass through the network
      if images.shape[1] != images.shape[2]:
        raise ValueError(f'model.tta needs square images, got shape {images.shape}')
      images = jnp.concatenate(symmetries(images), axis=0)
    downsample = 2 ** len(self.stages)
    if images.shape[1] % downsample or images.shape[2] % downsample:
      raise ValueError(f'image size {images.shape[1:3]} must be a multiple of {downsample}')
    if self.conv_init not in CONV_INITS:
      raise ValueError(f'model.conv_init must be one of {tuple(CONV_INITS)}, '
                       f'got {self.conv_init!r}')
    return normalize(images.astype(jnp.float32), self.input_norm).astype(self.dtype)


def symmetries(images) -> list:
  """The 8 flips and quarter turns of ``[B, H, W, C]`` square images (identity first)."""
  out = []
  for k in range(4):
    turned = jnp.rot90(images, k, axes=(1, 2))
    out += [turned, turned[:, :, ::-1]]
  return out


VGG11 = functools.partial(VGG, stages=(1, 1, 2, 2, 2))
VGG16 = functools.partial(VGG, stages=(2, 2, 3, 3, 3))
VGG19 = functools.partial(VGG, stages=(2, 2, 4, 4, 4))


def build(model_cfg) -> VGG:
  """Builds the model named by ``model_cfg.name`` from a config (``getattr`` on this module).

  ``model_cfg.dtype`` (default 'float32') is the compute dtype; ``'auto'`` is bfloat16 on
  GPU/TPU and float32 on CPU (:func:`fedblood.backend.platform.compute_dtype`).
  """
  cls = globals().get(model_cfg.name)
  is_model = isinstance(cls, functools.partial) and cls.func is VGG or cls is VGG
  if not is_model:
    raise ValueError(f'model.name {model_cfg.name!r} is not a model in fedblood.model.models '
                     f'(try VGG, VGG11, VGG16, VGG19)')
  kwargs = dict(num_classes=model_cfg.num_classes, head=model_cfg.head, width=model_cfg.width,
                dropout=model_cfg.get('dropout', 0.5),
                input_norm=model_cfg.get('input_norm', 'imagenet'),
                conv_init=model_cfg.get('conv_init', 'lecun'),
                tta=bool(model_cfg.get('tta', False)),
                dtype=platform.compute_dtype(model_cfg.get('dtype', 'float32')))
  return cls(**kwargs)
