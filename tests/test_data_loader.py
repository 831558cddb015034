"""load_centers / load_folder / load_images end to end: TFDS builds, splits, caches, bad input."""

import logging
import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from fedblood import data
from fedblood.data import builder as builder_lib
from fedblood.data import images as images_lib
from fedblood.data import layouts
from fedblood.data import splits
from fedblood.data import synthetic
from fake_images import make_class_tree, make_named, NAMED_COUNTS, write_image, write_png16_rgb


def _cfg(tmp_path, **overrides):
  cfg = data.default_config()
  cfg.cache_dir = str(tmp_path / 'cache')
  cfg.image_size = 32
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _synthetic_cfg(tmp_path, **overrides):
  cfg = _cfg(tmp_path, **overrides)
  cfg.synthetic.num_centers = 3
  cfg.synthetic.images_per_center = (30, 24, 20)
  return cfg


def _all(center):
  return np.concatenate([center.train.labels, center.val.labels, center.test.labels])


def _check_splits(center, listing_files=None, listing_labels=None, cfg=None):
  """Disjoint, complete, sorted, and exactly the splits.assign of the listing."""
  files = [list(s.files) for s in (center.train, center.val, center.test)]
  for f in files:
    assert f == sorted(f)
  assert not set(files[0]) & set(files[1]) and not set(files[0]) & set(files[2])
  assert not set(files[1]) & set(files[2])
  for s in (center.train, center.val, center.test):
    assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32
    assert len(s.images) == len(s.labels) == len(s.files)
  if listing_files is not None:
    which = splits.assign(listing_files, listing_labels, cfg.val_fraction, cfg.test_fraction,
                          cfg.split_seed)
    for k, f in enumerate(files):
      assert f == sorted(np.asarray(listing_files)[which == k].tolist())


def test_default_config():
  cfg = data.default_config()
  assert cfg.source == 'synthetic' and cfg.image_size % 32 == 0
  assert isinstance(cfg.centers, tuple) and isinstance(cfg.synthetic.images_per_center, tuple)
  sizes = cfg.synthetic.images_per_center
  assert len(sizes) == cfg.synthetic.num_centers and len(set(sizes)) == len(sizes)
  assert 1500 <= sum(sizes) <= 2500
  for key in ('enabled', 'flip', 'rot90', 'brightness', 'contrast', 'saturation', 'hue'):
    assert cfg.augment[key]


def test_synthetic_centers_come_through_the_builder(tmp_path):
  cfg = _synthetic_cfg(tmp_path)
  centers = data.load_centers(cfg)
  assert [c.name for c in centers] == ['synth0', 'synth1', 'synth2']
  for k, c in enumerate(centers):
    _check_splits(c)
    assert c.train.images.shape[1:] == (32, 32, 3)
    assert len(_all(c)) == cfg.synthetic.images_per_center[k]
    # Stored losslessly: the images are exactly the generator's, found by their file number.
    images, labels = synthetic.make_center(k, cfg.synthetic.images_per_center[k], 0, 32)
    for s in (c.train, c.val, c.test):
      index = [int(os.path.splitext(os.path.basename(f))[0]) for f in s.files]
      np.testing.assert_array_equal(s.images, images[index])
      np.testing.assert_array_equal(s.labels, labels[index])
      assert all(f.split('/')[0] == data.CLASSES[l] for f, l in zip(s.files, s.labels))
  assert os.path.isdir(tmp_path / 'cache' / 'leukocytes')
  assert len(os.listdir(tmp_path / 'cache' / 'fedblood')) == 3


def test_reference_first_then_the_others_in_order(tmp_path):
  cfg = _synthetic_cfg(tmp_path, reference='synth1')
  assert [c.name for c in data.load_centers(cfg)] == ['synth1', 'synth0', 'synth2']
  cfg = _synthetic_cfg(tmp_path, centers=('synth2', 'synth0'))
  assert [c.name for c in data.load_centers(cfg)] == ['synth2', 'synth0']
  with pytest.raises(ValueError, match='data.reference'):
    data.load_centers(_synthetic_cfg(tmp_path, centers=('synth2',), reference='synth0'))
  with pytest.raises(ValueError, match='synth7'):
    data.load_centers(_synthetic_cfg(tmp_path, centers=('synth7',)))


