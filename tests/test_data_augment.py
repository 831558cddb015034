"""Augmentation: jittable, per image, dihedral geometry exact, colour kept in [0, 1]."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedblood.data import augment, default_config


def _cfg(**overrides):
  cfg = default_config().augment
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


_NO_COLOUR = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, stain=0.0)


# Every batch has 16 images: the random draw (the costly part to compile) is then compiled once
# for the whole file; the rest runs eagerly.
_run = augment


def _images(b=16, s=16):
  return jax.random.uniform(jax.random.key(0), (b, s, s, 3))


def test_default_is_jittable_in_range_and_per_image():
  x = jnp.repeat(_images(1), 16, axis=0)  # 16 copies of one image
  fn = jax.jit(lambda rng, x: augment(rng, x, _cfg()))
  y = fn(jax.random.key(1), x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  flat = np.asarray(y).reshape(16, -1)
  assert len({row.tobytes() for row in flat}) == 16  # every copy got its own draw
  np.testing.assert_array_equal(y, fn(jax.random.key(1), x))
  assert not np.array_equal(y, fn(jax.random.key(2), x))


def test_disabled_or_all_zero_is_identity():
  x = _images()
  assert augment(jax.random.key(0), x, _cfg(enabled=False)) is x
  y = _run(jax.random.key(0), x, _cfg(flip=False, rot90=False, **_NO_COLOUR))
  np.testing.assert_array_equal(y, x)


def test_geometry_only_gives_the_8_symmetries_of_the_square():
  x = np.asarray(_images())
  seen = set()
  for seed in range(4):
    y = np.asarray(_run(jax.random.key(seed), x, _cfg(**_NO_COLOUR)))
    for i in range(len(x)):
      variants = [np.rot90(x[i], k) for k in range(4)]
      variants += [v[:, ::-1] for v in variants]
      match = [j for j, v in enumerate(variants) if np.array_equal(v, y[i])]
      assert match, f'image {i} is not a flip/rotation of its input'
      seen.add(match[0])
  assert len(seen) == 8  # all of them occur in 64 draws


def test_rot90_only_and_flip_only():
  x = np.asarray(_images())
  y = np.asarray(_run(jax.random.key(4), x, _cfg(flip=False, **_NO_COLOUR)))
  for a, b in zip(x, y):
    assert any(np.array_equal(np.rot90(a, k), b) for k in range(4))
  y = np.asarray(_run(jax.random.key(4), x, _cfg(rot90=False, **_NO_COLOUR)))
  for a, b in zip(x, y):
    assert np.array_equal(a, b) or np.array_equal(a[:, ::-1], b)


def test_rot90_needs_square_images():
  with pytest.raises(ValueError, match='rot90'):
    augment(jax.random.key(0), jnp.zeros((2, 8, 12, 3)), _cfg())


def test_colour_jitter_ranges():
  grey = jnp.full((16, 4, 4, 3), 0.5)
  # Saturation and hue leave grey grey (they act on chroma only).
  y = _run(jax.random.key(5), grey, _cfg(flip=False, rot90=False, brightness=0.0,
                                            contrast=0.0, stain=0.0, saturation=0.5, hue=0.3))
  np.testing.assert_allclose(y, grey, atol=1e-5)
  # Brightness shifts every pixel of an image by one amount within +-0.1.
  y = np.asarray(_run(jax.random.key(6), grey, _cfg(flip=False, rot90=False,
                                                       **dict(_NO_COLOUR, brightness=0.1))))
  shift = y[:, 0, 0, 0] - 0.5
  assert np.abs(shift).max() <= 0.1 + 1e-6 and shift.std() > 0.03
  np.testing.assert_allclose(y, np.broadcast_to(y[:, :1, :1, :1], y.shape), atol=1e-6)
  # Hue rotates chroma: a red image changes colour but keeps its luma.
  red = jnp.broadcast_to(jnp.array([0.6, 0.45, 0.45]), (16, 2, 2, 3))
  y = np.asarray(_run(jax.random.key(7), red, _cfg(flip=False, rot90=False,
                                                      **dict(_NO_COLOUR, hue=0.1))))
  luma = y @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(luma, 0.6 * 0.299 + 0.45 * 0.587 + 0.45 * 0.114, atol=2e-3)
  assert np.abs(y - np.asarray(red)).max() > 0.02


def test_strong_jitter_stays_in_unit_range():
  x = _images()
  y = _run(jax.random.key(8), x, _cfg(brightness=0.8, contrast=0.9, saturation=0.9,
                                         hue=0.5, stain=0.9))
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


# --- What survives model.input_norm='per_image' -----------------------------------------------

_OFF = dict(flip=False, rot90=False, **_NO_COLOUR)
# The module (the name fedblood.data.augment is the function).
augment_lib = sys.modules['fedblood.data.augment']


def _standardised(x):
  from fedblood.model.models import normalize  # pylint: disable=g-import-not-at-top
  return np.asarray(normalize(jnp.asarray(x), 'per_image'))


def _cells(b=16, s=32):
  """Synthetic cell images (a stained cell on a bright background), not uniform noise."""
  from fedblood.data import synthetic  # pylint: disable=g-import-not-at-top
  images, _ = synthetic.make_center(1, b, 0, s)
  return jnp.asarray(images, jnp.float32) / 255.0


def _change(cfg, x):
  """Relative change of the standardised input that ``cfg``'s augmentation makes."""
  a, b = _standardised(x), _standardised(augment(jax.random.key(3), x, cfg))
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_per_channel_gain_is_cancelled_by_per_image_standardisation():
  """Why od_stain exists: a stain gain that clips nothing leaves the network's input unchanged."""
  x = _cells() * 0.5 + 0.25  # in [0.25, 0.75]: these ranges clip nothing
  for knob, value in (('stain', 0.15), ('brightness', 0.1), ('contrast', 0.25)):
    assert _change(_cfg(**{**_OFF, knob: value}), x) < 1e-4, knob


