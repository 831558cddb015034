"""Random augmentation of image batches in JAX (jittable, a different draw per image).

Cells have no orientation, so the 8 flips / 90-degree rotations of a square crop are all valid
images of the same cell. Centers differ mostly in colour (stain, lamp, camera), so colour jitter
(brightness, contrast, saturation, hue, and per-channel stain intensity) makes a model see other
centers' colours. Images stay float32 in [0, 1].

What survives ``model.input_norm='per_image'`` (each image's channels standardised): a per-channel
gain or offset is removed by it, so ``brightness``, ``contrast`` and ``stain`` act only through
the clipping of bright background; ``hue`` and ``saturation`` mix the channels and survive. Two
jitters are built to survive it: ``od_stain`` scales each stain's concentration in optical
density (``-log I``, the Beer-Lambert space, in the HED basis of Ruifrok & Johnston 2001 as
scikit-image's ``rgb2hed``; Tellez et al. 2018's HED jitter without its bias term, which is a
per-channel gain in RGB), a non-linear change of every channel; and ``zoom``, a random
magnification of up to ``1 + zoom`` at a random position, for the cell-size differences between
optics; and ``blur``, a Gaussian blur of a random width, for the optics' sharpness (at 64 px the
centers' high-frequency content differs fivefold, docs/results.md); and ``rand_conv``, random
convolutions (Xu et al., ICLR 2021, "RandConv"): with that probability an image passes through a
convolution of random weights and random size (1, 3, 5 or 7 pixels), which maps its colours and
local textures to new ones while keeping the shapes, mixed with the image by a random weight, so
that a network learns the cell's shape rather than one center's textures (domain
generalisation: centers that never joined). Each is drawn from its own key, so turning it on
leaves the other draws unchanged.

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
# Optical density <-> stain concentrations (haematoxylin, eosin, DAB), rows the stains' OD
# vectors: scikit-image's rgb_from_hed (Ruifrok & Johnston 2001).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                          [0.07, 0.99, 0.11],
                          [0.27, 0.57, 0.78]], np.float32)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)
_OD_FLOOR = 1e-3  # intensity floor before -log: an optical density of at most ~6.9
# Keys of the jitters added after the first draw (fold_in constants: never reuse one).
_ZOOM_KEY, _OD_KEY, _BLUR_KEY, _RAND_CONV_KEY = 1, 2, 3, 4
# RandConv's kernel sizes (drawn uniformly per image; the paper's {1, 3, 5, 7}).
RAND_CONV_SIZES = (1, 3, 5, 7)


def _uniform(u, spread):
  """Maps u in [0, 1) to [-spread, spread)."""
  return (2 * u - 1) * spread


def augment(rng, images, cfg):
  """Randomly flips, rotates and colour-jitters each image of a batch.

  Args:
    rng: a JAX PRNG key (fold in the step / center so every batch differs).
    images: float32 [B, H, W, 3] in [0, 1]; H == W when ``cfg.rot90``.
    cfg: the ``data.augment`` ConfigDict: ``enabled``, ``flip``, ``rot90`` (bools), the jitter
      ranges ``brightness`` (additive), ``contrast``, ``saturation``, ``stain`` (1 +- value),
      ``hue`` (fraction of the colour wheel), ``od_stain`` (each stain's optical density times
      1 +- value), ``zoom`` (magnification in [1, 1 + value]), ``blur`` (sigma in [0, value]
      px), ``rand_conv`` (a probability); absent in older configs: 0; a zero costs nothing.

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
  if cfg.get('zoom', 0.0):
    x = _zoom(jax.random.fold_in(rng, _ZOOM_KEY), x, cfg.zoom)
  if cfg.get('od_stain', 0.0):
    x = _od_stain(jax.random.fold_in(rng, _OD_KEY), x, cfg.od_stain)
  if cfg.get('blur', 0.0):
    x = _blur(jax.random.fold_in(rng, _BLUR_KEY), x, cfg.blur)
  if cfg.get('rand_conv', 0.0):
    x = _rand_conv(jax.random.fold_in(rng, _RAND_CONV_KEY), x, cfg.rand_conv)

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


def _zoom(rng, x, zoom: float):
  """Each image magnified by a factor in [1, 1 + zoom] about a random point, bilinear, same size.

  An output pixel p shows the input at ``(p - t) / s``, with ``t`` drawn in ``[S - S s, 0]`` so
  the window stays inside the image (no padding).
  """
  size = jnp.asarray(x.shape[1:3], jnp.float32)
  u = jax.random.uniform(rng, (x.shape[0], 3))
  scale = 1 + u[:, 0] * zoom
  shift = u[:, 1:] * (size - size * scale[:, None])
  one = lambda image, s, t: jax.image.scale_and_translate(
      image, image.shape, (0, 1), jnp.stack([s, s]), t, 'linear', antialias=False)
  return jax.vmap(one)(x, scale, shift)


