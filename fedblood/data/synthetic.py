"""Synthetic leukocyte centers: cell-like images whose look depends on the center.

Each image is one white cell, optionally with red cells behind it, drawn as stain concentration
maps and rendered with the Beer-Lambert law (``pixel = light * exp(-absorbance)``), like a
stained smear under a microscope. The class decides the morphology:

* neutrophil: 3-5 small nuclear lobes on an arc, pale pink cytoplasm with fine granules;
* eosinophil: a bilobed nucleus, cytoplasm packed with coarse orange-red granules;
* basophil: dark purple granules over the whole cell, hiding a roundish nucleus;
* lymphocyte: a small cell, a large round dense nucleus, a thin sky-blue rim of cytoplasm;
* monocyte: the largest cell, a large kidney-shaped (indented) paler nucleus, grey-blue cytoplasm.

The center decides the rendering (:class:`Style`): stain colours (a mixing of the absorbance
channels), stain intensity, background tint and brightness, uneven illumination, cell scale,
optical blur, sensor noise, red-cell density and class balance. So a model trained on one center
meets a colour / scale / sharpness shift on another, as with real hospitals.

Everything is vectorised over the batch with numpy: ~2,000 images of 64 px take about a second.
"""

from typing import NamedTuple

import numpy as np

from fedblood.data.layouts import CLASSES

BASO, EOS, LYM, MONO, NEUT = range(5)
MAX_LOBES = 5

# Optical density (absorbance) per unit stain, RGB. exp(-od) is the colour of a dense region:
# nucleus purple, granules orange-red (eosinophil) or dark purple (basophil), etc.
_OD_NUCLEUS = np.array([1.0, 1.5, 0.55], np.float32)
_OD_CYTOPLASM = np.array([  # per class
    [0.30, 0.45, 0.20],   # basophil: lilac
    [0.08, 0.30, 0.35],   # eosinophil: pink
    [0.40, 0.22, 0.05],   # lymphocyte: sky blue
    [0.32, 0.28, 0.14],   # monocyte: grey-blue
    [0.10, 0.22, 0.14],   # neutrophil: pale pink-lilac
], np.float32)
_OD_GRANULE = np.array([
    [1.30, 1.90, 0.90],   # basophil: dark purple
    [0.05, 0.85, 1.20],   # eosinophil: orange-red
    [0, 0, 0], [0, 0, 0],
    [0.25, 0.40, 0.20],   # neutrophil: fine, faint
], np.float32)
_OD_RBC = np.array([0.08, 0.55, 0.45], np.float32)
_GRANULE_DENSITY = np.array([0.65, 0.45, 0, 0, 0.20], np.float32)
# Chromatin density: lymphocytes dense, monocytes lacy.
_NUCLEUS_DENSITY = np.array([0.8, 0.9, 1.25, 0.75, 1.0], np.float32)
_CELL_RADIUS = np.array([0.50, 0.56, 0.40, 0.66, 0.55], np.float32)   # of the image half-width


class Style(NamedTuple):
  """How one center renders its cells (see module docstring)."""
  mixing: np.ndarray       # [3, 3] applied to absorbance vectors: stain hue / intensity
  background: np.ndarray   # [3] colour of the empty slide, in (0, 1]
  gradient: np.ndarray     # [2] linear illumination slope along x, y
  vignette: float          # darkening towards the corners
  scale: float             # cell size multiplier (magnification)
  blur: float              # gaussian sigma in pixels at 64 px (focus)
  noise: float             # sensor noise std
  rbc_rate: float          # mean number of red cells per image
  class_probs: np.ndarray  # [5] label distribution of the center


def center_style(index: int, seed: int) -> Style:
  """The rendering style of synthetic center ``index`` (independent of the number of centers)."""
  rng = np.random.default_rng([seed, index, 0])
  # Rotate the stain hue around the grey axis and change its intensity per channel; this is
  # what differs most between real labs (stain batch, protocol, camera white balance).
  angle = rng.uniform(-0.6, 0.6)
  axis = np.ones(3) / np.sqrt(3)
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
  mixing = rotation * rng.uniform(0.65, 1.35) * rng.uniform(0.8, 1.25, size=3)[None, :]
  tint = rng.uniform(0.0, 0.18, size=3)
  tint[rng.integers(3)] = 0.0  # one channel stays bright: warm, cool or greenish slides
  return Style(
      mixing=mixing.astype(np.float32),
      background=((1.0 - tint) * rng.uniform(0.82, 1.0)).astype(np.float32),
      gradient=rng.uniform(-0.15, 0.15, size=2).astype(np.float32),
      vignette=float(rng.uniform(0.0, 0.25)),
      scale=float(rng.uniform(0.75, 1.25)),
      blur=float(rng.uniform(0.3, 1.6)),
      noise=float(rng.uniform(0.005, 0.03)),
      rbc_rate=float(rng.uniform(0.5, 3.0)),
      class_probs=rng.dirichlet(np.full(len(CLASSES), 6.0)).astype(np.float32),
  )


