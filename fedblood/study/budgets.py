"""Per-center privacy budgets in the simulation (``fl.dp.budget``): a center at its budget stops.

The simulation's counterpart of a deployed site's ``dp-epsilon-budget``
(:mod:`fedblood.deploy.site_privacy`), with the same accounting (:mod:`fedblood.privacy`): a
center the participation draw picks for round ``r`` takes part only if its epsilon after the
round, at ``fl.dp.delta``, stays within its budget. Otherwise it sits the round out (and every
later one: its epsilon cannot fall), as a deployed site at its budget declines, and the others
go on. Centers not named have no budget. The masks are a function of the config alone, so a
resumed run redraws the same ones.
"""

import math
from typing import Callable

import numpy as np

from fedblood import privacy


def of(fl_cfg) -> dict:
  """``{center: epsilon budget}`` of ``fl.dp.budget`` ({} when unset)."""
  dp = fl_cfg.get('dp') if hasattr(fl_cfg, 'get') else None
  raw = dp.get('budget') if dp is not None and hasattr(dp, 'get') else None
  return {str(k): v for k, v in dict(raw or {}).items()}


def check(fl_cfg, sizes: dict) -> None:
  """Refuses a ``fl.dp.budget`` naming no training center, not > 0, or without DP.

  ``sizes``: ``{center: n_train}`` of the centers that train.
  """
  given = of(fl_cfg)
  if not given:
    return
  if not privacy.enabled(fl_cfg):
    raise ValueError(f"config fl.dp.budget={given!r} needs fl.dp.mode='example' or 'client' "
                     "(a budget bounds an epsilon; without DP there is none)")
  for name, value in given.items():
    if name not in sizes:
      raise ValueError(f'config fl.dp.budget.{name}: no training center named {name!r}; the '
                       f'centers that train are {list(sizes)}')
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      raise ValueError(f'config fl.dp.budget.{name}={value!r} must be a number > 0')


def within(plan: privacy.Plan, given: dict, draw: Callable) -> Callable:
  """``draw`` (round -> bool[C]) less each center whose round would exceed its budget."""
  if not given:
    return draw
  limits = [float(given.get(name, math.inf)) for name in plan.centers]
  masks, steps = [], [0] * len(plan.centers)

  def budgeted(r: int) -> np.ndarray:
    while len(masks) < r:
      mask = np.array(draw(len(masks) + 1), bool)
      after = [s + plan.steps_per_round[k] * int(mask[k]) for k, s in enumerate(steps)]
      epsilons = privacy.epsilons(plan, after)
      mask &= np.array([e <= limit for e, limit in zip(epsilons, limits)])
      steps[:] = [a if m else s for a, s, m in zip(after, steps, mask)]
      masks.append(mask)
    return masks[r - 1].copy()

  return budgeted
