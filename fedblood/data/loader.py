"""Centers as uint8 arrays for training: config, loading, caching.

``load_centers(config.data)`` returns one :class:`Center` per hospital, the reference first. The
first run lists each center's files, builds its TFDS dataset (array_record, the original images
validated and stored once, split into train / validation / test), reads it back resized to
``image_size`` (after the center's ``data.crop``, if any) and writes the arrays to
``<cache_dir>/fedblood/<center>-<digest>_<size>px_<policy>[_crop<f>].npz``.
Later runs with the same files and settings load that .npz and decode nothing. The digest covers
the file list (names, sizes, mtimes), the split settings and, for synthetic centers, the
generator settings, so a changed folder or setting is rebuilt, never served stale.
"""

import hashlib
import json
import os
import time
from typing import NamedTuple

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from fedblood.data import builder as builder_lib
from fedblood.data import checks
from fedblood.data import images as images_lib
from fedblood.data import layouts
from fedblood.data import quiet
from fedblood.data import splits as splits_lib
from fedblood.data.layouts import CLASSES

# Bump when listing, splitting, decoding or the synthetic generator change their output, so that
# caches built by older code are not reused.
_CODE_VERSION = 1
SOURCES = ('synthetic', 'folder', 'manual') + tuple(layouts.NAMED_SETS)


class Split(NamedTuple):
  """One split of one center."""
  images: np.ndarray  # uint8 [N, S, S, 3]
  labels: np.ndarray  # int32 [N]
  files: np.ndarray   # str [N], file names relative to the center folder


class Center(NamedTuple):
  name: str
  train: Split
  val: Split
  test: Split


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
  c.augment = ml_collections.ConfigDict()
  # Master switch (evaluation never augments).
  c.augment.enabled = True
  # Mirror images (cells have no handedness).
  c.augment.flip = True
  # Quarter turns (cells have no orientation).
  c.augment.rot90 = True
  # Additive brightness jitter, +- this (lamp intensity).
  c.augment.brightness = 0.1
  # Contrast factor jitter, 1 +- this (camera gain, stain density).
  c.augment.contrast = 0.1
  # Saturation factor jitter, 1 +- this (stain strength).
  c.augment.saturation = 0.1
  # Hue rotation, +- this fraction of the colour wheel (stain batch, white balance).
  c.augment.hue = 0.02
  # Per-channel intensity jitter, 1 +- this (stain / white-balance casts).
  c.augment.stain = 0.05
  # Stain concentration jitter in optical density (HED basis), 1 +- this per stain: survives
  # model.input_norm='per_image', unlike brightness, contrast and stain (fedblood.data.augment).
  c.augment.od_stain = 0.0
  # Random magnification in [1, 1 + this] at a random position (cell-size differences).
  c.augment.zoom = 0.0
  return c


def cache_dir(data_cfg) -> str:
  return os.path.abspath(os.path.expanduser(
      data_cfg.cache_dir or tfds.core.constants.get_default_data_dir()))


def _check(data_cfg):
  if data_cfg.source not in SOURCES:
    raise ValueError(f'data.source={data_cfg.source!r} is not one of {SOURCES}')
  size = data_cfg.image_size
  if not isinstance(size, int) or size < 32 or size % 32:
    raise ValueError(f'data.image_size={size!r} must be a positive multiple of 32')
  if data_cfg.resize not in images_lib.RESIZE_POLICIES:
    raise ValueError(f'data.resize={data_cfg.resize!r} is not one of {images_lib.RESIZE_POLICIES}')
  splits_lib.check_fractions(data_cfg.val_fraction, data_cfg.test_fraction)
  splits_lib.check_folds(*folds_of(data_cfg))
  for name, fraction in _crops(data_cfg).items():
    images_lib.check_crop(fraction, f'data.crop.{name}')
  if data_cfg.source != 'synthetic' and data_cfg.root:
    root, cache = os.path.realpath(data_cfg.root), os.path.realpath(cache_dir(data_cfg))
    # (The reverse, images inside the cache dir, is TFDS' own manual-download convention.)
    if os.path.commonpath([root, cache]) == root:
      raise ValueError(f'data.cache_dir ({cache}) must not be inside data.root ({root}): '
                       'caches never go beside the images')


def check_config(data_cfg) -> None:
  """Checks ``data_cfg`` (source, sizes, splits, root, centers, reference) without reading images.

  Raises:
    ValueError / FileNotFoundError: naming the config key or folder at fault.
  """
  _check(data_cfg)
  center_specs(data_cfg)


