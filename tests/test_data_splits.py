"""Stratified, deterministic, disjoint splits; tiny classes; class counts."""

import logging

import numpy as np
import pytest

from fedblood.data import splits
from fedblood.data.splits import TEST, TRAIN, VAL


def _center(counts):
  labels = np.repeat(np.arange(len(counts)), counts)
  files = [f'c{l}/img_{i:04d}.jpg' for i, l in enumerate(labels)]
  return files, labels


@pytest.mark.parametrize('n, expected', [
    (0, (0, 0, 0)), (1, (1, 0, 0)), (2, (2, 0, 0)), (3, (3, 0, 0)), (4, (2, 1, 1)),
    (7, (5, 1, 1)), (175, (123, 26, 26)), (485, (339, 73, 73)),
])
def test_split_sizes(n, expected):
  assert splits.split_sizes(n, 0.15, 0.15) == expected


def test_split_sizes_never_empty_train():
  for n in range(1, 12):
    train, val, test = splits.split_sizes(n, 0.45, 0.5)
    assert train >= 1 and train + val + test == n


def test_stratified_disjoint_and_exact_sizes():
  counts = (175, 453, 177, 207, 485)
  files, labels = _center(counts)
  which = splits.assign(files, labels, 0.15, 0.15, seed=0)
  assert set(np.unique(which)) == {TRAIN, VAL, TEST}  # each file in exactly one split
  for c, n in enumerate(counts):
    got = tuple(int(np.sum((labels == c) & (which == s))) for s in (TRAIN, VAL, TEST))
    assert got == splits.split_sizes(n, 0.15, 0.15)


def test_deterministic_and_independent_of_input_order():
  files, labels = _center((20, 30, 25, 12, 40))
  which = splits.assign(files, labels, 0.2, 0.1, seed=3)
  np.testing.assert_array_equal(which, splits.assign(files, labels, 0.2, 0.1, seed=3))
  perm = np.random.default_rng(0).permutation(len(files))
  shuffled = splits.assign([files[i] for i in perm], labels[perm], 0.2, 0.1, seed=3)
  np.testing.assert_array_equal(shuffled, which[perm])
  assert (splits.assign(files, labels, 0.2, 0.1, seed=4) != which).any()


def test_golden_assignment():
  # Fixed on every machine: sha256 of '<seed>:<file>' orders each class.
  files, labels = _center((5, 5))
  def code(seed):
    return ''.join('tvs'[w] for w in splits.assign(files, labels, 0.2, 0.2, seed=seed))
  assert code(0) == 'stttvtvtst'
  assert code(1) == 'vtsttsvttt'


def test_adding_files_keeps_existing_test_files_in_test():
  files, labels = _center((40, 40))
  which = splits.assign(files, labels, 0.25, 0.25, seed=0)
  more_files = files + [f'c0/new_{i}.jpg' for i in range(4)]
  more_labels = np.concatenate([labels, np.zeros(4, int)])
  which2 = splits.assign(more_files, more_labels, 0.25, 0.25, seed=0)
  # Class 1 is unchanged, so its assignment is too.
  np.testing.assert_array_equal(which2[:80][labels == 1], which[labels == 1])


def test_tiny_classes_stay_in_train_and_are_reported(caplog):
  files, labels = _center((1, 3, 20, 0, 2))
  with caplog.at_level(logging.WARNING):
    which = splits.assign(files, labels, 0.15, 0.15, seed=0, center='jtsc')
  assert (which[labels == 0] == TRAIN).all() and (which[labels == 1] == TRAIN).all()
  assert (which[labels == 4] == TRAIN).all()
  assert (which[labels == 2] == TEST).sum() == 3
  message = ' '.join(r.getMessage() for r in caplog.records)
  assert 'jtsc' in message and 'basophil (1' in message and 'eosinophil (3' in message
  assert 'lymphocyte' not in message


@pytest.mark.parametrize('val, test', [(0.5, 0.5), (-0.1, 0.2), (0.2, 1.0)])
def test_bad_fractions_name_the_config_keys(val, test):
  files, labels = _center((10,))
  with pytest.raises(ValueError, match='data.val_fraction'):
    splits.assign(files, labels, val, test, seed=0)


def test_duplicate_files_are_an_error():
  with pytest.raises(ValueError, match='Duplicate'):
    splits.assign(['a.jpg', 'a.jpg'], [0, 0], 0.1, 0.1, seed=0, center='x')


def test_class_counts():
  np.testing.assert_array_equal(splits.class_counts(np.array([4, 4, 0, 2])), [1, 0, 1, 0, 2])
  assert splits.class_counts(np.zeros(0, np.int32)).tolist() == [0, 0, 0, 0, 0]


def test_k_folds_test_every_image_once_stratified():
  counts = (3, 41, 17, 26, 58)
  files, labels = _center(counts)
  runs = [splits.assign(files, labels, 0.15, 0.15, seed=1, folds=5, fold=f) for f in range(5)]
  tested = np.stack([w == TEST for w in runs])
  assert (tested.sum(0) == 1).all()  # every image is a test image in exactly one fold
  for c, n in enumerate(counts):
    per_fold = tested[:, labels == c].sum(1)
    assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == n
  for which in runs:
    for c, n in enumerate(counts):
      n_val = int(np.sum((labels == c) & (which == VAL)))
      n_train = int(np.sum((labels == c) & (which == TRAIN)))
      n_test = int(np.sum((labels == c) & (which == TEST)))
      assert n_val == min(int(np.floor(n * 0.15 + 0.5)), n - n_test - 1)
      assert n_train >= 1


def test_k_folds_deterministic_and_seeded():
  files, labels = _center((30, 30, 30, 30, 30))
  a = splits.assign(files, labels, 0.15, 0.15, seed=0, folds=5, fold=2)
  np.testing.assert_array_equal(a, splits.assign(files, labels, 0.15, 0.15, seed=0, folds=5,
                                                 fold=2))
  assert (a != splits.assign(files, labels, 0.15, 0.15, seed=1, folds=5, fold=2)).any()


def test_no_folds_is_the_fraction_split():
  files, labels = _center((175, 453, 177, 207, 485))
  np.testing.assert_array_equal(splits.assign(files, labels, 0.15, 0.15, seed=0),
                                splits.assign(files, labels, 0.15, 0.15, seed=0, folds=0, fold=0))


@pytest.mark.parametrize('folds, fold, key', [(1, 0, 'data.folds'), (-2, 0, 'data.folds'),
                                              (5, 5, 'data.fold'), (5, -1, 'data.fold'),
                                              (0, 1, 'data.fold'), (2.0, 0, 'data.folds')])
def test_bad_folds_refused(folds, fold, key):
  with pytest.raises(ValueError, match=rf'^{key}='):
    splits.check_folds(folds, fold)
