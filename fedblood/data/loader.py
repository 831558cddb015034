"""Centers as uint8 arrays for training: listing, loading, caching (:mod:`.config`: the fields).

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
import numpy as np

from fedblood.data import builder as builder_lib
from fedblood.data import checks
from fedblood.data import config as config_lib
from fedblood.data import images as images_lib
from fedblood.data import layouts
from fedblood.data import quiet
from fedblood.data import splits as splits_lib
from fedblood.data.layouts import CLASSES

# Bump when listing, splitting, decoding or the synthetic generator change their output, so that
# caches built by older code are not reused.
_CODE_VERSION = 1


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


def check_config(data_cfg) -> None:
  """Checks ``data_cfg`` (source, sizes, splits, root, centers, reference) without reading images.

  Raises:
    ValueError / FileNotFoundError: naming the config key or folder at fault.
  """
  config_lib.check_fields(data_cfg)
  center_specs(data_cfg)


def center_specs(data_cfg) -> list[tuple[str, dict]]:
  """[(center name, CenterConfig fields)] in config order."""
  source, root = data_cfg.source, data_cfg.root
  manual = root or os.path.join(config_lib.cache_dir(data_cfg), 'downloads', 'manual')
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


def _digest(fields: dict, data_cfg) -> str:
  key = dict(fields, code=_CODE_VERSION, tfds_version=str(builder_lib.Leukocytes.VERSION),
             val_fraction=data_cfg.val_fraction, test_fraction=data_cfg.test_fraction,
             split_seed=data_cfg.split_seed)
  folds, fold = config_lib.folds_of(data_cfg)
  if folds:  # only then: the caches of a test_fraction split keep their names
    key.update(folds=folds, fold=fold)
  if fields['layout'] != 'synthetic':
    key['path'] = os.path.abspath(fields['path'])
    key['files'] = layouts.fingerprint(layouts.locate(fields['layout'], fields['path']))
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _load_center(name: str, fields: dict, data_cfg) -> Center:
  size, policy, crop = data_cfg.image_size, data_cfg.resize, config_lib.crop_of(data_cfg, name)
  safe = ''.join(ch if ch.isalnum() or ch == '_' else '_' for ch in name)
  config_name = f'{safe}-{_digest(fields, data_cfg)}'
  suffix = f'_crop{crop:g}' if crop < 1.0 else ''
  path = os.path.join(config_lib.cache_dir(data_cfg), 'fedblood',
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
  folds, fold = config_lib.folds_of(data_cfg)
  config = builder_lib.CenterConfig(
      name=config_name, val_fraction=data_cfg.val_fraction,
      test_fraction=data_cfg.test_fraction, split_seed=data_cfg.split_seed, folds=folds,
      fold=fold, **fields)
  with quiet.tfds_quiet():
    builder = builder_lib.Leukocytes(config=config, data_dir=config_lib.cache_dir(data_cfg),
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
  config_lib.check_fields(data_cfg)
  specs = center_specs(data_cfg)
  names = [name for name, _ in specs]
  stray = [n for n in config_lib.crops(data_cfg) if n not in names]
  if stray:  # a config written for one tree, run on another (e.g. wbc.py on your own root)
    logging.warning('data.crop names %s, which are not centers of this run %s: not used', stray,
                    names)
  centers = [_load_center(name, fields, data_cfg) for name, fields in specs]
  checks.warn_duplicates(centers)
  return centers


def read_files(root: str, files, image_size: int, resize: str = 'resize',
               crop: float = 1.0) -> np.ndarray:
  """uint8 [N, S, S, 3]: the images ``files`` (paths relative to ``root``), each read at the
  central ``crop`` fraction of its sides (a center's ``data.crop``); errors name the file."""
  images = np.zeros((len(files), image_size, image_size, 3), np.uint8)
  for i, f in enumerate(files):
    images[i] = images_lib.read(os.path.join(root, f), image_size, resize, crop)
  return images


def list_folder(path: str):
  """The labelled images of one ``<class>/<images>`` folder: ``.files`` (sorted by class, then
  name) and ``.labels``. ValueError: an unknown class folder or no image of a known class."""
  return layouts.list_center('folder', path)


def load_folder(path: str, image_size: int, resize: str = 'resize', crop: float = 1.0) -> Split:
  """Loads one ``<class>/<images>`` folder whole (e.g. an unseen center to evaluate); no cache.

  ``crop``: the central fraction of each image side to keep first (that center's ``data.crop``).

  Raises:
    ValueError: an unknown class folder, no image of a known class, or an undecodable image.
  """
  listing = list_folder(path)
  images = read_files(path, listing.files, image_size, resize, crop)
  return Split(images, listing.labels, np.array(listing.files, dtype=str))


def list_images(path: str) -> tuple[str, list]:
  """(root, files relative to it) of an image file, or of every image under a folder (sorted).

  Files whose extension is not an image extension (.jpg, .png, .bmp, .tif, ...) are skipped
  with a warning naming them.
  """
  if os.path.isfile(path):
    root, files = os.path.dirname(path), [os.path.basename(path)]
  elif os.path.isdir(path):
    root, files = path, layouts.walk_images(path)
  else:
    raise FileNotFoundError(f'No such file or folder: {path!r}')
  if not files:
    raise ValueError(f'No image files ({", ".join(layouts.IMAGE_EXTENSIONS)}) under {path!r}')
  return root, files


def load_images(path: str, image_size: int, resize: str = 'resize', crop: float = 1.0):
  """Loads unlabelled images to classify: an image file, or every image under a folder.

  As :func:`list_images`; a file with an image extension that cannot be decoded is an error
  naming it. ``crop`` as in :func:`load_folder`.

  Returns:
    (uint8 [N, S, S, 3], [N] relative file names, sorted).
  """
  root, files = list_images(path)
  return read_files(root, files, image_size, resize, crop), files


def summarize(centers) -> str:
  """A markdown table of images per class and split of every center."""
  rows = ['| center | split | ' + ' | '.join(CLASSES) + ' | total |',
          '|---|---|' + '---|' * (len(CLASSES) + 1)]
  for c in centers:
    for name, split in zip(('train', 'val', 'test'), c[1:]):
      counts = splits_lib.class_counts(split)
      rows.append(f'| {c.name} | {name} | ' + ' | '.join(map(str, counts)) + f' | {counts.sum()} |')
  return '\n'.join(rows)
