"""Deterministic stratified train / validation / test splits, and class counts.

Each file gets a score ``sha256(f'{seed}:{relative path}')``; within each class the files with the
lowest scores go to test, the next to validation, the rest to train. Hashes of names (instead of
a seeded numpy permutation) make the split identical on every machine and numpy version, and
stable when images are added: an existing file only moves if its class's split sizes change.

With ``folds`` = k > 1 (``data.folds``), the test split is fold ``fold`` of a stratified k-fold
partition instead of a ``test_fraction`` share: within each class, the file of rank i (in score
order) is in fold ``i % k``, so the k runs ``fold = 0..k-1`` test every image exactly once and each
fold holds a class's images to within one. Validation is then the ``val_fraction`` share of the
class, taken in score order from the files outside the test fold; train keeps the rest.
"""

import hashlib

from absl import logging
import numpy as np

from fedblood.data.layouts import CLASSES

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ('train', 'validation', 'test')


def check_folds(folds: int, fold: int):
  """``data.folds`` is 0 (no folds: ``data.test_fraction``) or k >= 2; 0 <= ``data.fold`` < k."""
  integer = lambda x: isinstance(x, int) and not isinstance(x, bool)
  if not integer(folds) or folds < 0 or folds == 1:
    raise ValueError(f'data.folds={folds!r} must be 0 (a test_fraction split) or an integer >= 2 '
                     '(k-fold: the test split is one fold)')
  if not integer(fold) or not 0 <= fold < max(folds, 1):
    raise ValueError(f'data.fold={fold!r} must be an integer in [0, {max(folds - 1, 0)}] '
                     f'(data.folds={folds})')


def check_fractions(val_fraction: float, test_fraction: float):
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise ValueError(
        f'data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in '
        '[0, 1) and sum to less than 1 (train keeps the rest)')


def _score(seed: int, name: str) -> int:
  return int.from_bytes(hashlib.sha256(f'{seed}:{name}'.encode()).digest()[:8], 'big')


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
  """(train, val, test) sizes of a class of ``n`` images; rounds half up, train keeps the rest."""
  n_test = int(np.floor(n * test_fraction + 0.5))
  n_val = int(np.floor(n * val_fraction + 0.5))
  # Tiny classes with large fractions: give back validation, then test, so train is never empty.
  n_val = max(0, min(n_val, n - 1 - n_test))
  n_test = max(0, min(n_test, n - 1 - n_val))
  return n - n_val - n_test, n_val, n_test


def assign(files, labels, val_fraction: float, test_fraction: float, seed: int,
           center: str = '', folds: int = 0, fold: int = 0, warn: bool = True) -> np.ndarray:
  """Assigns each file to TRAIN, VAL or TEST, stratified by class.

  Args:
    files: relative file names (unique within the center).
    labels: int class indices, same length.
    val_fraction, test_fraction: shares of each class for validation and test.
    seed: changes the assignment.
    center: for the log line about classes too small to split.
    folds, fold: with ``folds`` >= 2, the test split is fold ``fold`` of a stratified
      ``folds``-fold partition and ``test_fraction`` is not used (module docstring).
    warn: log that line (the data plan of validation lists the split again, quietly).

  Returns:
    int8 [N] of TRAIN / VAL / TEST. A class whose validation or test share rounds to zero images
    (e.g. 1-3 basophils) keeps those images in train; this is logged, never an error.
  """
  check_fractions(val_fraction, test_fraction)
  check_folds(folds, fold)
  labels = np.asarray(labels)
  if len(set(files)) != len(files):
    raise ValueError(f'Duplicate file names in center {center!r}')
  out = np.full(len(files), TRAIN, np.int8)
  small, wants_test = [], bool(folds or test_fraction)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    order = idx[np.argsort([_score(seed, files[i]) for i in idx], kind='stable')]
    if folds:
      in_fold = np.arange(len(order)) % folds == fold
      n_test = int(in_fold.sum())
      rest = order[~in_fold]
      n_val = max(0, min(int(np.floor(len(idx) * val_fraction + 0.5)), len(rest) - 1))
      out[order[in_fold]] = TEST
      out[rest[:n_val]] = VAL
    else:
      _, n_val, n_test = split_sizes(len(idx), val_fraction, test_fraction)
      out[order[:n_test]] = TEST
      out[order[n_test:n_test + n_val]] = VAL
    if (val_fraction and not n_val) or (wants_test and not n_test):
      small.append(f'{CLASSES[c]} ({len(idx)}: {len(idx) - n_val - n_test}/{n_val}/{n_test})')
  if small and warn:
    logging.warning('Center %s: too few images to split class(es) %s [train/val/test]; the '
                    'missing shares stay in train', center, ', '.join(small))
  return out


def class_counts(split) -> np.ndarray:
  """Images per class of a Split (or a label array): int64 [5]. ``sum`` is n_k for FedDyn."""
  labels = getattr(split, 'labels', split)
  return np.bincount(np.asarray(labels, np.int64), minlength=len(CLASSES))
