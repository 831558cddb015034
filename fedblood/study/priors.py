"""A new center's own class mix: the class priors re-estimated on its unlabelled images.

A model learns the class shares of the data it was trained on; a center whose mix differs (a
new hospital's: more lymphocytes, fewer neutrophils) gets predictions skewed toward the
training mix. With ``priors='em'``, ``--mode evaluate`` / ``predict`` re-estimate the new
center's priors by EM on the model's posteriors for its images, labels unused (Saerens,
Latinne & Decaestecker, Neural Computation 2002; :func:`fedblood.stats.em_priors`), and
classify with the posteriors corrected for them.

The training shares come from the run's data listing (nothing decoded,
:func:`fedblood.data.plan.plan`): the reference center's training split for the reference
model (round 0); every FL center's training split pooled for an FL model (FedDyn's and
FedAvg's objective weighs centers by size, so the pooled shares are what it learned). A class
absent from training counts as one image, so that no prior is 0.
"""

import numpy as np

from fedblood import stats
from fedblood.data import plan as plan_lib
from fedblood.model import metrics

PRIORS = ('train', 'em')


def train_priors(config, round_index: int) -> np.ndarray:
  """``[C]`` class shares of the training data of the model of ``round_index`` (0: reference)."""
  centers = plan_lib.plan(config.data)
  if round_index == 0:
    centers = centers[:1]
  else:
    holdout = set(config.fl.get('holdout', ()) or ())
    centers = [c for c in centers if c.name not in holdout]
  k = len(metrics.CLASSES)
  counts = sum(np.bincount(np.asarray(c.train.labels, np.int64), minlength=k) for c in centers)
  counts = np.maximum(np.asarray(counts, np.float64), 1.0)
  return counts / counts.sum()


def held_out(exp, config, round_index: int, trainable, frozen, centers) -> tuple[dict, dict]:
  """Table 2 at centers that never joined (``fl.holdout``), each with its own class priors.

  The priors are re-estimated by EM on the model's posteriors for all of the center's images
  (labels unused: none of them trained anything), then its test split is classified with the
  corrected posteriors. Returns ``({center: metrics}, {center: priors info})``.
  """
  out, info = {}, {}
  for center in centers:
    splits = (center.train, center.val, center.test)
    probs = exp.predict(trainable, frozen, np.concatenate([s.images for s in splits]))
    adjusted, info[center.name] = adjust(probs, config, round_index, 'em')
    test = adjusted[len(adjusted) - len(center.test.labels):]
    out[center.name] = metrics.classify(center.test.labels, test.argmax(-1))
  return out, info


def check(priors: str) -> str:
  """``priors`` if it is one of :data:`PRIORS`; ValueError naming ``--priors`` otherwise."""
  if priors not in PRIORS:
    raise ValueError(f'--priors {priors!r}: expected one of {PRIORS}')
  return priors


def adjust(probs, config, round_index: int, priors: str):
  """``(probs to classify with, info or None)``: ``probs`` as they are for 'train'; for 'em'
  corrected for the priors EM estimates on them, with ``info`` = {'train', 'estimated',
  'iterations'} (priors by class name)."""
  if check(priors) == 'train':
    return probs, None
  train = train_priors(config, round_index)
  out = stats.em_priors(probs, train)
  named = lambda v: {c: float(x) for c, x in zip(metrics.CLASSES, v)}
  return out.posteriors, {'train': named(train), 'estimated': named(out.priors),
                          'iterations': int(out.iterations)}