def _soft_disc(dist, radius, edge):
  """1 inside ``radius``, 0 outside, with a linear anti-aliased edge ``edge`` wide."""
  t = (radius - dist) * np.float32(1 / edge) + np.float32(0.5)
  return np.minimum(np.maximum(t, 0, out=t), 1, out=t)


def _uniform(rng, low, high, n):
  return rng.uniform(low, high, n).astype(np.float32)


def _coarse_noise(rng, n, size, grid, smooth=False):
  """Per-image random field on a ``grid`` x ``grid`` lattice, upsampled to ``size``.

  Nearest upsampling gives grains (granules); ``smooth`` interpolates bilinearly (chromatin).
  """
  field = rng.random((n, grid, grid), dtype=np.float32)
  if not smooth:
    idx = (np.arange(size) * grid) // size
    return field[:, idx][:, :, idx]
  pos = np.linspace(0, grid - 1, size, dtype=np.float32)
  lo = np.minimum(pos.astype(int), grid - 2)
  w = pos - lo
  field = field[:, lo] * (1 - w)[:, None] + field[:, lo + 1] * w[:, None]
  return field[:, :, lo] * (1 - w) + field[:, :, lo + 1] * w


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
  x = np.arange(size)
  k = np.exp(-0.5 * ((x[:, None] - x[None, :]) / max(sigma, 1e-3)) ** 2)
  return (k / k.sum(1, keepdims=True)).astype(np.float32)


def _column(v):
  return np.asarray(v, np.float32)[:, None, None]


def _nucleus(rng, labels, cx, cy, radius, xx, yy, edge):
  """Nucleus concentration [N, S, S]: lobes (max of discs) minus monocytes' indentation."""
  n = len(labels)
  theta0 = rng.uniform(0, 2 * np.pi, n)
  num = np.select([labels == NEUT, labels == EOS], [rng.integers(3, MAX_LOBES + 1, n), 2], 1)
  lobe_r = np.select([labels == NEUT, labels == EOS, labels == LYM, labels == MONO],
                     [0.24, 0.34, 0.80, 0.62], 0.52) * radius
  spread = np.select([labels == NEUT, labels == EOS], [0.45, 0.38], 0.0) * radius
  arc = np.where(num > 1, rng.uniform(0.9, 1.3, n) * np.pi / np.maximum(num - 1, 1), 0)
  out = np.zeros((n, yy.shape[1], xx.shape[2]), np.float32)
  for j in range(MAX_LOBES):
    # Lobes sit on an arc around the cell center (neutrophil 'C'/'S' shapes, eosinophil pair).
    t = theta0 + (j - (num - 1) / 2) * arc
    lx = cx + spread * np.cos(t) + rng.normal(0, 0.03, n) * radius
    ly = cy + spread * np.sin(t) + rng.normal(0, 0.03, n) * radius
    r = np.where(j < num, lobe_r * rng.uniform(0.85, 1.15, n), 0.0)
    if not r.any():
      continue
    d = np.hypot(xx - _column(lx), yy - _column(ly))
    np.maximum(out, _soft_disc(d, _column(r), edge), out=out)
  # Monocyte: a disc bitten out of one side gives the kidney / horseshoe shape.
  bite = _column(np.where(labels == MONO, 0.42 * radius, 0.0))
  bx = _column(cx + 0.62 * radius * np.cos(theta0))
  by = _column(cy + 0.62 * radius * np.sin(theta0))
  return out * (1 - _soft_disc(np.hypot(xx - bx, yy - by), bite, edge))