def center_specs(data_cfg) -> list[tuple[str, dict]]:
  """[(center name, CenterConfig fields)] in config order."""
  source, root = data_cfg.source, data_cfg.root
  manual = root or os.path.join(cache_dir(data_cfg), 'downloads', 'manual')
  if source == 'synthetic':
    s = data_cfg.synthetic
    sizes = tuple(s.images_per_center)
    if s.num_centers < 1 or len(sizes) != s.num_centers:
      raise ValueError(f'data.synthetic.images_per_center has {len(sizes)} entries, '
                       f'data.synthetic.num_centers is {s.num_centers}')
    specs = [(f'synth{k}', dict(layout='synthetic', synth_index=k, synth_images=n,
                                synth_seed=s.seed, image_size=data_cfg.image_size))
             for k, n in enumerate(sizes)]
  elif source == 'folder':
    if not root or not os.path.isdir(root):
      raise FileNotFoundError(f'data.root={root!r} is not a folder (data.source="folder" needs '
                              'a tree <root>/<center>/<class>/<images>)')
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    specs = [(n, dict(layout='folder', path=os.path.join(root, n))) for n in names]
  elif source == 'manual':
    if not data_cfg.centers:
      raise ValueError('data.source="manual" needs data.centers, a tuple of '
                       f'{tuple(layouts.NAMED_SETS)}')
    specs = [(n, dict(layout=n, path=manual)) for n in layouts.NAMED_SETS]
  else:
    specs = [(source, dict(layout=source, path=manual))]
  by_name = dict(specs)
  names = tuple(data_cfg.centers) or tuple(by_name)
  if not names:
    raise ValueError(f'data.root={root!r} holds no center folder (data.source="folder" needs a '
                     'tree <root>/<center>/<class>/<images>)')
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f'data.centers: {unknown} not found; available: {tuple(by_name)}')
  reference = data_cfg.reference or names[0]
  if reference not in names:
    raise ValueError(f'data.reference={reference!r} is not one of the centers {names}')
  names = (reference,) + tuple(n for n in names if n != reference)
  return [(n, by_name[n]) for n in names]


def _crops(data_cfg) -> dict:
  crop = data_cfg.get('crop', None)
  return dict(crop.items()) if crop else {}


def crop_of(data_cfg, center: str) -> float:
  """The central fraction center ``center`` keeps (``data.crop``; 1.0 when not set)."""
  return float(_crops(data_cfg).get(center, 1.0))


def folds_of(data_cfg) -> tuple[int, int]:
  """``(data.folds, data.fold)``; ``(0, 0)`` for a config written before k-fold existed."""
  return data_cfg.get('folds', 0), data_cfg.get('fold', 0)


def _digest(fields: dict, data_cfg) -> str:
  key = dict(fields, code=_CODE_VERSION, tfds_version=str(builder_lib.Leukocytes.VERSION),
             val_fraction=data_cfg.val_fraction, test_fraction=data_cfg.test_fraction,
             split_seed=data_cfg.split_seed)
  folds, fold = folds_of(data_cfg)
  if folds:  # only then: the caches of a test_fraction split keep their names
    key.update(folds=folds, fold=fold)
  if fields['layout'] != 'synthetic':
    key['path'] = os.path.abspath(fields['path'])
    key['files'] = layouts.fingerprint(layouts.locate(fields['layout'], fields['path']))
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _load_center(name: str, fields: dict, data_cfg) -> Center:
  size, policy, crop = data_cfg.image_size, data_cfg.resize, crop_of(data_cfg, name)
  safe = ''.join(ch if ch.isalnum() or ch == '_' else '_' for ch in name)
  config_name = f'{safe}-{_digest(fields, data_cfg)}'
  suffix = f'_crop{crop:g}' if crop < 1.0 else ''
  path = os.path.join(cache_dir(data_cfg), 'fedblood',
                      f'{config_name}_{size}px_{policy}{suffix}.npz')
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as z:
        splits = [Split(z[f'{s}_images'], z[f'{s}_labels'], z[f'{s}_files']) for s in
                  splits_lib.SPLIT_NAMES]
      logging.info('Center %s: loaded %s', name, path)
      return Center(name, *splits)
    except Exception as e:  # pylint: disable=broad-except  (any damage: zip, header, keys)
      logging.warning('Center %s: the cache %s cannot be read (%s: %s); rebuilding it from the '
                      'images', name, path, type(e).__name__, e)
  start = time.time()
  folds, fold = folds_of(data_cfg)
  config = builder_lib.CenterConfig(
      name=config_name, val_fraction=data_cfg.val_fraction,
      test_fraction=data_cfg.test_fraction, split_seed=data_cfg.split_seed, folds=folds,
      fold=fold, **fields)
  with quiet.tfds_quiet():
    builder = builder_lib.Leukocytes(config=config, data_dir=cache_dir(data_cfg),
                                     file_format='array_record')
    builder.download_and_prepare()
  splits = [Split(*builder_lib.read_split(builder, s, size, policy, crop))
            for s in splits_lib.SPLIT_NAMES]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez(tmp, **{f'{s}_{k}': getattr(split, k) for s, split in zip(splits_lib.SPLIT_NAMES, splits)
                   for k in Split._fields})
  os.replace(tmp, path)
  quiet.announce(f'center {name}: {sum(len(x.labels) for x in splits)} images '
                 f'({"/".join(str(len(x.labels)) for x in splits)} train/val/test) prepared in '
                 f'{time.time() - start:.1f}s, cached in {path}')
  return Center(name, *splits)


