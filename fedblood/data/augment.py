"""Random augmentation of image batches in JAX (jittable, a different draw per image).

Cells have no orientation, so the 8 flips / 90-degree rotations of a square crop are all valid
images of the same cell. Centers differ mostly in colour (stain, lamp, camera), so colour jitter
(brightness, contrast, saturation, hue, and per-channel stain intensity) makes a model see other
centers' colours. Images stay float32 in [0, 1].

Usage::

  images = augment(jax.random.fold_in(rng, step), images, config.data.augment)  # inside jit
"""

import jax
import jax.numpy as jnp
import numpy as np

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane, saturation its scale.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def _dihedral(image, k, flip):
  """One of the 8 symmetries of a square: ``k`` quarter turns, then an optional mirror."""
  image = jax.lax.switch(k, [lambda x, i=i: jnp.rot90(x, i, axes=(0, 1)) for i in range(4)], image)
  return jnp.where(flip, image[:, ::-1], image)


def _colour(image, rng, cfg):
  """Colour / stain jitter of one [H, W, 3] image in [0, 1]."""
  r_bright, r_contrast, r_sat, r_hue, r_stain = jax.random.split(rng, 5)
  if cfg.stain:
    # Per-channel intensity: a crude stain / white-balance change.
    image = image * jax.random.uniform(r_stain, (3,), minval=1 - cfg.stain, maxval=1 + cfg.stain)
  if cfg.brightness:
    image = image + jax.random.uniform(r_bright, (), minval=-cfg.brightness,
                                       maxval=cfg.brightness)
  if cfg.contrast:
    mean = image.mean(axis=(0, 1), keepdims=True)
    factor = jax.random.uniform(r_contrast, (), minval=1 - cfg.contrast, maxval=1 + cfg.contrast)
    image = mean + (image - mean) * factor
  if cfg.saturation or cfg.hue:
    scale = jax.random.uniform(r_sat, (), minval=1 - cfg.saturation, maxval=1 + cfg.saturation)
    angle = 2 * jnp.pi * jax.random.uniform(r_hue, (), minval=-cfg.hue, maxval=cfg.hue)
    cos, sin, zero = scale * jnp.cos(angle), scale * jnp.sin(angle), jnp.zeros(())
    chroma = jnp.stack([jnp.stack([zero + 1, zero, zero]), jnp.stack([zero, cos, -sin]),
                        jnp.stack([zero, sin, cos])])
    image = image @ (_YIQ_TO_RGB @ chroma @ _RGB_TO_YIQ).T
  return jnp.clip(image, 0.0, 1.0)


def augment(rng, images, cfg):
  """Randomly flips, rotates and colour-jitters each image of a batch.

  Args:
    rng: a JAX PRNG key (fold in the step / center so every batch differs).
    images: float32 [B, H, W, 3] in [0, 1]; H == W when ``cfg.rot90``.
    cfg: the ``data.augment`` ConfigDict: ``enabled``, ``flip``, ``rot90`` (bools) and the
      jitter ranges ``brightness`` (additive), ``contrast``, ``saturation``, ``stain``
      (multiplicative, 1 +- value) and ``hue`` (fraction of the colour wheel). Read at trace
      time: a zero range costs nothing.

  Returns:
    float32 [B, H, W, 3] in [0, 1]; the input itself when ``cfg.enabled`` is False.
  """
  if not cfg.enabled:
    return images
  if cfg.rot90 and images.shape[1] != images.shape[2]:
    raise ValueError(f'data.augment.rot90 needs square images, got shape {images.shape}')

  def one(image, key):
    r_geo, r_flip, r_col = jax.random.split(key, 3)
    k = jax.random.randint(r_geo, (), 0, 4) if cfg.rot90 else 0
    flip = jax.random.bernoulli(r_flip) if cfg.flip else False
    if cfg.rot90 or cfg.flip:
      image = _dihedral(image, k, flip)
    return _colour(image, r_col, cfg)

  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(one)(images.astype(jnp.float32), keys)