def test_every_named_layout_through_tfds(tmp_path):
  manual = str(tmp_path / 'manual')
  for name in layouts.NAMED_SETS:
    make_named(manual, name)
  cfg = _cfg(tmp_path, source='manual', root=manual, centers=('lisc', 'pbc', 'raabin', 'jtsc',
                                                               'bccd'), reference='pbc')
  centers = data.load_centers(cfg)
  assert [c.name for c in centers] == ['pbc', 'lisc', 'raabin', 'jtsc', 'bccd']
  for c in centers:
    listing = layouts.list_center(c.name, manual)
    _check_splits(c, listing.files, listing.labels, cfg)
    np.testing.assert_array_equal(np.bincount(_all(c), minlength=5), NAMED_COUNTS[c.name])
    split = c.train
    for image, f in zip(split.images, split.files):  # each image is its own file's
      np.testing.assert_array_equal(image, images_lib.read(os.path.join(listing.root, f), 32))
  # A named set on its own is one center.
  one = data.load_centers(_cfg(tmp_path, source='lisc', root=manual))
  assert [c.name for c in one] == ['lisc']


def test_second_build_and_cache(tmp_path, monkeypatch):
  root = tmp_path / 'wbc'
  make_class_tree(str(root / 'b_center'), {'neutrophil': 9, 'lymphocyte': 7, 'monocyte': 5})
  make_class_tree(str(root / 'a_center'), {'basophil': 6, 'eosinophil': 8}, ext='.png')
  cfg = _cfg(tmp_path, source='folder', root=str(root))
  first = data.load_centers(cfg)
  assert [c.name for c in first] == ['a_center', 'b_center']  # sorted sub-folders

  def no_decoding(*args, **kwargs):
    raise AssertionError('decoded an image although the cache was warm')
  with monkeypatch.context() as m:
    m.setattr(images_lib, 'decode', no_decoding)
    m.setattr(images_lib, 'storage_bytes', no_decoding)
    cached = data.load_centers(cfg)
  # A build from scratch elsewhere (another machine): the same files in the same splits.
  rebuilt = data.load_centers(_cfg(tmp_path / 'elsewhere', source='folder', root=str(root)))
  for a, b, c in zip(first, cached, rebuilt):
    for s in range(1, 4):
      for k in range(3):
        np.testing.assert_array_equal(a[s][k], b[s][k])
        np.testing.assert_array_equal(a[s][k], c[s][k])

  # A changed folder is rebuilt, never served stale.
  write_image(str(root / 'a_center' / 'basophil' / 'new.png'), seed=77)
  grown = data.load_centers(cfg)
  assert len(_all(grown[0])) == len(_all(first[0])) + 1
  # A different size or resize policy is another cache entry; the TFDS build is reused.
  cfg.resize = 'pad'
  data.load_centers(cfg)
  cfg.image_size = 64
  assert data.load_centers(cfg)[0].train.images.shape[1:] == (64, 64, 3)
  builds = [d for d in os.listdir(tmp_path / 'cache' / 'leukocytes') if not d.startswith('.')]
  assert len(builds) == 3  # a, b, and a again (changed)


def test_named_set_in_the_default_manual_dir(tmp_path):
  make_named(str(tmp_path / 'cache' / 'downloads' / 'manual'), 'jtsc')
  manual = str(tmp_path / 'cache' / 'downloads' / 'manual')
  for root in ('', manual):  # '' = <cache>/downloads/manual, TFDS' convention
    c, = data.load_centers(_cfg(tmp_path, source='jtsc', root=root))
    np.testing.assert_array_equal(np.bincount(_all(c), minlength=5), NAMED_COUNTS['jtsc'])


def test_tfds_data_source_reads_back_without_tensorflow(tmp_path):
  make_named(str(tmp_path / 'downloads' / 'manual'), 'bccd')
  builder = builder_lib.Leukocytes(config='bccd', data_dir=str(tmp_path),
                                   file_format='array_record')
  builder.download_and_prepare()
  sources = tfds.data_source('leukocytes/bccd', data_dir=str(tmp_path))
  assert sum(len(s) for s in sources.values()) == sum(NAMED_COUNTS['bccd'])
  record = sources['train'][0]
  assert record['image'].shape == (12, 14, 3) and record['image'].dtype == np.uint8
  assert 0 <= record['label'] < 5 and record['file_name'].decode().endswith('.jpg')
  assert 'tensorflow' not in sys.modules


