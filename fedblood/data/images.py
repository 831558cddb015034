"""Decoding image files into 8-bit RGB, and fitting them to a square size.

Everything goes through pillow, so BMP, 16-bit PNG, palette, grayscale and RGBA files all load:
grayscale is replicated to RGB, 16-bit samples are scaled (not clipped) to 8 bits, transparency
is composited over white (slide background). A file that pillow cannot decode, or that is
truncated, is an error naming the file: silently training on a partial set is worse.
"""

import io

import numpy as np
from PIL import Image

RESIZE_POLICIES = ('resize', 'center_crop', 'pad')


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any pillow mode -> 8-bit RGB."""
  mode = img.mode
  if mode == 'RGB':
    return img
  if mode.startswith('I') or mode == 'F':
    # 16/32-bit and float grayscale: pillow's convert('L') clips at 255 instead of scaling.
    arr = np.asarray(img, np.float64)
    if mode.startswith('I;16') or (mode == 'I' and arr.max(initial=0) > 255):
      arr = arr / 257.0
    elif mode == 'F' and arr.max(initial=0) <= 1.0:
      arr = arr * 255.0
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
  if mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or (mode == 'P' and 'transparency' in img.info):
    rgba = img.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  return img.convert('RGB')  # L, 1, P, CMYK, YCbCr, LAB, HSV


def open_rgb(data: bytes, name: str, draft_size: int = 0) -> Image.Image:
  """Decodes encoded image bytes into a fully loaded 8-bit RGB pillow image.

  Args:
    data: the file's bytes.
    name: the file name, for error messages.
    draft_size: if > 0, lets JPEG decoding downscale (by 1/2, 1/4 or 1/8, never below this size),
      which makes decoding a large JPEG for a small target several times faster.

  Raises:
    ValueError: naming the file, if it is not an image pillow can decode, or is truncated.
  """
  try:
    img = Image.open(io.BytesIO(data))
    if draft_size and img.format == 'JPEG':
      img.draft(img.mode, (draft_size, draft_size))
    img.load()
    return _to_rgb(img)
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
    raise ValueError(f'Cannot decode image file {name!r}: {e}') from e


def check_crop(crop, what: str = 'crop') -> float:
  """``crop`` as a float in (0, 1]; otherwise a ValueError naming ``what``."""
  if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
    raise ValueError(f'{what}={crop!r} must be a fraction in (0, 1] (1 = the whole image)')
  return float(crop)


def fit(img: Image.Image, size: int, policy: str = 'resize', crop: float = 1.0) -> np.ndarray:
  """Fits an RGB image into ``size`` x ``size`` pixels.

  Args:
    img: an RGB pillow image.
    size: output side in pixels.
    policy: 'resize' (stretch the whole image; cell crops are nearly square), 'center_crop'
      (the central square, then resize: keeps the aspect ratio, loses the borders) or 'pad'
      (pad to a square with the median border colour, then resize: keeps everything).
    crop: after ``policy``, keep the central ``crop`` fraction of each side before resizing
      (1.0: all of it). A center whose optics show the cell small in the frame zooms in so the
      cell fills about as much of the input as at the other centers, at full resolution.

  Returns:
    uint8 [size, size, 3].
  """
  if policy not in RESIZE_POLICIES:
    raise ValueError(f'Unknown resize policy {policy!r}: expected one of {RESIZE_POLICIES}')
  crop = check_crop(crop)
  w, h = img.size
  if policy == 'center_crop' and w != h:
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
  elif policy == 'pad' and w != h:
    arr = np.asarray(img)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    colour = tuple(int(c) for c in np.median(border, axis=0))
    side = max(w, h)
    canvas = Image.new('RGB', (side, side), colour)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    img = canvas
  if crop < 1.0:
    w, h = img.size
    cw, ch = max(1, round(w * crop)), max(1, round(h * crop))
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BILINEAR)  # antialiased when shrinking
  return np.asarray(img, np.uint8)


def decode(data: bytes, name: str, size: int, policy: str = 'resize',
           crop: float = 1.0) -> np.ndarray:
  """Encoded bytes -> uint8 [size, size, 3]; errors name the file."""
  crop = check_crop(crop)
  # JPEG draft scaling may only shrink to what the crop still needs at full resolution.
  draft = int(np.ceil(size / crop)) if crop < 1.0 else size
  return fit(open_rgb(data, name, draft_size=draft), size, policy, crop)


def read(path: str, size: int, policy: str = 'resize', crop: float = 1.0) -> np.ndarray:
  """An image file -> uint8 [size, size, 3]; errors name the file."""
  with open(path, 'rb') as f:
    return decode(f.read(), path, size, policy, crop)


def storage_bytes(path: str) -> bytes:
  """The bytes to store for an image file in a TFDS Image feature (8-bit RGB JPEG or PNG).

  Baseline RGB JPEGs are stored as they are (nothing re-encoded). Everything else (BMP, TIFF,
  16-bit, palette, grayscale, RGBA PNGs, ...) is converted to 8-bit RGB and stored as PNG, since
  TFDS decoders expect 3 channels of uint8. The whole image is decoded either way, so corrupt
  or truncated files fail here, at build time, naming the file.
  """
  with open(path, 'rb') as f:
    data = f.read()
  img = open_rgb(data, path)
  with Image.open(io.BytesIO(data)) as original:
    if original.format == 'JPEG' and original.mode == 'RGB':
      return data
  buf = io.BytesIO()
  img.save(buf, format='PNG', compress_level=1)  # fast; the cache is rebuilt, not archived
  return buf.getvalue()

