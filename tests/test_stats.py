"""Wilson intervals, the paired comparison and EM class priors on inputs with known answers."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from fedblood import stats


def test_wilson_interval_known_values():
  low, high = stats.accuracy_interval(85, 100)
  assert (round(low, 4), round(high, 4)) == (0.7672, 0.9069)  # Wilson, z = 1.96
  low, high = stats.accuracy_interval(0, 10)
  assert low == pytest.approx(0.0, abs=1e-12) and 0.27 < high < 0.28
  assert all(np.isnan(stats.accuracy_interval(0, 0)))


def test_interval_narrows_with_every_image():
  one_fold = np.diff(stats.accuracy_interval(52, 61))[0]
  all_folds = np.diff(stats.accuracy_interval(260, 305))[0]
  assert all_folds < 0.5 * one_fold


def test_paired_comparison_tells_a_real_gap_from_noise():
  rng = np.random.default_rng(0)
  base = rng.random(300) < 0.8
  better = base.copy()
  better[np.flatnonzero(~base)[:30]] = True          # 30 more right, none lost
  res = stats.paired_comparison(better, base)
  assert res.n == 300 and res.a_only == 30 and res.b_only == 0
  assert res.difference == pytest.approx(0.1) and res.verdict == 'above'
  assert res.p_mcnemar == pytest.approx(scipy_stats.binomtest(30, 30).pvalue)
  shuffled = base.copy()
  flip = np.flatnonzero(base)[:3], np.flatnonzero(~base)[:3]   # 3 gained, 3 lost
  shuffled[flip[0]], shuffled[flip[1]] = False, True
  tie = stats.paired_comparison(shuffled, base)
  assert tie.difference == 0 and tie.verdict == 'tie' and tie.p_mcnemar == 1.0
  assert stats.paired_comparison(base, better).verdict == 'below'


def test_paired_comparison_identical_models_and_bad_input():
  same = np.array([True, False, True])
  res = stats.paired_comparison(same, same)
  assert (res.low, res.high, res.p_mcnemar, res.verdict) == (0.0, 0.0, 1.0, 'tie')
  assert res.points == '+0.0 [+0.0, +0.0]'
  assert stats.points(0.1, -0.0234, 0.25) == '+10.0 [-2.3, +25.0]'
  with pytest.raises(ValueError, match='paired_comparison'):
    stats.paired_comparison([True], [True, False])


def _bayes_posteriors(labels, priors, means, rng):
  """Exact posteriors of 1-d Gaussian classes (unit variance) under ``priors``."""
  x = means[labels] + rng.standard_normal(len(labels))
  like = np.exp(-0.5 * (x[:, None] - means[None]) ** 2)
  joint = like * priors
  return joint / joint.sum(1, keepdims=True)


def test_em_recovers_a_new_centers_priors_and_helps():
  rng = np.random.default_rng(1)
  means = np.array([0.0, 1.5, 3.0])
  train = np.array([0.6, 0.3, 0.1])
  new = np.array([0.1, 0.3, 0.6])
  labels = rng.choice(3, size=20000, p=new)
  post = _bayes_posteriors(labels, train, means, rng)
  res = stats.em_priors(post, train)
  np.testing.assert_allclose(res.priors, new, atol=0.02)
  assert np.mean(res.posteriors.argmax(1) == labels) > np.mean(post.argmax(1) == labels) + 0.05
  np.testing.assert_allclose(res.posteriors.sum(1), 1.0)


def test_em_keeps_the_training_priors_when_nothing_shifted():
  rng = np.random.default_rng(2)
  means = np.array([0.0, 2.0])
  train = np.array([0.7, 0.3])
  labels = rng.choice(2, size=20000, p=train)
  res = stats.em_priors(_bayes_posteriors(labels, train, means, rng), train)
  np.testing.assert_allclose(res.priors, train, atol=0.02)


def test_em_bad_input():
  with pytest.raises(ValueError, match='train_priors'):
    stats.em_priors(np.ones((4, 3)) / 3, [0.5, 0.5])
  with pytest.raises(ValueError, match='> 0'):
    stats.em_priors(np.ones((4, 2)) / 2, [1.0, 0.0])
