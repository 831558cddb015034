"""Decoding every kind of image file into 8-bit RGB, fitting to a square, and broken files."""

import io

import numpy as np
from PIL import Image
import pytest

from fedblood.data import images
from fake_images import write_image, write_png16_rgb


def _decode_full(path):
  with open(path, 'rb') as f:
    return np.asarray(images.open_rgb(f.read(), str(path)))


def test_grayscale_is_replicated(tmp_path):
  arr = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
  Image.fromarray(arr, 'L').save(tmp_path / 'g.png')
  out = _decode_full(tmp_path / 'g.png')
  assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
  np.testing.assert_array_equal(out, np.repeat(arr[..., None], 3, -1))


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
  arr = np.array([[0, 257, 32896, 65535]], np.uint16)
  Image.fromarray(arr).save(tmp_path / 'g16.png')
  assert Image.open(tmp_path / 'g16.png').mode.startswith('I')
  np.testing.assert_array_equal(_decode_full(tmp_path / 'g16.png')[..., 0], [[0, 1, 128, 255]])


def test_48bit_rgb_png(tmp_path):
  arr = np.array([[[0, 65535, 32896], [257, 514, 65535]]], np.uint16)
  write_png16_rgb(tmp_path / 'c16.png', arr)
  np.testing.assert_array_equal(_decode_full(tmp_path / 'c16.png'),
                                [[[0, 255, 128], [1, 2, 255]]])


def test_rgba_is_composited_over_white(tmp_path):
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (255, 0, 0, 255)   # opaque red
  rgba[0, 1] = (0, 0, 0, 0)       # transparent black -> white background
  rgba[1, :] = (0, 0, 255, 128)   # half-transparent blue
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
  out = _decode_full(tmp_path / 'a.png')
  np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
  np.testing.assert_array_equal(out[0, 1], (255, 255, 255))
  np.testing.assert_allclose(out[1, 0], (127, 127, 255), atol=1)


def test_palette_and_cmyk_and_bmp(tmp_path):
  rgb = write_image(str(tmp_path / 'x.bmp'), size=(9, 7))
  np.testing.assert_array_equal(_decode_full(tmp_path / 'x.bmp'), rgb)
  pal = Image.fromarray(rgb).quantize(16)
  pal.save(tmp_path / 'p.png')
  assert Image.open(tmp_path / 'p.png').mode == 'P'
  np.testing.assert_array_equal(_decode_full(tmp_path / 'p.png'), np.asarray(pal.convert('RGB')))
  Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'c.jpg')
  assert _decode_full(tmp_path / 'c.jpg').shape == (7, 9, 3)
  Image.fromarray(rgb).save(tmp_path / 'x.tif')
  np.testing.assert_array_equal(_decode_full(tmp_path / 'x.tif'), rgb)


def test_corrupt_file_is_an_error_naming_it(tmp_path):
  (tmp_path / 'bad.jpg').write_bytes(b'this is not a jpeg')
  with pytest.raises(ValueError, match='bad.jpg'):
    images.read(str(tmp_path / 'bad.jpg'), 32)
  with pytest.raises(ValueError, match='bad.jpg'):
    images.storage_bytes(str(tmp_path / 'bad.jpg'))


@pytest.mark.parametrize('ext', ['.jpg', '.png'])
def test_truncated_file_is_an_error_naming_it(tmp_path, ext):
  write_image(str(tmp_path / f'full{ext}'), size=(64, 64))
  data = (tmp_path / f'full{ext}').read_bytes()
  (tmp_path / f'cut{ext}').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=f'cut{ext}'):
    images.read(str(tmp_path / f'cut{ext}'), 32)  # also with JPEG's reduced-size decoding
  with pytest.raises(ValueError, match=f'cut{ext}'):
    images.storage_bytes(str(tmp_path / f'cut{ext}'))


