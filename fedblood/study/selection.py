"""Model selection rules of a centralized fit: when early stopping may count, balanced batches.

Pure functions of plain values, so each rule is tested exactly on a made-up case:

* :func:`stop_counts`: whether an epoch may count towards early stopping. With
  ``recipe.stop_below_lr < 1`` only epochs that end after the warmup with the learning rate
  decayed to at most that fraction of its peak count; before, a plateau of the validation
  score at peak lr (a noisy phase) cannot end the fit. The best epoch is still chosen on
  validation over every epoch.
* :func:`advance`: the early-stopping record after one epoch's validation score.
* :func:`balanced_order`: one epoch's example order in which every group (center) of a pooled
  training set is drawn the same number of times, whatever its size.
* :func:`center_mean`: the unweighted mean over centers of their validation summaries, the
  monitor of a pooled fit that the largest center does not dominate.
* :func:`val_splits`, :func:`validation`: a fit's validation (one split, or a list of splits
  monitored by their :func:`center_mean`) from its non-empty splits' metrics, however they were
  predicted (the network whole, or the frozen blocks' features kept).
"""

import math
from typing import Sequence

import jax
import numpy as np

from fedblood.model import metrics


def stop_counts(recipe, epoch: int, steps_per_epoch: int, total_steps: int, lr_fn) -> bool:
  """Whether epoch ``epoch`` (1-based) may count towards ``recipe.patience``.

  Args:
    recipe: the fit's recipe; ``stop_below_lr`` (default 1.0: every epoch counts).
    epoch: the epoch just trained.
    steps_per_epoch, total_steps: the schedule's shape.
    lr_fn: ``lr_fn(recipe, step, total_steps, steps_per_epoch) -> lr`` (the fit's schedule).
  """
  fraction = recipe.get('stop_below_lr', 1.0)
  if fraction >= 1.0:
    return True
  last_step = epoch * steps_per_epoch - 1
  warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
  lr = lr_fn(recipe, last_step, total_steps, steps_per_epoch)
  return last_step >= warmup and lr <= fraction * recipe.lr


def advance(track: dict, epoch: int, score: float, counts: bool, val_summary) -> dict:
  """The early-stopping record after ``epoch``'s validation ``score`` (higher is better).

  An epoch that does not ``counts`` (see :func:`stop_counts`) leaves ``bad_epochs`` at 0: the
  patience window starts in the decayed phase. The best epoch is tracked over every epoch.
  """
  improved = score > track['best']
  bad = 0 if improved or not counts else track['bad_epochs'] + 1
  return {'epoch': epoch, 'best_epoch': epoch if improved else track['best_epoch'],
          'best': max(score, track['best']), 'bad_epochs': bad,
          'best_val': val_summary if improved and val_summary else track['best_val']}


def balanced_order(rng, groups: np.ndarray) -> np.ndarray:
  """One epoch's example indices, every group drawn ``ceil(N / G)`` times.

  Each group contributes its own random permutation, repeated as often as needed (a small
  center is oversampled, every example at least ``floor(per / n_g)`` times) or cut (a large
  center is undersampled, no example twice); the result is shuffled.

  Args:
    rng: a JAX PRNG key.
    groups: ``[N]`` int group (center) id of every training example.
  """
  ids = np.unique(groups)
  per = math.ceil(len(groups) / len(ids))
  parts = []
  for g, gid in enumerate(ids):
    members = np.flatnonzero(groups == gid)
    order = members[np.asarray(jax.random.permutation(jax.random.fold_in(rng, g),
                                                      len(members)))]
    parts.append(np.resize(order, per))
  drawn = np.concatenate(parts)
  return drawn[np.asarray(jax.random.permutation(jax.random.fold_in(rng, len(ids)), len(drawn)))]


def center_mean(summaries: Sequence[dict]) -> dict:
  """The unweighted mean over centers of each metric of their summaries (``n`` summed)."""
  out = {'n': int(sum(s['n'] for s in summaries))}
  for key in summaries[0]:
    if key == 'n':
      continue
    vals = [s[key] for s in summaries if s.get(key) is not None and not _nan(s[key])]
    out[key] = float(np.mean(vals)) if vals else None
  return out


def _nan(x) -> bool:
  return isinstance(x, float) and math.isnan(x)


def val_splits(val) -> list:
  """The non-empty splits of a fit's ``val`` (a split, or a list of splits), in order."""
  return [v for v in (val if isinstance(val, list) else [val]) if len(v.labels)]


def validation(val, per: Sequence[dict]) -> tuple:
  """``(metrics or None, summary or None)`` of a fit's ``val`` from the full metrics of its
  :func:`val_splits`, in order: a list is monitored by the :func:`center_mean` of their
  summaries (no metrics), one split by its own; no images, ``(None, None)``."""
  if not per:
    return None, None
  if isinstance(val, list):  # (a Split is a NamedTuple: a tuple)
    return None, center_mean([metrics.summary(m) for m in per])
  return per[0], metrics.summary(per[0])
