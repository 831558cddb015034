r"""The privacy-utility study: record-level DP-SGD at epsilon 8, 3 and 1 on configs/wbc.py's data.

Three commands (docs/privacy.md, "Privacy-utility on the four real centers"), each resumable:

  # 1. The study it builds on (reference, FedDyn without DP, every center alone), 5 folds:
  python launch.py --config configs/wbc.py --folds 5 --workdir W
  # 2. Every DP candidate on fold 0, only FL training, from fold 0's own reference:
  python launch.py --config configs/wbc_privacy.py --sweep --folds 5 --only_folds 0 \
      --config.reference.restore=W --workdir P
  # 3. The table: each (algorithm, epsilon) takes its candidate with the best validation
  #    accuracy; the command prints how to run the chosen ones on more folds, then rerun it.
  python -m fedblood.study.privacy_study --sweep P --base W --folds 0-2

One unit of privacy: one image (a patient contributes several cells). The noise is calibrated
(``fl.dp.target_epsilon``) so that every center ends at or below epsilon (delta 1e-5) over all
``fl.rounds`` rounds, whichever round validation then picks (``fl.select``). The reference model
is trained at PBC without DP (PBC's pre-training is not private).

The candidates of each (algorithm, epsilon), chosen on validation: which blocks train (frozen 3
as configs/wbc.py: 203,461 parameters; frozen 5: only the 325 of the head, so the same noise
multiplier adds ~25x less noise norm), the expected batch (32 or 64: the noise on the mean
gradient falls as 1/batch while the sampling rate, and with it sigma, rises), and the learning
rate, the rounds (30 or 10; the round itself is then chosen on validation) and the local steps
(1 or 2 passes over the center's data per round: at a fixed epsilon, more steps per round buy
fewer noisier rounds). The clip is 1.0
throughout: once every per-example gradient is clipped, the update is
``lr x clip x (mean direction + noise)``, so a clip sweep is an lr sweep (docs/privacy.md).
"""

from configs import wbc

EPSILONS = (8.0, 3.0, 1.0)
ALGORITHMS = ('fed_dyn', 'fed_avg')
# (model.frozen_blocks, fl.batch_size, fl.lr, fl.rounds, fl.local_epochs): configs/wbc.py's FL
# recipe (at 30 rounds, one pass a round: fl.local_steps=0 below) first.
# 10 rounds: the 30-round candidates' validation picked rounds 2-24 at epsilon 8 (fold 0), and
# fewer rounds at the same epsilon need less noise (sigma 1.26 against 1.85). 2 local epochs:
# the same number of noisy steps as 20 rounds in 10 rounds' communication.
CANDIDATES = ((3, 32, 0.03, 30, 1), (3, 64, 0.1, 30, 1), (5, 32, 0.1, 30, 1), (5, 64, 0.3, 30, 1),
              (3, 64, 0.1, 10, 1), (5, 64, 0.3, 10, 1), (3, 64, 0.1, 10, 2), (5, 64, 0.3, 10, 2))
ROUNDS = 30
LOCAL_EPOCHS = 1


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  """configs/wbc.py's config with DP-SGD at epsilon 8, 30 rounds, FL only (``arg`` as there)."""
  config = wbc.get_config(arg)
  config.unlock()
  config.title = 'fedblood: privacy-utility on the real centers'
  config.fl.dp.mode = 'example'
  config.fl.dp.clip = 1.0
  config.fl.dp.target_epsilon = EPSILONS[0]
  # Fewer rounds than configs/wbc.py's 100: at a fixed epsilon every round adds noise (sigma
  # 1.85 at epsilon 8 over 30 rounds, 1.26 over 10); the round is then chosen on validation.
  config.fl.rounds = ROUNDS if arg != 'smoke' else config.fl.rounds
  # Local work in passes (the candidates' fl.local_epochs), as the study ran before configs/wbc.py
  # fixed every center's steps (fl.local_steps): a small center's steps, hence its epsilon, are
  # ceil(n / B) a pass.
  config.fl.local_steps = 0
  config.baselines.local_only = False  # every center alone, the reference: from study W
  config.baselines.pooled = False
  config.lock()
  return config


def get_sweep() -> list[dict]:
  """Every (epsilon, algorithm, candidate), epsilon 8 first; then FedAvg without DP on
  configs/wbc.py's recipe (FedDyn's is the base study's own FL)."""
  private = [{'fl.dp.target_epsilon': eps, 'fl.algorithm': algorithm,
              'model.frozen_blocks': frozen, 'fl.batch_size': batch, 'fl.lr': lr,
              **({'fl.rounds': rounds} if rounds != ROUNDS else {}),
              **({'fl.local_epochs': epochs} if epochs != LOCAL_EPOCHS else {})}
             for eps in EPSILONS for algorithm in ALGORITHMS
             for frozen, batch, lr, rounds, epochs in CANDIDATES]
  frozen, batch, lr, _, _ = CANDIDATES[0]
  plain = {'fl.dp.mode': 'off', 'fl.algorithm': 'fed_avg', 'fl.rounds': 100,
           'model.frozen_blocks': frozen, 'fl.batch_size': batch, 'fl.lr': lr}
  return private + [plain]
