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


def _uniform(u, spread):
  """Maps u in [0, 1) to [-spread, spread)."""
  return (2 * u - 1) * spread


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
  x = images.astype(jnp.float32)
  # One draw for the whole batch, a row of parameters per image: cheap to compile and run.
  u = jax.random.uniform(rng, (x.shape[0], 10))
  per_image = lambda v: v[:, None, None, None]

  if cfg.rot90:  # the 8 symmetries of the square: 0-3 quarter turns, then maybe a mirror
    k = jnp.floor(u[:, 0] * 4).astype(jnp.int32)
    turned = x
    for i in range(1, 4):
      turned = jnp.where(per_image(k == i), jnp.rot90(x, i, axes=(1, 2)), turned)
    x = turned
  if cfg.flip:
    x = jnp.where(per_image(u[:, 1] < 0.5), x[:, :, ::-1], x)

  if cfg.stain:  # per-channel intensity: a crude stain / white-balance change
    x = x * (1 + _uniform(u[:, None, None, 2:5], cfg.stain))
  if cfg.brightness:
    x = x + per_image(_uniform(u[:, 5], cfg.brightness))
  if cfg.contrast:
    mean = x.mean(axis=(1, 2), keepdims=True)
    x = mean + (x - mean) * per_image(1 + _uniform(u[:, 6], cfg.contrast))
  if cfg.saturation or cfg.hue:
    # In YIQ, saturation scales the (I, Q) chroma plane and hue rotates it; Y (luma) is kept.
    scale = 1 + _uniform(u[:, 7], cfg.saturation)
    angle = 2 * jnp.pi * _uniform(u[:, 8], cfg.hue)
    cos, sin = scale * jnp.cos(angle), scale * jnp.sin(angle)
    one, zero = jnp.ones_like(cos), jnp.zeros_like(cos)
    chroma = jnp.stack([jnp.stack([one, zero, zero], -1), jnp.stack([zero, cos, -sin], -1),
                        jnp.stack([zero, sin, cos], -1)], -2)                    # [B, 3, 3]
    mix = jnp.asarray(_YIQ_TO_RGB) @ chroma @ jnp.asarray(_RGB_TO_YIQ)         # [B, 3, 3]
    x = jnp.einsum('bhwc,bdc->bhwd', x, mix)
  return jnp.clip(x, 0.0, 1.0)