def test_missing_manual_download(tmp_path):
  with pytest.raises(FileNotFoundError, match='PBC_dataset_normal_DIB.zip') as e:
    data.load_centers(_cfg(tmp_path, source='pbc', root=str(tmp_path / 'manual')))
  assert str(tmp_path / 'manual' / 'PBC_dataset_normal_DIB') in str(e.value)
  builder = builder_lib.Leukocytes(config='raabin', data_dir=str(tmp_path / 'tfds'),
                                   file_format='array_record')
  with pytest.raises(FileNotFoundError, match='raabindata.com') as e:
    builder.download_and_prepare()
  assert os.path.join(str(tmp_path / 'tfds'), 'downloads', 'manual', 'Raabin-WBC') in str(e.value)


def test_image_kinds_in_a_center_are_converted(tmp_path):
  center = tmp_path / 'wbc' / 'lab'
  rgb = np.full((10, 10, 3), 128, np.uint8)
  (center / 'monocyte').mkdir(parents=True)
  Image.fromarray(rgb[..., 0]).save(center / 'monocyte' / 'gray.png')
  Image.fromarray(np.full((10, 10, 4), 200, np.uint8), 'RGBA').save(center / 'monocyte' / 'a.png')
  Image.fromarray(rgb).quantize(4).save(center / 'monocyte' / 'pal.png')
  Image.fromarray(np.full((10, 10), 40000, np.uint16)).save(center / 'monocyte' / 'g16.png')
  write_png16_rgb(center / 'monocyte' / 'c16.png', np.full((10, 10, 3), 65535, np.uint16))
  Image.fromarray(rgb).save(center / 'monocyte' / 'x.bmp')
  (center / 'monocyte' / 'Thumbs.db').write_bytes(b'\0' * 10)
  c, = data.load_centers(_cfg(tmp_path, source='folder', root=str(tmp_path / 'wbc'),
                              val_fraction=0.0, test_fraction=0.0))
  assert sorted(c.train.files) == sorted(os.path.join('monocyte', f) for f in (
      'gray.png', 'a.png', 'pal.png', 'g16.png', 'c16.png', 'x.bmp'))
  by_file = dict(zip(c.train.files, c.train.images))
  np.testing.assert_array_equal(by_file[os.path.join('monocyte', 'g16.png')], 156)  # 40000/257
  np.testing.assert_array_equal(by_file[os.path.join('monocyte', 'c16.png')], 255)
  np.testing.assert_array_equal(by_file[os.path.join('monocyte', 'gray.png')], 128)


def test_corrupt_image_in_a_center_is_an_error_naming_it(tmp_path):
  make_class_tree(str(tmp_path / 'wbc' / 'lab'), {'neutrophil': 3})
  (tmp_path / 'wbc' / 'lab' / 'neutrophil' / 'broken.jpg').write_bytes(b'\xff\xd8 garbage')
  with pytest.raises(ValueError, match='broken.jpg'):
    data.load_centers(_cfg(tmp_path, source='folder', root=str(tmp_path / 'wbc')))


def test_center_missing_a_class_and_tiny_classes_load(tmp_path, caplog):
  make_class_tree(str(tmp_path / 'wbc' / 'lab'), {'neutrophil': 12, 'basophil': 1})
  with caplog.at_level(logging.WARNING):
    c, = data.load_centers(_cfg(tmp_path, source='folder', root=str(tmp_path / 'wbc')))
  np.testing.assert_array_equal(data.class_counts(c.train), [1, 0, 0, 0, 8])
  np.testing.assert_array_equal(data.class_counts(c.test), [0, 0, 0, 0, 2])
  messages = ' '.join(r.getMessage() for r in caplog.records)
  assert 'eosinophil, lymphocyte, monocyte' in messages and 'basophil (1' in messages