def _od_stain(rng, x, spread: float):
  """Each stain's concentration (optical density in the HED basis) scaled by 1 +- ``spread``."""
  factors = 1 + _uniform(jax.random.uniform(rng, (x.shape[0], 1, 1, 3)), spread)
  od = -jnp.log(jnp.maximum(x, _OD_FLOOR))
  stains = od @ jnp.asarray(_HED_FROM_RGB)
  return jnp.exp(-(stains * factors) @ jnp.asarray(_RGB_FROM_HED))


def _blur(rng, x, sigma_max: float):
  """Each image blurred by a Gaussian of sigma drawn in ``[0, sigma_max]`` pixels.

  Separable, ``2 R + 1`` taps per axis with ``R = ceil(3 sigma_max)``, the border mirrored (so a
  constant image stays constant and no dark frame enters). Sigma 0 is the image itself.
  """
  radius = max(int(np.ceil(3 * sigma_max)), 1)
  sigma = jax.random.uniform(rng, (x.shape[0],)) * sigma_max
  d2 = jnp.arange(-radius, radius + 1, dtype=jnp.float32) ** 2
  # Sigma -> 0 gives a delta: exp(-d^2 / tiny) is 1 at d = 0 and 0 elsewhere.
  taps = jnp.exp(-d2 / (2 * jnp.maximum(sigma[:, None], 1e-3) ** 2))
  taps = taps / taps.sum(-1, keepdims=True)                                 # [B, 2R + 1]
  size_h, size_w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode='reflect')
  x = sum(taps[:, i, None, None, None] * padded[:, i:i + size_h] for i in range(2 * radius + 1))
  padded = jnp.pad(x, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode='reflect')
  return sum(taps[:, i, None, None, None] * padded[:, :, i:i + size_w]
             for i in range(2 * radius + 1))


def _rand_conv(rng, x, probability: float):
  """RandConv: each image, with ``probability``, through a random convolution mixed with it.

  Per image: a kernel size k drawn from :data:`RAND_CONV_SIZES`, weights ~ N(0, 1 / (3 k^2))
  (3 input channels to 3 output channels, the paper's Kaiming-normal draw) and a mixing weight
  a ~ U(0, 1); the output ``a x + (1 - a) c``, where ``c`` is the convolution (mirrored borders)
  brought to the image's own per-channel mean and standard deviation, so it stays in the
  image's range (the network's per-image standardisation would remove that scale anyway).
  """
  keys = jax.random.split(rng, 3)
  batch = x.shape[0]
  weights = jax.random.normal(keys[0], (batch, 7, 7, 3, 3))
  u = jax.random.uniform(keys[1], (batch, 3))
  size = jnp.asarray(RAND_CONV_SIZES)[jnp.floor(u[:, 0] * len(RAND_CONV_SIZES)).astype(jnp.int32)]
  offset = jnp.abs(jnp.arange(7) - 3)                          # distance from the kernel centre
  inside = (2 * offset[None, :] + 1 <= size[:, None]).astype(jnp.float32)          # [B, 7]
  mask = inside[:, :, None] * inside[:, None, :]                                    # [B, 7, 7]
  std = 1 / jnp.sqrt(3.0 * size.astype(jnp.float32) ** 2)
  kernels = weights * (mask * std[:, None, None])[..., None, None]
  apply = u[:, 1] < probability
  mix = jnp.where(apply, u[:, 2], 1.0)
  return _convolve_mix(x, kernels, mix)


def _convolve_mix(x, kernels, mix):
  """``mix x + (1 - mix) c`` per image, ``c`` the image correlated with its own [7, 7, 3, 3]
  kernel (mirrored borders, :func:`_correlate`) and brought to the image's per-channel mean
  and std."""
  out = _correlate(x, kernels)
  mean, std = x.mean(axis=(1, 2), keepdims=True), x.std(axis=(1, 2), keepdims=True)
  out_mean, out_std = out.mean(axis=(1, 2), keepdims=True), out.std(axis=(1, 2), keepdims=True)
  out = mean + (out - out_mean) * (std / jnp.maximum(out_std, 1e-6))
  mix = mix[:, None, None, None]
  return mix * x + (1 - mix) * out


def _correlate(x, kernels):
  """Each image [H, W, 3] correlated with its own [7, 7, 3, 3] kernel, borders mirrored.

  Channels first, each (tap, input, output) one multiply-add over whole [B, H, W] planes: the
  441 fuse into one loop, several times faster on XLA:CPU than a grouped convolution with the
  batch as groups (bench/bench_augment.py).
  """
  _, height, width, _ = x.shape
  planes = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode='reflect').transpose(3, 0, 1, 2)
  out = [0.0, 0.0, 0.0]
  for dy in range(7):
    for dx in range(7):
      window = planes[:, :, dy:dy + height, dx:dx + width]
      for i in range(3):
        for o in range(3):
          out[o] = out[o] + window[i] * kernels[:, dy, dx, i, o, None, None]
  return jnp.stack(out, -1)
