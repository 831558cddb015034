"""Metrics against confusion matrices computed by hand."""

import numpy as np
import pytest
from sklearn import metrics as skm

from fedblood.model import metrics

B, E, L, M, N = range(5)


def test_all_classes_present_hand_computed():
  # 10 samples. Confusion (rows true, cols pred):
  #   B: 2 B          -> B row [2,0,0,0,0]
  #   E: 1 E, 1 N     -> E row [0,1,0,0,1]
  #   L: 2 L, 1 M     -> L row [0,0,2,1,0]
  #   M: 1 M          -> M row [0,0,0,1,0]
  #   N: 1 N, 1 B     -> N row [1,0,0,0,1]
  y_true = [B, B, E, E, L, L, L, M, N, N]
  y_pred = [B, B, E, N, L, L, M, M, N, B]
  m = metrics.classify(y_true, y_pred)
  assert m['confusion'] == [[2, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 2, 1, 0],
                            [0, 0, 0, 1, 0], [1, 0, 0, 0, 1]]
  assert m['n'] == 10
  assert m['accuracy'] == pytest.approx(7 / 10)
  # precision: B 2/3, E 1/1, L 2/2, M 1/2, N 1/2
  # recall:    B 2/2, E 1/2, L 2/3, M 1/1, N 1/2
  prec = [2 / 3, 1, 1, 1 / 2, 1 / 2]
  rec = [1, 1 / 2, 2 / 3, 1, 1 / 2]
  f1 = [2 * p * r / (p + r) for p, r in zip(prec, rec)]
  # specificity = TN / (TN + FP): negatives are 10 - support; FP = predicted - TP.
  # B: FP 1, neg 8 -> 7/8; E: FP 0 -> 1; L: FP 0 -> 1; M: FP 1, neg 9 -> 8/9; N: FP 1, neg 8 -> 7/8
  spec = [7 / 8, 1, 1, 8 / 9, 7 / 8]
  assert m['precision'] == pytest.approx(np.mean(prec))
  assert m['recall'] == pytest.approx(np.mean(rec))
  assert m['balanced_accuracy'] == pytest.approx(np.mean(rec))
  assert m['f1'] == pytest.approx(np.mean(f1))
  assert m['specificity'] == pytest.approx(np.mean(spec))
  for c, name in enumerate(metrics.CLASSES):
    pc = m['per_class'][name]
    assert pc['precision'] == pytest.approx(prec[c])
    assert pc['recall'] == pytest.approx(rec[c])
    assert pc['f1'] == pytest.approx(f1[c])
    assert pc['specificity'] == pytest.approx(spec[c])
  assert [m['per_class'][n]['support'] for n in metrics.CLASSES] == [2, 2, 3, 1, 2]
  assert m['classes_present'] == list(metrics.CLASSES)
  # Same as scikit-learn's macro when every class is present.
  assert m['f1'] == pytest.approx(skm.f1_score(y_true, y_pred, average='macro'))


def test_absent_class_excluded_from_macro_not_zeroed():
  # No basophil in y_true; the model predicts basophil once (a false positive).
  #   E: 2 E            L: 1 L, 1 B          N: 2 N
  y_true = [E, E, L, L, N, N]
  y_pred = [E, E, L, B, N, N]
  m = metrics.classify(y_true, y_pred)
  assert m['confusion'][B] == [0, 0, 0, 0, 0]
  assert m['confusion'][L] == [1, 0, 1, 0, 0]
  assert m['classes_present'] == ['eosinophil', 'lymphocyte', 'neutrophil']
  # Present classes: E (p 1, r 1), L (p 1, r 1/2), N (p 1, r 1); monocyte absent, never predicted.
  assert m['recall'] == pytest.approx((1 + 0.5 + 1) / 3)
  assert m['precision'] == pytest.approx(1.0)
  assert m['f1'] == pytest.approx((1 + 2 / 3 + 1) / 3)
  # Specificity: E 4/4, L 4/4, N 4/4 (the false basophil is a negative for all three).
  assert m['specificity'] == pytest.approx(1.0)
  baso, mono = m['per_class']['basophil'], m['per_class']['monocyte']
  assert baso == {'precision': 0.0, 'recall': None, 'specificity': pytest.approx(5 / 6),
                  'f1': None, 'support': 0}
  assert mono == {'precision': None, 'recall': None, 'specificity': 1.0, 'f1': None, 'support': 0}
  with pytest.warns(UserWarning, match='y_pred contains classes not in y_true'):
    expected = skm.balanced_accuracy_score(y_true, y_pred)  # scikit-learn drops absent classes too
  assert m['balanced_accuracy'] == pytest.approx(expected)


def test_present_class_never_predicted_counts_as_zero_precision():
  y_true = [B, M, M, M]
  y_pred = [M, M, M, M]
  m = metrics.classify(y_true, y_pred)
  assert m['per_class']['basophil'] == {'precision': 0.0, 'recall': 0.0, 'specificity': 1.0,
                                        'f1': 0.0, 'support': 1}
  # Monocyte: precision 3/4, recall 1, f1 6/7; specificity 0/1 (the one negative is predicted M).
  assert m['per_class']['monocyte']['specificity'] == 0.0
  assert m['f1'] == pytest.approx((0 + 6 / 7) / 2)
  assert m['accuracy'] == pytest.approx(0.75)


def test_single_class_center_has_no_specificity():
  m = metrics.classify([N, N, N], [N, N, E])
  assert m['per_class']['neutrophil']['specificity'] is None  # no negatives at all
  assert m['specificity'] is None
  assert m['recall'] == pytest.approx(2 / 3)
  assert m['per_class']['eosinophil']['precision'] == 0.0


def test_empty_split():
  m = metrics.classify([], [])
  assert m['n'] == 0 and m['accuracy'] is None and m['f1'] is None
  assert m['confusion'] == [[0] * 5 for _ in range(5)]


def test_bad_labels():
  with pytest.raises(ValueError, match='outside 0..4'):
    metrics.classify([0, 5], [0, 1])
  with pytest.raises(ValueError, match='2 labels but y_pred has 3'):
    metrics.classify([0, 1], [0, 1, 2])


def test_summary_and_mean_over():
  per_center = {'a': metrics.classify([0, 1], [0, 1]), 'b': metrics.classify([0, 1], [0, 0])}
  assert metrics.summary(per_center['b'])['accuracy'] == 0.5
  assert set(metrics.summary(per_center['a'])) == {'n', *metrics.HEADLINE}
  assert metrics.mean_over(per_center, 'accuracy') == pytest.approx(0.75)
  assert metrics.mean_over(per_center, 'accuracy', ['b']) == pytest.approx(0.5)