@pytest.mark.parametrize('knob, value', [('od_stain', 0.3), ('zoom', 0.3), ('blur', 1.0),
                                         ('rand_conv', 1.0)])
def test_od_stain_zoom_blur_and_rand_conv_change_the_standardised_input(knob, value):
  x = _cells() * 0.5 + 0.25
  assert _change(_cfg(**{**_OFF, knob: value}), x) > 0.05
  assert _change(_cfg(**{**_OFF, knob: 0.0}), x) == 0.0


def test_od_stain_identity_at_factor_one_and_range():
  x = _cells()
  np.testing.assert_allclose(augment_lib._od_stain(jax.random.key(0), x, 0.0),
                             jnp.maximum(x, augment_lib._OD_FLOOR), rtol=1e-5, atol=1e-6)
  y = augment(jax.random.key(1), x, _cfg(**{**_OFF, 'od_stain': 0.5}))
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_zoom_magnifies_inside_the_frame():
  """A constant image stays constant (no padding enters); an edge moves outwards."""
  flat = jnp.full((16, 32, 32, 3), 0.4)
  np.testing.assert_allclose(augment(jax.random.key(0), flat, _cfg(**{**_OFF, 'zoom': 0.5})),
                             flat, atol=1e-6)
  half = jnp.zeros((16, 32, 32, 3)).at[:, :, 16:].set(1.0)  # right half white
  y = np.asarray(augment(jax.random.key(0), half, _cfg(**{**_OFF, 'zoom': 0.5})))
  assert y.shape == half.shape and not np.allclose(y, half)


def test_new_jitters_leave_the_other_draws_unchanged():
  """Zoom, blur and RandConv have their own keys: on a constant image (none changes it) the
  colours drawn match."""
  flat = jnp.full((16, 32, 32, 3), 0.4)
  base = augment(jax.random.key(5), flat, _cfg())
  np.testing.assert_allclose(augment(jax.random.key(5), flat, _cfg(zoom=0.4)), base, atol=1e-6)
  np.testing.assert_allclose(augment(jax.random.key(5), flat, _cfg(blur=1.5)), base, atol=1e-6)
  # (RandConv brings a flat image to its own mean, a float32 mean of 1024 pixels: 1e-5.)
  np.testing.assert_allclose(augment(jax.random.key(5), flat, _cfg(rand_conv=1.0)), base,
                             atol=5e-5)


