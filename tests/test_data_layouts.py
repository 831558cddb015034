"""Listing centers: class-folder synonyms, the named layouts, and bad folder trees."""

import logging
import os

import numpy as np
import pytest

from fedblood.data import layouts
from fedblood.data.layouts import CLASSES
from fake_images import make_class_tree, make_named, NAMED_COUNTS, write_image


@pytest.mark.parametrize('folder, cls', [
    ('basophil', 'basophil'), ('Basophil', 'basophil'), ('BASO', 'basophil'), ('Baso', 'basophil'),
    ('BA', 'basophil'), ('Baoso', 'basophil'),
    ('eosinophil', 'eosinophil'), ('Eosinophils', 'eosinophil'), ('eosi', 'eosinophil'),
    ('EO', 'eosinophil'),
    ('lymphocyte', 'lymphocyte'), ('LYMPHOCYTES', 'lymphocyte'), ('lymp', 'lymphocyte'),
    ('LY', 'lymphocyte'),
    ('monocyte', 'monocyte'), ('Monocytes', 'monocyte'), ('mono', 'monocyte'), ('MO', 'monocyte'),
    ('neutrophil', 'neutrophil'), ('NEUTROPHIL', 'neutrophil'), ('neut', 'neutrophil'),
    ('SNE', 'neutrophil'), ('BNE', 'neutrophil'), ('Neutrophils', 'neutrophil'),
    ('segmented_neutrophil', 'neutrophil'), ('band', 'neutrophil'),
])
def test_class_synonyms(folder, cls):
  assert layouts.class_of(folder) == CLASSES.index(cls)


@pytest.mark.parametrize('folder', ['ig', 'IG', 'erythroblast', 'ERB', 'platelet', 'PLT',
                                    'mixt', 'MMY', 'MY', 'PMY', 'lymphoblast', 'monoblast',
                                    'myeloblast', 'smudge_cells'])
def test_other_cell_types_are_skipped_not_mapped(folder):
  assert layouts.class_of(folder) is layouts.OTHER_CELL_TYPES


@pytest.mark.parametrize('folder', ['cats', 'granulocytes', 'masks', 'x'])
def test_unknown_folder_names(folder):
  assert layouts.class_of(folder) is None


@pytest.mark.parametrize('name', sorted(layouts.NAMED_SETS))
def test_named_layouts(tmp_path, name):
  make_named(str(tmp_path), name)
  listing = layouts.list_center(name, str(tmp_path))
  np.testing.assert_array_equal(np.bincount(listing.labels, minlength=5), NAMED_COUNTS[name])
  assert list(listing.files) == sorted(listing.files)
  assert listing.labels.dtype == np.int32
  for f, label in zip(listing.files, listing.labels):
    assert os.path.isfile(os.path.join(listing.root, f))
    if name != 'jtsc':  # class from the folder name
      assert layouts.class_of(f.split(os.sep)[-2]) == label


def test_pbc_keeps_band_and_segmented_neutrophils_and_skips_other_cells(tmp_path, caplog):
  make_named(str(tmp_path), 'pbc')
  with caplog.at_level(logging.INFO):
    listing = layouts.list_center('pbc', str(tmp_path))
  neut = [f for f, l in zip(listing.files, listing.labels) if CLASSES[l] == 'neutrophil']
  assert sorted(os.path.basename(f)[:3] for f in neut) == ['BNE', 'BNE', 'SNE', 'SNE', 'SNE']
  assert not any(f.startswith(('ig', 'erythroblast', 'platelet')) for f in listing.files)
  skip_lines = [r.getMessage() for r in caplog.records if 'other cell types' in r.getMessage()]
  assert len(skip_lines) == 1 and 'erythroblast, ig, platelet' in skip_lines[0]