def test_fit_policies():
  # A wide image: left third red, middle third green, right third blue.
  arr = np.zeros((30, 90, 3), np.uint8)
  arr[:, :30, 0] = arr[:, 30:60, 1] = arr[:, 60:, 2] = 255
  img = Image.fromarray(arr)
  resized = images.fit(img, 30, 'resize')
  assert resized.shape == (30, 30, 3)
  assert resized[:, 2, 0].min() > 200 and resized[:, -3, 2].min() > 200  # all three kept
  cropped = images.fit(img, 30, 'center_crop')
  np.testing.assert_array_equal(cropped, arr[:, 30:60])  # only the middle (green) square
  padded = images.fit(img, 90, 'pad')
  np.testing.assert_array_equal(padded[30:60], arr)  # the whole image, centred
  assert padded[:30].std() == 0 and padded[60:].std() == 0  # padding of one colour
  with pytest.raises(ValueError, match='squash'):
    images.fit(img, 30, 'squash')


def test_crop_keeps_the_central_fraction_before_resizing():
  # Concentric squares: a 40 px frame of 1s, a 20 px ring of 2s, the central 20 px of 3s.
  arr = np.ones((80, 80, 3), np.uint8)
  arr[20:60, 20:60] = 2
  arr[30:50, 30:50] = 3
  img = Image.fromarray(arr)
  np.testing.assert_array_equal(images.fit(img, 40, 'resize', crop=0.5), arr[20:60, 20:60])
  np.testing.assert_array_equal(images.fit(img, 20, 'resize', crop=0.25), arr[30:50, 30:50])
  np.testing.assert_array_equal(images.fit(img, 80, crop=1.0), arr)  # 1.0: nothing cut
  # After the policy: a wide image is squared first, then cropped.
  wide = np.concatenate([np.zeros((80, 40, 3), np.uint8), arr, np.zeros((80, 40, 3), np.uint8)], 1)
  np.testing.assert_array_equal(images.fit(Image.fromarray(wide), 40, 'center_crop', crop=0.5),
                                arr[20:60, 20:60])
  for bad in (0, 1.5, -0.2, True, '0.5'):
    with pytest.raises(ValueError, match='crop'):
      images.fit(img, 40, crop=bad)


def test_cropped_jpeg_decodes_at_the_resolution_the_crop_needs():
  y, x = np.mgrid[:320, :320] / 320
  smooth = np.uint8(127.5 + 120 * np.stack([np.sin(9 * x), np.cos(11 * y), np.sin(7 * x + 5 * y)],
                                           -1))
  buf = io.BytesIO()
  Image.fromarray(smooth).save(buf, 'JPEG', quality=95)
  fast = images.decode(buf.getvalue(), 'x.jpg', 40, crop=0.25)  # 80 px kept of 320: draft 1/2
  slow = images.fit(images.open_rgb(buf.getvalue(), 'x.jpg'), 40, crop=0.25)
  assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2
  with pytest.raises(ValueError, match='crop'):
    images.decode(buf.getvalue(), 'x.jpg', 40, crop=0)


def test_decode_of_a_large_jpeg_to_a_small_size_matches_a_full_decode():
  y, x = np.mgrid[:320, :320] / 320
  smooth = np.stack([np.sin(3 * x + 1), np.cos(4 * y), np.sin(2 * x + 3 * y)], -1)
  smooth = np.uint8(127.5 + 120 * smooth)  # a smooth field, like a stained cell
  buf = io.BytesIO()
  Image.fromarray(smooth).save(buf, 'JPEG', quality=95)
  fast = images.decode(buf.getvalue(), 'x.jpg', 40)  # draft: decoded at 1/8 scale
  slow = images.fit(images.open_rgb(buf.getvalue(), 'x.jpg'), 40)
  assert fast.shape == (40, 40, 3)
  assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2


def test_storage_bytes_keeps_rgb_jpegs_and_converts_the_rest_to_png(tmp_path):
  write_image(str(tmp_path / 'a.jpg'))
  assert images.storage_bytes(str(tmp_path / 'a.jpg')) == (tmp_path / 'a.jpg').read_bytes()
  rgb = write_image(str(tmp_path / 'b.bmp'))
  stored = images.storage_bytes(str(tmp_path / 'b.bmp'))
  with Image.open(io.BytesIO(stored)) as img:
    assert img.format == 'PNG' and img.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(img), rgb)
  write_png16_rgb(tmp_path / 'c.png', np.full((2, 3, 3), 65535, np.uint16))
  with Image.open(io.BytesIO(images.storage_bytes(str(tmp_path / 'c.png')))) as img:
    np.testing.assert_array_equal(np.asarray(img), np.full((2, 3, 3), 255, np.uint8))
