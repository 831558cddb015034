r"""Leave-one-center-out on configs/wbc.py's centers: a center that never joined, over the folds.

  python launch.py --config configs/wbc.py --folds 5 --workdir W      # the study first
  python launch.py --config configs/wbc_loco.py --sweep --folds 5 \
      --config.reference.restore=W --config.baselines.local_only=False --workdir L

Each point leaves one external center out of FL and of the pooled baselines (``fl.holdout``):
FedDyn federates PBC and the other two, and the pooled model trained from scratch is trained
without it, the two evaluated on the left-out center every round and in Table 2 (marked held
out), next to the reference model alone (Table 1). Fold i restores W's fold-i reference, so only
FL and the pooled fits train. ``sweep_folds.md`` holds the federated centers;
``loco_folds.md`` the left-out ones, each against the reference model alone and the pooled
model trained without it on the same images (:mod:`fedblood.reporting.loco_table`).
"""

from configs import wbc

EXTERNAL = ('bccd', 'jtsc_jiangxi_tecom', 'lisc_tehran')


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  """configs/wbc.py's config (``arg`` as there)."""
  return wbc.get_config(arg)


def get_sweep() -> list[dict]:
  """One point per external center left out."""
  return [{'fl.holdout': (center,)} for center in EXTERNAL]
