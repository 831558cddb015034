"""The ``data`` section of a config: its fields with their defaults, and their checks.

:func:`default_config` is where every data setting is named and explained;
:func:`check_fields` refuses the ones that are wrong without listing a file (the center names
and folders are checked by :func:`fedblood.data.loader.check_config`).
"""

import os

import ml_collections
import tensorflow_datasets as tfds

from fedblood.data import images as images_lib
from fedblood.data import layouts
from fedblood.data import splits as splits_lib

SOURCES = ('synthetic', 'folder', 'manual') + tuple(layouts.NAMED_SETS)


def default_config() -> ml_collections.ConfigDict:
  """The ``data`` section every config starts from: synthetic centers, 64 px."""
  c = ml_collections.ConfigDict()
  # 'synthetic' (built in, no download), 'folder' (root/<center>/<class>/<images>), a named
  # public set ('pbc', 'raabin', 'lisc', 'jtsc', 'bccd': one center), or 'manual' (the named
  # sets listed in `centers`, each one center).
  c.source = 'synthetic'
  # The tree of center folders ('folder'), or the folder the named sets were downloaded into
  # ('' = <TFDS data dir>/downloads/manual).
  c.root = ''
  # Centers to use, in order; () = every sub-folder of root (sorted) / every synthetic center.
  c.centers = ()
  # The reference center (listed first; the paper's PBC); '' = the first center.
  c.reference = ''
  # Side of the square images fed to the model; a multiple of 32 for VGG's five poolings.
  c.image_size = 64
  # 'resize' (whole image, stretched), 'center_crop' (central square) or 'pad' (to a square).
  c.resize = 'resize'
  # Per-center scale normalisation, done at each center on its own images: center name -> the
  # central fraction of each image side to keep before resizing (1.0 or absent: all of it).
  # Optics differ: a cell spans ~1/3 of a PBC or LISC frame and most of a JTSC or BCCD one, so
  # those two zoom in and every center shows the network cells of similar size.
  c.crop = ml_collections.ConfigDict()
  # Per-class shares held out for validation and test (stratified, deterministic).
  c.val_fraction = 0.15
  c.test_fraction = 0.15
  # Changes which files fall in which split.
  c.split_seed = 0
  # Stratified k-fold evaluation: with folds = k >= 2 the test split is fold `fold` (0..k-1) of
  # each class's images instead of test_fraction; the k runs fold = 0..k-1 test every image once
  # (`launch.py --folds 0-4`). 0: the test_fraction split.
  c.folds = 0
  c.fold = 0
  # TFDS builds and resized .npz caches; '' = TFDS' data dir ($TFDS_DATA_DIR or
  # ~/tensorflow_datasets). Never inside the image folders (they may be read-only or shared).
  c.cache_dir = ''
  c.synthetic = ml_collections.ConfigDict()
  # Number of synthetic hospitals, each with its own stain, light, scale and blur.
  c.synthetic.num_centers = 4
  # Images per synthetic center; unequal, like real centers (~2,000 in all: seconds to make).
  c.synthetic.images_per_center = (800, 500, 400, 300)
  # Seed of the centers' styles and images.
  c.synthetic.seed = 0
  c.augment = augment_config()
  return c


def augment_config() -> ml_collections.ConfigDict:
  """``data.augment``: the training-time augmentation (:func:`fedblood.data.augment`)."""
  a = ml_collections.ConfigDict()
  # Master switch (evaluation never augments).
  a.enabled = True
  # Mirror images (cells have no handedness).
  a.flip = True
  # Quarter turns (cells have no orientation).
  a.rot90 = True
  # Additive brightness jitter, +- this (lamp intensity).
  a.brightness = 0.1
  # Contrast factor jitter, 1 +- this (camera gain, stain density).
  a.contrast = 0.1
  # Saturation factor jitter, 1 +- this (stain strength).
  a.saturation = 0.1
  # Hue rotation, +- this fraction of the colour wheel (stain batch, white balance).
  a.hue = 0.02
  # Per-channel intensity jitter, 1 +- this (stain / white-balance casts).
  a.stain = 0.05
  # Stain concentration jitter in optical density (HED basis), 1 +- this per stain: survives
  # model.input_norm='per_image', unlike brightness, contrast and stain (fedblood.data.augment).
  a.od_stain = 0.0
  # Random magnification in [1, 1 + this] at a random position (cell-size differences).
  a.zoom = 0.0
  # Gaussian blur of sigma in [0, this] pixels at data.image_size (the optics' sharpness).
  a.blur = 0.0
  # Probability that an image passes through a random convolution (RandConv, Xu et al. 2021):
  # random colours and textures, the shapes kept, for centers that never joined.
  a.rand_conv = 0.0
  return a