def load_centers(data_cfg) -> list[Center]:
  """Loads every center of ``data_cfg`` (see :func:`default_config`), the reference first.

  Raises:
    ValueError / FileNotFoundError: naming the config key, folder or file at fault: an unknown
      source, a missing or empty center, an unknown class folder, an undecodable image, a named
      set that was not downloaded (with what to download and where to put it).
  """
  _check(data_cfg)
  specs = center_specs(data_cfg)
  names = [name for name, _ in specs]
  stray = [n for n in _crops(data_cfg) if n not in names]
  if stray:  # a config written for one tree, run on another (e.g. wbc.py on your own root)
    logging.warning('data.crop names %s, which are not centers of this run %s: not used', stray,
                    names)
  centers = [_load_center(name, fields, data_cfg) for name, fields in specs]
  checks.warn_duplicates(centers)
  return centers


def load_folder(path: str, image_size: int, resize: str = 'resize', crop: float = 1.0) -> Split:
  """Loads one ``<class>/<images>`` folder whole (e.g. an unseen center to evaluate); no cache.

  ``crop``: the central fraction of each image side to keep first (that center's ``data.crop``).

  Raises:
    ValueError: an unknown class folder, no image of a known class, or an undecodable image.
  """
  listing = layouts.list_center('folder', path)
  images = np.zeros((len(listing.files), image_size, image_size, 3), np.uint8)
  for i, f in enumerate(listing.files):
    images[i] = images_lib.read(os.path.join(path, f), image_size, resize, crop)
  return Split(images, listing.labels, np.array(listing.files, dtype=str))


def load_images(path: str, image_size: int, resize: str = 'resize', crop: float = 1.0):
  """Loads unlabelled images to classify: an image file, or every image under a folder.

  Files whose extension is not an image extension (.jpg, .png, .bmp, .tif, ...) are skipped
  with a warning naming them; a file with an image extension that cannot be decoded is an error
  naming it. ``crop`` as in :func:`load_folder`.

  Returns:
    (uint8 [N, S, S, 3], [N] relative file names, sorted).
  """
  if os.path.isfile(path):
    root, files = os.path.dirname(path), [os.path.basename(path)]
  elif os.path.isdir(path):
    root, files = path, layouts.walk_images(path)
  else:
    raise FileNotFoundError(f'No such file or folder: {path!r}')
  if not files:
    raise ValueError(f'No image files ({", ".join(layouts.IMAGE_EXTENSIONS)}) under {path!r}')
  images = np.zeros((len(files), image_size, image_size, 3), np.uint8)
  for i, f in enumerate(files):
    images[i] = images_lib.read(os.path.join(root, f), image_size, resize, crop)
  return images, files


def summarize(centers) -> str:
  """A markdown table of images per class and split of every center."""
  rows = ['| center | split | ' + ' | '.join(CLASSES) + ' | total |',
          '|---|---|' + '---|' * (len(CLASSES) + 1)]
  for c in centers:
    for name, split in zip(('train', 'val', 'test'), c[1:]):
      counts = splits_lib.class_counts(split)
      rows.append(f'| {c.name} | {name} | ' + ' | '.join(map(str, counts)) + f' | {counts.sum()} |')
  return '\n'.join(rows)
