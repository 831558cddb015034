"""Intervals and paired tests on per-image correctness, and class priors of a new center.

* :func:`accuracy_interval`: a 95 % Wilson interval of an accuracy from its counts (every test
  image of a center over the folds, not one fold's 52-71 images).
* :func:`paired_comparison`: two models on the SAME test images: the accuracy difference with a
  paired bootstrap interval (:func:`scipy.stats.bootstrap`) and McNemar's exact test on the
  discordant images (:func:`scipy.stats.binomtest`). "A above B" means the interval excludes 0.
* :func:`em_priors`: the class priors of a new center's unlabelled images re-estimated by EM, and
  the posteriors corrected with them (Saerens, Latinne & Decaestecker, Neural Computation 2002):
  a center whose class mix differs from the federation's gets predictions for its own mix.
"""

from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats


def accuracy_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson score interval of ``correct / total`` (``(nan, nan)`` for no image)."""
  if total <= 0:
    return float('nan'), float('nan')
  ci = scipy_stats.binomtest(correct, total).proportion_ci(confidence, method='wilson')
  return float(ci.low), float(ci.high)


class Paired(NamedTuple):
  """``a`` against ``b`` on the same images (accuracies as fractions)."""
  n: int                 # images
  accuracy_a: float
  accuracy_b: float
  difference: float      # accuracy_a - accuracy_b
  low: float             # paired bootstrap interval of the difference
  high: float
  a_only: int            # images only a classifies correctly
  b_only: int            # images only b classifies correctly
  p_mcnemar: float       # exact two-sided McNemar p-value (1.0 with no discordant image)

  @property
  def verdict(self) -> str:
    """'above' / 'below' when the interval excludes 0, else 'tie' (inside the noise)."""
    return 'above' if self.low > 0 else 'below' if self.high < 0 else 'tie'

  @property
  def points(self) -> str:
    """The difference in points with its interval, as the reports print it."""
    return points(self.difference, self.low, self.high)


def points(difference: float, low: float, high: float) -> str:
  """A difference of accuracies (fractions) in points with its interval: ``'+1.2 [-0.3, +2.7]'``."""
  return f'{100 * difference:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]'


def paired_comparison(correct_a, correct_b, *, confidence: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> Paired:
  """Compares two models' correctness on the same images (bool arrays, same order).

  The bootstrap resamples images (pairs), so what the two models share cancels: a difference
  of a few images on 300 is told apart from noise better than two separate intervals would.
  """
  a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
  if a.shape != b.shape or a.ndim != 1 or not len(a):
    raise ValueError(f'paired_comparison: two equal-length 1-d arrays needed, got {a.shape} and '
                     f'{b.shape}')
  diff = a.astype(np.float64) - b.astype(np.float64)
  if np.all(diff == diff[0]):  # no spread: the bootstrap interval is the point
    low = high = float(diff[0])
  else:
    ci = scipy_stats.bootstrap((diff,), np.mean, confidence_level=confidence,
                               n_resamples=resamples, method='percentile',
                               rng=np.random.default_rng(seed)).confidence_interval
    low, high = float(ci.low), float(ci.high)
  a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
  discordant = a_only + b_only
  p = scipy_stats.binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
  return Paired(len(a), float(a.mean()), float(b.mean()), float(diff.mean()), low, high,
                a_only, b_only, float(p))


class Priors(NamedTuple):
  priors: np.ndarray       # [C] the new center's estimated class priors
  posteriors: np.ndarray   # [N, C] corrected posteriors
  iterations: int


def em_priors(posteriors, train_priors, *, tol: float = 1e-6, max_iter: int = 1000,
              floor: float = 1e-6) -> Priors:
  """Re-estimates class priors on unlabelled images by EM (Saerens et al. 2002).

  Args:
    posteriors: [N, C] the model's softmax outputs on the new center's images (trained under
      ``train_priors``).
    train_priors: [C] the class shares of the data the model was trained on.
    tol: stop when no prior moves by more than this.
    max_iter: at most this many EM steps.
    floor: smallest prior kept (a class absent at the new center keeps a trace, no division by 0).

  Returns:
    :class:`Priors`: the estimated priors, the posteriors re-weighted by
    ``priors / train_priors`` and renormalised, and the EM steps taken.
  """
  p = np.asarray(posteriors, np.float64)
  train = np.asarray(train_priors, np.float64)
  if p.ndim != 2 or p.shape[1] != train.shape[0] or not len(p):
    raise ValueError(f'em_priors: posteriors [N, C] and train_priors [C] needed, got {p.shape} '
                     f'and {train.shape}')
  if np.any(train <= 0):
    raise ValueError(f'em_priors: every training prior must be > 0, got {train.tolist()}')
  train = train / train.sum()
  priors = train.copy()
  for step in range(1, max_iter + 1):
    weighted = p * (priors / train)
    adjusted = weighted / weighted.sum(axis=1, keepdims=True)
    new = np.maximum(adjusted.mean(axis=0), floor)
    new /= new.sum()
    moved = np.max(np.abs(new - priors))
    priors = new
    if moved < tol:
      break
  weighted = p * (priors / train)
  return Priors(priors, weighted / weighted.sum(axis=1, keepdims=True), step)