def _render(rng, labels, style: Style, size: int) -> np.ndarray:
  """One chunk of :func:`generate`."""
  n = len(labels)
  coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
  yy, xx = coords[None, :, None], coords[None, None, :]
  edge = 2.0 / size  # about one pixel of anti-aliased edge
  radius = _CELL_RADIUS[labels] * np.float32(style.scale) * _uniform(rng, 0.9, 1.1, n)
  cx, cy = rng.normal(0, 0.05, (2, n)).astype(np.float32)

  # Cell outline: a slightly elliptical, wobbly disc.
  dx, dy = xx - _column(cx), yy - _column(cy)
  ang = np.arctan2(dy, dx)
  wobble = (1 + 0.05 * np.cos(3 * ang + _column(_uniform(rng, 0, 6.3, n)))
            + 0.06 * np.cos(2 * ang + _column(_uniform(rng, 0, 6.3, n))))
  cell = _soft_disc(np.hypot(dx, dy) / wobble, _column(radius), edge)
  nucleus = _nucleus(rng, labels, cx, cy, radius, xx, yy, edge) * cell
  cytoplasm = cell * (1 - nucleus)
  granules = (_coarse_noise(rng, n, size, 40) < _column(_GRANULE_DENSITY[labels])) * cell
  # Basophil granules cover the nucleus too; the others' sit in the cytoplasm only.
  granules *= np.where(_column(labels == BASO), np.float32(1), 1 - nucleus)
  chromatin = 0.75 + 0.5 * _coarse_noise(rng, n, size, 12, smooth=True)

  # Red cells behind the white cell: pale-centred discs at random places.
  rbc = np.zeros_like(cell)
  count = rng.poisson(style.rbc_rate, n)
  for j in range(4):
    ox, oy = rng.uniform(-1.1, 1.1, (2, n))
    r = _column(np.where(j < count, rng.uniform(0.28, 0.36, n) * style.scale, 0.0))
    if not r.any():
      continue
    d = np.hypot(xx - _column(ox), yy - _column(oy))
    disc = _soft_disc(d, r, edge) * (1 - 0.5 * _soft_disc(d, 0.5 * r, 3 * edge))
    np.maximum(rbc, disc, out=rbc)
  rbc *= 1 - cell

  # Absorbance = sum over stains of concentration x absorbance vector, then the center's
  # mixing (folded into the vectors: 4x3 per image instead of a per-pixel 3x3 product).
  maps = (nucleus * chromatin * _column(_NUCLEUS_DENSITY[labels]), cytoplasm, granules, rbc)
  vectors = np.stack([np.broadcast_to(_OD_NUCLEUS, (n, 3)), _OD_CYTOPLASM[labels],
                      _OD_GRANULE[labels], np.broadcast_to(_OD_RBC, (n, 3))], 1) @ style.mixing
  # Slide-to-slide variation inside a center: stain intensity and brightness per image.
  vectors *= rng.uniform(0.8, 1.2, (n, 1, 1)).astype(np.float32)
  light = (_column(_uniform(rng, 0.94, 1.06, n)) + style.gradient[0] * xx
           + style.gradient[1] * yy - style.vignette / 2 * (xx ** 2 + yy ** 2))
  img = np.empty((n, size, size, 3), np.float32)
  for c in range(3):
    od = sum(m * _column(vectors[:, k, c]) for k, m in enumerate(maps))
    img[..., c] = (style.background[c] * light) * np.exp(-od)
  blur = _blur_matrix(size, style.blur * size / 64)
  # Separable blur, one batched matmul per axis: columns, then rows (on a transposed copy).
  img = np.matmul(blur, img.reshape(n, size, size * 3)).reshape(n, size, size, 3)
  img = np.matmul(blur, img.transpose(0, 2, 1, 3).reshape(n, size, size * 3))
  img = img.reshape(n, size, size, 3).transpose(0, 2, 1, 3)
  # Uniform sensor noise with the style's std (cheaper to draw than gaussian: docs/performance.md).
  img += (rng.random(img.shape, dtype=np.float32) - 0.5) * np.float32(style.noise * 12 ** 0.5)
  img *= 255
  np.rint(img, out=img)
  return np.minimum(np.maximum(img, 0, out=img), 255, out=img).astype(np.uint8)


def generate(labels, style: Style, seed, size: int = 64, chunk: int = 256) -> np.ndarray:
  """Renders one image per label in the given style.

  Args:
    labels: int [N] class indices.
    style: the center's :class:`Style`.
    seed: int or sequence of ints for numpy's default_rng (morphology, positions, noise).
    size: image side in pixels.
    chunk: images rendered at once (bounds memory at large sizes; part of the seed).

  Returns:
    uint8 [N, size, size, 3].
  """
  labels = np.asarray(labels)
  seed = list(np.atleast_1d(seed))
  out = np.empty((len(labels), size, size, 3), np.uint8)
  for i in range(0, len(labels), chunk):
    rng = np.random.default_rng(seed + [i // chunk])
    out[i:i + chunk] = _render(rng, labels[i:i + chunk], style, size)
  return out


def center_labels(index: int, num_images: int, seed: int) -> np.ndarray:
  """The labels of synthetic center ``index`` (int32 [N]), drawn without making an image."""
  style = center_style(index, seed)
  rng = np.random.default_rng([seed, index, 1])
  labels = rng.choice(len(CLASSES), size=num_images, p=style.class_probs).astype(np.int32)
  # Every class present at least twice, so stratified splits and per-class metrics make sense.
  labels[:2 * len(CLASSES)] = np.tile(np.arange(len(CLASSES)), 2)
  return labels


def file_names(labels) -> list[str]:
  """The names a synthetic center's images are listed under (``<class>/<index>.png``)."""
  return [f'{CLASSES[l]}/{i:05d}.png' for i, l in enumerate(labels)]


def make_center(index: int, num_images: int, seed: int, size: int = 64):
  """Images and labels of synthetic center ``index``: (uint8 [N, S, S, 3], int32 [N])."""
  labels = center_labels(index, num_images, seed)
  images = generate(labels, center_style(index, seed), [seed, index, 2], size)
  return images, labels
