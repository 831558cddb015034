r"""Recipe levers of configs/wbc.py, each compared on the same folds from the same references.

  python launch.py --config configs/wbc.py --folds 5 --workdir /work/runs/wbc5     # the study first
  python launch.py --config configs/wbc_levers.py --sweep --folds 3 \
      --config.reference.restore=/work/runs/wbc5 \
      --config.baselines.local_only=False --config.baselines.pooled=False \
      --workdir /work/runs/wbc_levers

``reference.restore`` naming the ``--folds`` study gives fold i its own fold's reference
(:func:`fedblood.study.seeds.fold_runs`), so only the federated stage trains. Each point is an
ordinary ``--folds`` study; ``sweep_folds.md`` compares the points on the same test images, and
a lever is kept in configs/wbc.py only where the mean validation accuracy says so.
"""

from configs import wbc


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  """configs/wbc.py's config (``arg`` as there)."""
  return wbc.get_config(arg)


def get_sweep() -> list[dict]:
  """The centers' weighting: by size (the authors', the default) against equal; FL from
  scratch, every block trained from the fresh parameters the pooled model from scratch starts
  from, against FL from the reference model with blocks 1-3 frozen (the default); the local
  lr decaying over rounds (0.98 a round: round 100 at 0.14 of round 1's) against constant;
  FedDyn's alpha 0.1 and 0.001 against 0.01 (the authors' search); stain jitter in optical
  density (data.augment.od_stain) and a blur of sigma up to 1 pixel (data.augment.blur: at
  64 px the centers' sharpness spans PBC unblurred to JTSC at about sigma 0.8), each in FL only
  when the reference is restored; and logit-adjusted local losses (fl.logit_adjust 1: each
  center's class mix added to its logits in training); and 2 or 3 local epochs per round
  against 1 (more local work for the small centers, whose one epoch is 6-8 steps), and the
  local lr 0.05 against 0.03 (chosen after 15 rounds, before the current recipe). The local
  epochs points count local work in passes, so they set fl.local_steps=0 (the recipe's fixed
  steps off). docs/results.md gives each point's table over folds 0-2."""
  return [{'fl.weighting': 'size'}, {'fl.weighting': 'equal'},
          {'fl.init': 'scratch', 'model.frozen_blocks': 0}, {'fl.lr_decay': 0.98},
          {'fl.alpha': 0.1}, {'fl.alpha': 0.001}, {'data.augment.od_stain': 0.2},
          {'data.augment.blur': 1.0}, {'fl.logit_adjust': 1.0},
          {'fl.local_epochs': 2, 'fl.local_steps': 0}, {'fl.local_epochs': 3, 'fl.local_steps': 0},
          {'fl.lr': 0.05}]