@pytest.mark.parametrize('overrides, match', [
    (dict(source='imagenet'), 'data.source'),
    (dict(image_size=50), 'data.image_size'),
    (dict(resize='stretch'), 'data.resize'),
    (dict(val_fraction=0.6, test_fraction=0.5), 'data.val_fraction'),
    (dict(source='folder', root='/nonexistent/centers'), 'data.root'),
    (dict(source='manual'), 'data.centers'),
    (dict(source='manual', centers=('pbc', 'kaggle')), 'kaggle'),
    (dict(folds=1), 'data.folds'),
    (dict(folds=5, fold=5), 'data.fold'),
])
def test_config_errors_name_the_key(tmp_path, overrides, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    data.load_centers(_cfg(tmp_path, **overrides))


@pytest.mark.parametrize('num, sizes', [(3, (10, 10)), (0, ())])
def test_synthetic_sizes_must_match_num_centers(tmp_path, num, sizes):
  cfg = _cfg(tmp_path)
  cfg.synthetic.num_centers, cfg.synthetic.images_per_center = num, sizes
  with pytest.raises(ValueError, match='data.synthetic.num_centers'):
    data.load_centers(cfg)


@pytest.mark.parametrize('key, value, match', [
    ('blur', -0.5, r'data\.augment\.blur=-0\.5 must be a number >= 0'),
    ('hue', float('nan'), r'data\.augment\.hue=nan must be a number >= 0'),
    ('blur', 21.0, r'data\.augment\.blur=21\.0: .* inside the 64-pixel image'),
    ('rand_conv', 1.5, r'data\.augment\.rand_conv=1\.5 is a probability'),
    ('rand_conv', -0.1, r'data\.augment\.rand_conv=-0\.1 must be a number >= 0'),
])
def test_augment_ranges_are_checked_before_loading(tmp_path, key, value, match):
  cfg = _cfg(tmp_path, image_size=64)
  cfg.augment[key] = value
  with pytest.raises(ValueError, match=match):
    data.load_centers(cfg)
  assert not os.listdir(tmp_path)  # nothing built


def test_default_cache_dir_is_tfds_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  assert data.config.cache_dir(data.default_config()) == str(tmp_path / 'tfds')
  monkeypatch.delenv('TFDS_DATA_DIR')
  assert data.config.cache_dir(data.default_config()) == os.path.expanduser(
      '~/tensorflow_datasets')


def test_cache_is_never_inside_the_image_tree(tmp_path):
  make_class_tree(str(tmp_path / 'wbc' / 'lab'), {'neutrophil': 2})
  cfg = _cfg(tmp_path, source='folder', root=str(tmp_path / 'wbc'))
  cfg.cache_dir = str(tmp_path / 'wbc' / 'cache')
  with pytest.raises(ValueError, match='data.cache_dir'):
    data.load_centers(cfg)
  assert not (tmp_path / 'wbc' / 'cache').exists()


def test_crop_is_per_center_and_cached_apart(tmp_path, caplog):
  for lab in ('far', 'near'):
    make_class_tree(str(tmp_path / 'wbc' / lab), {'neutrophil': 6, 'eosinophil': 6})
  cfg = _cfg(tmp_path, source='folder', root=str(tmp_path / 'wbc'))
  whole = {c.name: c for c in data.load_centers(cfg)}
  cfg.crop = dict(far=0.5, elsewhere=0.7)  # a center of another tree: warned about, not used
  with caplog.at_level(logging.WARNING):
    cropped = {c.name: c for c in data.load_centers(cfg)}
  assert any("['elsewhere']" in r.getMessage() for r in caplog.records)
  root = str(tmp_path / 'wbc' / 'far')
  for split in ('train', 'test'):
    got = getattr(cropped['far'], split)
    for image, f in zip(got.images, got.files):
      np.testing.assert_array_equal(image, images_lib.read(os.path.join(root, f), 32, crop=0.5))
    np.testing.assert_array_equal(got.files, getattr(whole['far'], split).files)  # same split
    np.testing.assert_array_equal(getattr(cropped['near'], split).images,
                                  getattr(whole['near'], split).images)
  assert not np.array_equal(cropped['far'].train.images, whole['far'].train.images)
  caches = sorted(os.listdir(tmp_path / 'cache' / 'fedblood'))
  assert sum(n.startswith('far-') for n in caches) == 2 and any('_crop0.5' in n for n in caches)
  assert data.crop_of(cfg, 'far') == 0.5 and data.crop_of(cfg, 'near') == 1.0
  cfg.crop = dict(far=0.0)
  with pytest.raises(ValueError, match=r'data\.crop\.far'):
    data.load_centers(cfg)


def test_load_folder(tmp_path):
  make_class_tree(str(tmp_path / 'unseen'), {'Neutrophils': 3, 'EOS': 2, 'platelet': 2})
  split = data.load_folder(str(tmp_path / 'unseen'), 32, 'center_crop')
  assert split.images.shape == (5, 32, 32, 3) and split.images.dtype == np.uint8
  np.testing.assert_array_equal(data.class_counts(split), [0, 2, 0, 0, 3])
  assert list(split.files) == sorted(split.files) and split.files[0].startswith('EOS')
  make_class_tree(str(tmp_path / 'bad'), {'cells': 1})
  with pytest.raises(ValueError, match='cells'):
    data.load_folder(str(tmp_path / 'bad'), 32)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='empty'):
    data.load_folder(str(tmp_path / 'empty'), 32)
  zoomed = data.load_folder(str(tmp_path / 'unseen'), 32, 'center_crop', crop=0.5)
  path = os.path.join(tmp_path / 'unseen', zoomed.files[0])
  np.testing.assert_array_equal(zoomed.images[0], images_lib.read(path, 32, 'center_crop', 0.5))


