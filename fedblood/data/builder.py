"""A TFDS builder for leukocyte centers: one BuilderConfig per center, array_record, no TensorFlow.

Features: ``image`` (uint8 RGB, stored as the original JPEG or as PNG), ``label`` (ClassLabel of
:data:`CLASSES`) and ``file_name`` (the image's path relative to the center). Splits ``train``,
``validation`` and ``test`` are stratified and deterministic (:mod:`fedblood.data.splits`); a
split that would be empty (a center of a handful of images) is left out.

The registered configs are the named public sets, read from the TFDS manual folder
(``<data_dir>/downloads/manual``)::

  import tensorflow_datasets as tfds
  from fedblood.data import builder   # registers 'leukocytes'
  ds = tfds.data_source('leukocytes/pbc', data_dir=...)   # after placing PBC as instructed

:func:`fedblood.data.load_centers` builds its centers with dynamic configs (:func:`center_config`)
whose names carry a digest of everything that shapes the data, so a changed folder or split
setting never reuses a stale build.
"""

import dataclasses
import io
import os

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fedblood.data import images as images_lib
from fedblood.data import layouts
from fedblood.data import splits as splits_lib
from fedblood.data import synthetic
from fedblood.data.layouts import CLASSES

VAL_FRACTION = 0.15
TEST_FRACTION = 0.15


@dataclasses.dataclass(eq=False)
class CenterConfig(tfds.core.BuilderConfig):
  """One center.

  Attributes:
    layout: 'folder', 'synthetic' or a key of ``layouts.NAMED_SETS``.
    path: the center folder ('folder'), or the manual-download folder of a named set ('' = TFDS'
      manual dir).
    val_fraction, test_fraction, split_seed, folds, fold: the stratified split
      (:func:`fedblood.data.splits.assign`).
    synth_index, synth_images, synth_seed, image_size: a synthetic center (rendered at
      ``image_size``).
  """
  layout: str = 'folder'
  path: str = ''
  val_fraction: float = VAL_FRACTION
  test_fraction: float = TEST_FRACTION
  split_seed: int = 0
  folds: int = 0
  fold: int = 0
  synth_index: int = 0
  synth_images: int = 0
  synth_seed: int = 0
  image_size: int = 64


def _named_config(name):
  spec = layouts.NAMED_SETS[name]
  return CenterConfig(name=name, layout=name, description=spec.citation)


class Leukocytes(tfds.core.GeneratorBasedBuilder):
  """White blood cells of one center (PBC, Raabin-WBC, LISC, JTSC, BCCD, a folder, synthetic)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [_named_config(name) for name in layouts.NAMED_SETS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = '\n\n'.join(
      f'{name}: ' + layouts.instructions(name, '<manual_dir>') for name in layouts.NAMED_SETS)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS' default resolution for a builder inside a package imports importlib_resources, which
    # TFDS does not declare (and we do not need): point at this file instead.
    return epath.Path(__file__)

  def _info(self):
    # DatasetInfo(builder=self), unlike self.dataset_info_from_configs, needs no
    # importlib_resources.
    return tfds.core.DatasetInfo(
        builder=self,
        description='Single white blood cells of one center, 5 classes.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=CLASSES),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        citation=self.builder_config.description,
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if cfg.layout == 'synthetic':
      images, labels = synthetic.make_center(cfg.synth_index, cfg.synth_images, cfg.synth_seed,
                                             cfg.image_size)
      files = synthetic.file_names(labels)
      source = ('synthetic', images)
    else:
      path = cfg.path or (self._manual_dir(dl_manager) if cfg.layout != 'folder' else '')
      listing = layouts.list_center(cfg.layout, path)
      files, labels = listing.files, listing.labels
      source = ('files', listing.root)
    which = splits_lib.assign(files, labels, cfg.val_fraction, cfg.test_fraction,
                              cfg.split_seed, center=cfg.name.rsplit('-', 1)[0],
                              folds=cfg.folds, fold=cfg.fold)
    return {name: self._generate_examples(source, files, labels, np.flatnonzero(which == s))
            for s, name in enumerate(splits_lib.SPLIT_NAMES) if (which == s).any()}

  def _manual_dir(self, dl_manager) -> str:
    try:
      return os.fspath(dl_manager.manual_dir)
    except AssertionError:  # missing or empty: layouts.locate says what to download, and where
      default = os.path.join(os.fspath(self.data_dir_root), 'downloads', 'manual')
      return os.fspath(getattr(dl_manager, '_manual_dir', None) or default)

  def _generate_examples(self, source, files, labels, indices):
    kind, data = source
    for i in indices:
      if kind == 'synthetic':
        buf = io.BytesIO()
        # Uncompressed PNG: faster to write and read (docs/performance.md); noise compresses poorly.
        Image.fromarray(data[i]).save(buf, format='PNG', compress_level=0)
        image = buf.getvalue()
      else:
        image = images_lib.storage_bytes(os.path.join(data, files[i]))
      yield files[i], {'image': image, 'label': int(labels[i]), 'file_name': files[i]}


def read_split(builder: Leukocytes, split: str, size: int, policy: str, crop: float = 1.0):
  """Reads one prepared split back (array_record, no TF) as (uint8 [N,S,S,3], int32 [N], files).

  Images are decoded from their stored bytes straight to the target size (JPEGs decode at a
  reduced scale), central ``crop`` fraction first (see ``images.fit``), sorted by file name so
  the order never depends on TFDS' shuffling.
  """
  if split not in builder.info.splits:
    return (np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32),
            np.zeros((0,), dtype=str))
  source = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
  records = source.__getitems__(range(len(source)))
  records.sort(key=lambda r: r['file_name'])
  files = np.array([r['file_name'].decode() for r in records], dtype=str)
  images = np.zeros((len(records), size, size, 3), np.uint8)
  for i, r in enumerate(records):
    images[i] = images_lib.decode(r['image'], f'{builder.builder_config.name}:{files[i]}',
                                  size, policy, crop)
  labels = np.array([r['label'] for r in records], np.int32)
  return images, labels, files