def cache_dir(data_cfg) -> str:
  return os.path.abspath(os.path.expanduser(
      data_cfg.cache_dir or tfds.core.constants.get_default_data_dir()))


def check_fields(data_cfg) -> None:
  """The fields of ``data_cfg`` that need no file listing; ValueError naming the key."""
  if data_cfg.source not in SOURCES:
    raise ValueError(f'data.source={data_cfg.source!r} is not one of {SOURCES}')
  size = data_cfg.image_size
  if not isinstance(size, int) or size < 32 or size % 32:
    raise ValueError(f'data.image_size={size!r} must be a positive multiple of 32')
  if data_cfg.resize not in images_lib.RESIZE_POLICIES:
    raise ValueError(f'data.resize={data_cfg.resize!r} is not one of {images_lib.RESIZE_POLICIES}')
  splits_lib.check_fractions(data_cfg.val_fraction, data_cfg.test_fraction)
  splits_lib.check_folds(*folds_of(data_cfg))
  for name, fraction in crops(data_cfg).items():
    images_lib.check_crop(fraction, f'data.crop.{name}')
  check_augment(data_cfg.get('augment', None), size)
  if data_cfg.source != 'synthetic' and data_cfg.root:
    root, cache = os.path.realpath(data_cfg.root), os.path.realpath(cache_dir(data_cfg))
    # (The reverse, images inside the cache dir, is TFDS' own manual-download convention.)
    if os.path.commonpath([root, cache]) == root:
      raise ValueError(f'data.cache_dir ({cache}) must not be inside data.root ({root}): '
                       'caches never go beside the images')


# data.augment's jitter ranges (fedblood.data.augment); each >= 0, 0 turns it off.
AUGMENT_RANGES = ('brightness', 'contrast', 'saturation', 'hue', 'stain', 'od_stain', 'zoom',
                  'blur', 'rand_conv')


def check_augment(augment_cfg, image_size: int) -> None:
  """ValueError naming the ``data.augment`` key whose range cannot be drawn from."""
  if augment_cfg is None:
    return
  for key in AUGMENT_RANGES:
    value = augment_cfg.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
      raise ValueError(f'data.augment.{key}={value!r} must be a number >= 0 (0 turns it off)')
  if augment_cfg.get('rand_conv', 0.0) > 1:
    raise ValueError(f'data.augment.rand_conv={augment_cfg.rand_conv!r} is a probability: it '
                     'must be in [0, 1]')
  blur = augment_cfg.get('blur', 0.0)
  if blur and 3 * blur >= image_size - 1:
    raise ValueError(f'data.augment.blur={blur!r}: the blur reaches 3 sigma, which must stay '
                     f'inside the {image_size}-pixel image (data.image_size)')


def crops(data_cfg) -> dict:
  crop = data_cfg.get('crop', None)
  return dict(crop.items()) if crop else {}


def crop_of(data_cfg, center: str) -> float:
  """The central fraction center ``center`` keeps (``data.crop``; 1.0 when not set)."""
  return float(crops(data_cfg).get(center, 1.0))


def folds_of(data_cfg) -> tuple[int, int]:
  """``(data.folds, data.fold)``; ``(0, 0)`` for a config written before k-fold existed."""
  return data_cfg.get('folds', 0), data_cfg.get('fold', 0)