def test_load_images(tmp_path, caplog):
  for rel in ('z.png', 'day1/a.jpg', 'day1/b.bmp'):
    write_image(str(tmp_path / 'in' / rel))
  (tmp_path / 'in' / 'day1' / 'notes.txt').write_text('x')
  with caplog.at_level(logging.WARNING):
    images, files = data.load_images(str(tmp_path / 'in'), 32)
  assert images.shape == (3, 32, 32, 3)
  assert files == [os.path.join('day1', 'a.jpg'), os.path.join('day1', 'b.bmp'), 'z.png']
  assert any('notes.txt' in r.getMessage() for r in caplog.records)
  one, name = data.load_images(str(tmp_path / 'in' / 'z.png'), 32)
  np.testing.assert_array_equal(one[0], images[2])
  assert name == ['z.png']
  (tmp_path / 'in' / 'day1' / 'c.png').write_bytes(b'PNG? no')
  with pytest.raises(ValueError, match='c.png'):
    data.load_images(str(tmp_path / 'in'), 32)
  (tmp_path / 'nothing').mkdir()
  with pytest.raises(ValueError, match='nothing'):
    data.load_images(str(tmp_path / 'nothing'), 32)
  with pytest.raises(FileNotFoundError, match='missing'):
    data.load_images(str(tmp_path / 'missing'), 32)


def test_summarize_lists_every_center_and_split(tmp_path):
  centers = data.load_centers(_synthetic_cfg(tmp_path))
  table = data.summarize(centers)
  assert table.count('| synth') == 9 and 'basophil' in table.splitlines()[0]


def test_k_folds_through_the_builder_test_each_image_once(tmp_path):
  """data.folds / data.fold reach the TFDS build: 3 folds of a center test every image once,
  each fold cached apart, and folds=0 keeps the test_fraction split's cache."""
  tested = []
  for fold in range(3):
    centers = data.load_centers(_synthetic_cfg(tmp_path, folds=3, fold=fold))
    tested.append(set(centers[1].test.files))
    assert len(_all(centers[1])) == 24
  assert set.union(*tested) == set(centers[1].train.files) | set(centers[1].val.files) | \
      set(centers[1].test.files)
  assert sum(map(len, tested)) == 24  # disjoint
  names = sorted(p.name for p in (tmp_path / 'cache' / 'fedblood').glob('synth1-*.npz'))
  assert len(names) == 3
  plain = data.load_centers(_synthetic_cfg(tmp_path))[1]
  assert len(plain.test.labels) == len(
      data.load_centers(_synthetic_cfg(tmp_path, folds=0, fold=0))[1].test.labels)
