"""Classification metrics per center and per class (scikit-learn), JSON-ready.

Every center gets the same dictionary (plain Python floats / ints / lists, so
it goes straight into ``results.json`` and ``metrics.jsonl``)::

  m = metrics.classify(y_true, y_pred)          # labels are ints in 0..num_classes-1
  m['accuracy'], m['f1'], m['per_class']['basophil']['recall'], m['confusion']

Absent classes. Real centers miss classes in their test split (the shared
Jiangxi Tecom set has one basophil in all). A class with no true sample has no
recall, so its F1 is undefined too; averaging a 0 for it (scikit-learn's
``zero_division=0`` over ``labels=range(5)``) would silently pull every macro
mean down by a fifth. Here:

- the macro means (``precision``, ``recall``, ``specificity``, ``f1``,
  ``balanced_accuracy``) run over the classes PRESENT in ``y_true`` only;
  ``classes_present`` names them, so a reader sees what was averaged;
- an absent class keeps its row in ``per_class`` with ``support`` 0,
  ``recall`` and ``f1`` None (JSON null), ``precision`` 0.0 if the model
  predicted it anyway (those are all false positives) and None if it never
  did, and its ``specificity`` (well defined: every sample is a negative);
- a present class the model never predicts has precision 0.0 (scikit-learn's
  ``zero_division=0``): never predicting a class that exists is a failure;
- the confusion matrix always spans all classes (``labels=range(K)``).

``balanced_accuracy`` equals the macro recall by definition and matches
``sklearn.metrics.balanced_accuracy_score``, which also drops absent classes.
"""

from typing import Sequence

import numpy as np
from sklearn import metrics as skm

from fedblood.labels import CLASSES

# Keys of a center's summary that the tables show, in table order.
HEADLINE = ('accuracy', 'balanced_accuracy', 'precision', 'recall', 'specificity', 'f1')


def _none_if_nan(x) -> float | None:
  x = float(x)
  return None if np.isnan(x) else x


def classify(y_true, y_pred, class_names: Sequence[str] = CLASSES) -> dict:
  """Metrics of one center's predictions.

  Args:
    y_true: int labels, shape [N].
    y_pred: predicted int labels, shape [N].
    class_names: names of labels 0..K-1.

  Returns:
    A dict with ``n``, ``accuracy``, ``balanced_accuracy`` and macro
    ``precision``, ``recall`` (sensitivity), ``specificity``, ``f1`` over the
    classes present in ``y_true``; ``classes_present``; ``per_class``
    ({name: {precision, recall, specificity, f1, support}}) and ``confusion``
    (K x K list, rows = true class, columns = predicted class); ``labels`` and
    ``predictions`` (per image, as lists).

  Raises:
    ValueError: on mismatched lengths or labels outside 0..K-1.
  """
  y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
  y_pred = np.asarray(y_pred).astype(np.int64).reshape(-1)
  k = len(class_names)
  _check_labels(y_true, y_pred, k)
  confusion, precision, recall, f1, specificity = _per_class_arrays(y_true, y_pred, k)
  support = confusion.sum(axis=1)
  present = [c for c in range(k) if support[c] > 0]

  def macro(values):
    vals = [values[c] for c in present if not np.isnan(values[c])]
    return float(np.mean(vals)) if vals else None

  return {
      'n': int(y_true.size),
      'accuracy': float(np.mean(y_true == y_pred)) if y_true.size else None,
      'balanced_accuracy': macro(recall),
      'precision': macro(precision),
      'recall': macro(recall),
      'specificity': macro(specificity),
      'f1': macro(f1),
      'classes_present': [class_names[c] for c in present],
      'per_class': _per_class(class_names, confusion, precision, recall, f1, specificity),
      'confusion': confusion.astype(int).tolist(),
      'labels': y_true.tolist(),        # per image, in the split's order: what pooled
      'predictions': y_pred.tolist(),   # intervals and paired comparisons are made of
  }


def _check_labels(y_true, y_pred, k: int) -> None:
  if y_true.shape != y_pred.shape:
    raise ValueError(f'y_true has {y_true.size} labels but y_pred has {y_pred.size}')
  for name, y in (('y_true', y_true), ('y_pred', y_pred)):
    if y.size and (y.min() < 0 or y.max() >= k):
      bad = sorted(set(y.tolist()) - set(range(k)))
      raise ValueError(f'{name} holds labels outside 0..{k - 1}: {bad}')


def _per_class_arrays(y_true, y_pred, k: int):
  """``(confusion [K, K], precision, recall, f1, specificity)``, each per class ``[K]``."""
  labels = list(range(k))
  confusion = (skm.confusion_matrix(y_true, y_pred, labels=labels) if y_true.size
               else np.zeros((k, k), int))
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  precision, recall, f1, _ = skm.precision_recall_fscore_support(
      y_true, y_pred, labels=labels, average=None, zero_division=0) if y_true.size else (
          np.zeros(k), np.zeros(k), np.zeros(k), None)
  # Per-class binary confusion (one vs rest): [[tn, fp], [fn, tp]].
  tn = y_true.size - support - predicted + np.diag(confusion)
  fp = predicted - np.diag(confusion)
  with np.errstate(invalid='ignore', divide='ignore'):
    specificity = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), np.nan)
  return confusion, precision, recall, f1, specificity


def _per_class(class_names, confusion, precision, recall, f1, specificity) -> dict:
  """``{name: {precision, recall, specificity, f1, support}}``; absent classes as documented."""
  support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
  per_class = {}
  for c, name in enumerate(class_names):
    absent = support[c] == 0
    per_class[name] = {
        'precision': (None if predicted[c] == 0 else 0.0) if absent else float(precision[c]),
        'recall': None if absent else float(recall[c]),
        'specificity': _none_if_nan(specificity[c]),
        'f1': None if absent else float(f1[c]),
        'support': int(support[c]),
    }
  return per_class


def summary(center_metrics: dict) -> dict:
  """The headline numbers of one center's metrics (what tables and results.json show)."""
  return {key: center_metrics[key] for key in ('n',) + HEADLINE}


def mean_over(per_center: dict, key: str, centers: Sequence[str] | None = None) -> float | None:
  """Unweighted mean of ``key`` over centers (None values skipped)."""
  names = per_center if centers is None else centers
  vals = [per_center[c][key] for c in names if per_center[c].get(key) is not None]
  return float(np.mean(vals)) if vals else None