def test_blur_is_a_gaussian_of_the_drawn_sigma_with_mirrored_borders():
  """Each image equals scipy's Gaussian filter (mirrored borders, the same 2R + 1 taps) at the
  sigma drawn for it, a different sigma per image in [0, blur]."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  x, rng, sigma_max = _cells(), jax.random.key(7), 1.5
  y = np.asarray(augment_lib._blur(rng, x, sigma_max))
  sigma = np.asarray(jax.random.uniform(rng, (x.shape[0],))) * sigma_max
  assert sigma.min() < 0.5 < 1.0 < sigma.max() <= sigma_max
  radius = int(np.ceil(3 * sigma_max))
  for image, s, out in zip(np.asarray(x), sigma, y):
    want = ndimage.gaussian_filter(image, (s, s, 0), mode='mirror', truncate=radius / s)
    np.testing.assert_allclose(out, want, atol=2e-6)


def test_blur_removes_fine_detail_the_more_the_wider_and_nothing_at_zero():
  x = jnp.broadcast_to(_images(1), (16, 16, 16, 3))  # one image of pixel noise: all fine detail
  fine = lambda v: np.abs(np.diff(np.asarray(v), axis=1)).mean(axis=(1, 2, 3))
  rng = jax.random.fold_in(jax.random.key(2), augment_lib._BLUR_KEY)
  sigma = np.asarray(jax.random.uniform(rng, (x.shape[0],))) * 2.0
  left = fine(augment(jax.random.key(2), x, _cfg(**{**_OFF, 'blur': 2.0}))) / fine(x)
  assert left.max() <= 1.0 and left.mean() < 0.6
  order = np.argsort(sigma)
  assert np.all(np.diff(left[order]) < 1e-6)  # a wider blur leaves less
  np.testing.assert_allclose(augment_lib._blur(jax.random.key(2), x, 1e-4), x, atol=1e-6)


def test_rand_conv_is_a_mirrored_correlation_at_the_image_statistics_mixed_in():
  """Against scipy: each image correlated with its own 3 -> 3 channel kernel (mirrored borders),
  brought to the image's per-channel mean and std, then mixed with the image."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  x = _cells()[:4]
  kernels = jax.random.normal(jax.random.key(1), (4, 7, 7, 3, 3)) * 0.2
  mix = jnp.asarray([0.0, 0.3, 0.7, 1.0])
  y = np.asarray(augment_lib._convolve_mix(x, kernels, mix))
  for image, kernel, a, out in zip(np.asarray(x, np.float64), np.asarray(kernels, np.float64),
                                   np.asarray(mix), y):
    c = np.stack([sum(ndimage.correlate(image[..., i], kernel[:, :, i, o], mode='mirror')
                      for i in range(3)) for o in range(3)], -1)
    c = image.mean((0, 1)) + (c - c.mean((0, 1))) * image.std((0, 1)) / c.std((0, 1))
    np.testing.assert_allclose(out, a * image + (1 - a) * c, atol=2e-5)


def test_rand_conv_draws_the_papers_sizes_for_the_asked_share_of_images():
  """On a one-pixel image the convolution's footprint is its kernel: 1, 3, 5 or 7 pixels wide,
  each drawn; an image not drawn (share 1 - probability) is returned as it was."""
  b = 256
  dot = jnp.zeros((b, 15, 15, 3)).at[:, 7, 7, :].set(1.0)
  y = np.asarray(augment_lib._rand_conv(jax.random.key(4), dot, 0.5))
  changed = np.abs(y - y[:, :1, :1]).max(-1) > 0      # differs from the corner: the footprint
  untouched = np.all(y == np.asarray(dot), axis=(1, 2, 3))
  widths = changed.any(1).sum(-1)
  assert set(widths[~untouched]) == {1, 3, 5, 7}
  assert 0.4 < untouched.mean() < 0.6
  for image_changed, width in zip(changed[~untouched], widths[~untouched]):
    lo, hi = 7 - width // 2, 7 + width // 2 + 1
    assert image_changed[lo:hi, lo:hi].all() and image_changed.sum() == width ** 2
  every = np.asarray(augment_lib._rand_conv(jax.random.key(4), dot, 1.0))
  assert not np.all(every == np.asarray(dot), axis=(1, 2, 3)).any()  # probability 1: all drawn