def test_jtsc_labels_come_from_the_csv_and_masks_are_ignored(tmp_path):
  make_named(str(tmp_path), 'jtsc')
  listing = layouts.list_center('jtsc', str(tmp_path))
  labels = dict(zip(listing.files, listing.labels))
  assert all(f.endswith('.bmp') for f in listing.files)
  assert CLASSES[labels[os.path.join('Dataset 1', '001.bmp')]] == 'neutrophil'
  assert CLASSES[labels[os.path.join('Dataset 1', '007.bmp')]] == 'lymphocyte'
  assert CLASSES[labels[os.path.join('Dataset 1', '017.bmp')]] == 'basophil'


def test_raabin_joins_train_and_test_a(tmp_path):
  make_named(str(tmp_path), 'raabin')
  files = layouts.list_center('raabin', str(tmp_path)).files
  assert sum(f.startswith('Train' + os.sep) for f in files) == 12
  assert sum(f.startswith('TestA' + os.sep) for f in files) == 6


@pytest.mark.parametrize('name', sorted(layouts.NAMED_SETS))
def test_missing_manual_download_says_what_and_where(tmp_path, name):
  with pytest.raises(FileNotFoundError) as e:
    layouts.list_center(name, str(tmp_path))
  message = str(e.value)
  assert str(tmp_path) in message and 'http' in message
  assert layouts.NAMED_SETS[name].folder.split(os.sep)[0] in message


def test_unknown_class_folder_is_an_error_naming_it(tmp_path):
  make_class_tree(str(tmp_path), {'neutrophil': 2, 'granulocytes': 1})
  with pytest.raises(ValueError, match='granulocytes'):
    layouts.list_center('folder', str(tmp_path))


def test_empty_center_is_an_error_naming_it(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='empty'):
    layouts.list_center('folder', str(tmp_path / 'empty'))
  make_class_tree(str(tmp_path / 'only_platelets'), {'platelet': 3})
  with pytest.raises(ValueError, match='only_platelets'):
    layouts.list_center('folder', str(tmp_path / 'only_platelets'))
  with pytest.raises(FileNotFoundError, match='nowhere'):
    layouts.list_center('folder', str(tmp_path / 'nowhere'))


def test_center_missing_a_class_loads_with_a_warning(tmp_path, caplog):
  make_class_tree(str(tmp_path), {'eosinophil': 2, 'lymphocyte': 1, 'neutrophil': 3})
  with caplog.at_level(logging.WARNING):
    listing = layouts.list_center('folder', str(tmp_path))
  np.testing.assert_array_equal(np.bincount(listing.labels, minlength=5), [0, 2, 1, 0, 3])
  assert any('basophil, monocyte' in r.getMessage() for r in caplog.records)


def test_non_image_files_are_skipped_with_a_warning(tmp_path, caplog):
  make_class_tree(str(tmp_path), {'monocyte': 2})
  (tmp_path / 'monocyte' / 'notes.txt').write_text('not an image')
  (tmp_path / 'monocyte' / '.DS_Store').write_bytes(b'\0\0')
  (tmp_path / 'README.md').write_text('center description')
  with caplog.at_level(logging.WARNING):
    listing = layouts.list_center('folder', str(tmp_path))
  assert len(listing.files) == 2 and all(f.endswith('.jpg') for f in listing.files)
  messages = ' '.join(r.getMessage() for r in caplog.records)
  assert 'notes.txt' in messages and '.DS_Store' in messages and 'README.md' in messages


def test_fingerprint_changes_with_any_file(tmp_path):
  make_class_tree(str(tmp_path), {'monocyte': 2})
  before = layouts.fingerprint(str(tmp_path))
  assert layouts.fingerprint(str(tmp_path)) == before
  write_image(str(tmp_path / 'monocyte' / 'new.png'))
  assert layouts.fingerprint(str(tmp_path)) != before


def test_walk_images_is_recursive_and_sorted(tmp_path):
  for rel in ('b.png', 'a/z.jpg', 'a/b/c.bmp'):
    write_image(str(tmp_path / rel))
  (tmp_path / 'a' / 'list.csv').write_text('x')
  assert layouts.walk_images(str(tmp_path)) == sorted(
      ['b.png', os.path.join('a', 'z.jpg'), os.path.join('a', 'b', 'c.bmp')])
