"""Every field of a fedblood run, with its default and why; the other configs override it.

Not a run on its own (demo.py, wbc.py and paper.py are); shown here so each field is
documented once::

  python launch.py --config configs/demo.py --workdir /tmp/demo   # the defaults below, demo-sized
"""

import ml_collections

from fedblood import data


def recipe(epochs, batch_size, lr, warmup_epochs, patience, weight_decay=1e-4, max_grad_norm=1.0):
  """A centralized training recipe (the reference model and the baselines share its fields)."""
  c = ml_collections.ConfigDict()
  c.epochs = epochs                    # upper bound; early stopping usually ends sooner
  c.batch_size = batch_size            # images per Adam step
  c.lr = lr                            # peak Adam learning rate (after warmup)
  # Linear warmup: VGG without normalisation layers diverges without it.
  c.warmup_epochs = warmup_epochs
  c.final_lr_fraction = 0.01           # cosine decay ends at lr * this
  c.weight_decay = weight_decay        # decoupled (AdamW) weight decay
  c.max_grad_norm = max_grad_norm      # global-norm clipping: a second guard against early blow-ups
  # Epochs without a better validation score before stopping (0 = never).
  c.patience = patience
  # Epochs count towards patience only once the cosine schedule has brought the lr down to this
  # fraction of its peak (after warmup); the best epoch is still chosen on validation over every
  # epoch. 1.0: every epoch counts (a fit can stop at peak lr on a noisy plateau).
  c.stop_below_lr = 1.0
  # Validation metric that picks the best epoch (higher is better).
  c.monitor = 'accuracy'
  return c


def get_config() -> ml_collections.ConfigDict:
  """The full default config (synthetic centers, narrow VGG16, FedDyn with blocks 1-3 frozen)."""
  config = ml_collections.ConfigDict()
  config.title = 'fedblood run'        # heading of report.md
  # Every random stream (init, batches, augmentation, participation).
  config.seed = 0
  config.progress = True               # tqdm bars per stage (round, loss, mean accuracy)

  # Centers: source, splits, image size, augmentation (fields documented in fedblood.data).
  config.data = data.default_config()

  config.model = ml_collections.ConfigDict()
  config.model.name = 'VGG16'          # class in fedblood.model.models (the study's network)
  config.model.num_classes = 5         # basophil, eosinophil, lymphocyte, monocyte, neutrophil
  # 'gap' (global pool + dense, small) or 'fc' (classic 4096-4096).
  config.model.head = 'gap'
  config.model.width = 0.125           # channel multiplier: 1.0 is VGG16; narrow nets fit a CPU
  config.model.dropout = 0.5           # dropout of the fc head (unused by 'gap')
  # Input normalisation: 'imagenet' (torchvision weights), 'caffe' (Keras weights) or
  # 'per_image' (each image's channels standardised: strips stain casts; from-scratch runs).
  config.model.input_norm = 'imagenet'
  # Conv kernel init: 'lecun' (Flax default) or 'he' (keeps the signal alive through 13 ReLU
  # convolutions without normalisation layers; what from-scratch runs need).
  config.model.conv_init = 'lecun'
  # Test-time averaging: every evaluation (never training) averages the softmax over the 8 flips
  # and quarter turns of each image (8x the evaluation's compute).
  config.model.tta = False
  config.model.dtype = 'float32'       # compute dtype; 'bfloat16' on accelerators
  config.model.frozen_blocks = 3       # blocks 1..n frozen during FL and baselines (the study: 3)
  # ImageNet weights file (.pth/.npz/.h5) to start from; '' = random.
  config.model.pretrained = ''

  # Stage (a): the reference model, trained at data.reference (the first center).
  config.reference = recipe(epochs=30, batch_size=32, lr=1e-3, warmup_epochs=2, patience=6)
  config.reference.frozen_blocks = 0   # blocks frozen while training the reference (0: train all)
  # Workdir / checkpoint dir / weights file of a ready reference model.
  config.reference.restore = ''

  # Stage (c): federated fine-tuning (read by fedblood.algorithms.build and fedblood.core.simulate).
  config.fl = ml_collections.ConfigDict()
  config.fl.algorithm = 'fed_dyn'      # 'fed_dyn', 'fed_avg', 'fed_prox' or 'scaffold'
  config.fl.rounds = 10                # communication rounds
  config.fl.local_epochs = 1           # passes over its training split each center makes per round
  # > 0: every center runs exactly that many local steps a round, whatever its size (small
  # centers make several passes, a large one part of one); 0: fl.local_epochs passes each.
  config.fl.local_steps = 0
  config.fl.batch_size = 32            # local SGD batch
  config.fl.lr = 0.05                  # local SGD learning rate (no momentum, as FedDyn's code)
  config.fl.lr_decay = 1.0             # round r's local lr: fl.lr * fl.lr_decay ** (r - 1)
  # Heavy-ball momentum of the local SGD, its buffer reset every round (0: plain SGD, as FedDyn's
  # code). Steps settle at fl.lr / (1 - m): lower fl.lr with it. SCAFFOLD refuses it.
  config.fl.local_momentum = 0.0
  config.fl.alpha = 0.01               # FedDyn regulariser (the paper searched 0.1, 0.01, 0.001)
  config.fl.mu = 0.01                  # FedProx proximal weight (fed_prox only)
  config.fl.weight_decay = 1e-3        # ordinary weight decay on top of FedDyn's alpha_k
  config.fl.max_grad_norm = 10.0       # clipping of the local gradient (FedDyn's code: 10)
  config.fl.server_lr = 1.0            # FedAvg/FedProx/SCAFFOLD server step (1.0 = plain averaging)
  config.fl.server_momentum = 0.0      # server momentum (FedAvgM when > 0)
  # Centers' weights: 'size' (n_k / sum(n), the authors': FedDyn's alpha_k = alpha / w_k, the
  # FedAvg-type server's weighted mean) or 'equal' (every center 1: the mean of the centers' risks).
  config.fl.weighting = 'size'
  # Where FL starts: 'reference' (the reference model, as the paper) or 'scratch' (the fresh
  # parameters of config.seed the reference itself started from, as the pooled model from scratch;
  # needs model.frozen_blocks=0: no block stays at random weights).
  config.fl.init = 'reference'
  # Logit-adjusted local loss (Menon et al. 2021; FedLC, Zhang et al. 2022): tau * each center's
  # class log-frequencies added to the logits in training, so no center's class mix is learned
  # as a shortcut; 0 is plain cross-entropy.
  config.fl.logit_adjust = 0.0
  config.fl.participation = 1.0        # fraction of centers active each round (drawn from the seed)
  config.fl.execution = 'auto'         # per backend; or loop, vmap, unroll, shard
  # FedDyn: 'active_mean' (what the paper reports) or 'server' (corrected).
  config.fl.eval_model = 'active_mean'
  # Average the server's models over the rounds from this one on (0: off; fedblood.algorithms.swa):
  # evaluated as 'swa_active_mean' / 'swa_server' (fl.eval_model), training unchanged.
  config.fl.swa_start = 0
  # Which round Table 2 reports: 'val', the checkpointed round with the best mean validation
  # accuracy over the training centers (as every baseline picks its epoch), or 'last'. The last
  # round is reported beside it either way. Only the final evaluation reads it.
  config.fl.select = 'val'
  # Differential privacy (fedblood.algorithms.dp, accounted by fedblood.privacy; needs the `dp`
  # extra). 'off' runs exactly the path without it; 'example': DP-SGD in every center's local
  # step (Poisson-sampled batches of expected size fl.batch_size, per-example clipping, Gaussian
  # noise), epsilon per center; 'client': DP-FedAvg (fed_avg / fed_prox, full participation).
  config.fl.dp = ml_collections.ConfigDict()
  config.fl.dp.mode = 'off'
  config.fl.dp.clip = 1.0              # L2 bound per example gradient (example) / center update
  config.fl.dp.noise_multiplier = 1.0  # noise std / clip
  config.fl.dp.target_epsilon = 0.0    # > 0: calibrate noise_multiplier to this epsilon per center
  config.fl.dp.delta = 1e-5            # reported (epsilon, delta); must be < 1/n_k (< 1/C: client)
  config.fl.dp.accountant = 'rdp'      # dp-accounting's 'rdp' or 'pld'
  # Per-example gradients per chunk (memory; 0: fl.batch_size). 8: as fast as 32 at a quarter of
  # the memory for configs/wbc.py's model (bench/bench_dp.py, docs/privacy.md).
  config.fl.dp.microbatch = 8
  config.fl.dp.seed = 0                # noise stream of the client-level mode
  # Per-center epsilon budgets, e.g. dict(bccd=3.0): a center whose epsilon would pass its budget
  # sits out every round from then on (fedblood/study/budgets.py; a deployed site sets its own
  # dp-epsilon-budget). Empty: no budget.
  config.fl.dp.budget = ml_collections.ConfigDict()
  # Centers that never join (leave-one-center-out): no FL training, not in the pooled baseline;
  # evaluated every round and in Table 2 as new centers, marked held out. E.g. ('bccd',).
  config.fl.holdout = ()

  # The references a reader needs to judge FL, trained with the same frozen blocks.
  config.baselines = recipe(epochs=15, batch_size=32, lr=3e-4, warmup_epochs=1, patience=4)
  config.baselines.local_only = True   # each center fine-tunes alone on its own training split
  # One model on all centers' training data (the FL upper bound).
  config.baselines.pooled = True
  # Start from the 'reference' model (like FL), from 'scratch', or 'both' (each baseline twice).
  config.baselines.init = 'reference'
  # Pooled: 'centers' draws every center equally often per epoch; 'none' one pass over all images.
  config.baselines.balance = 'none'
  # Pooled validation monitor: 'center_mean' (unweighted mean over centers) or 'pooled' (all
  # validation images together: the largest center dominates).
  config.baselines.pooled_val = 'pooled'
  # Personalisation: each site fine-tunes the federated model and the pooled model on its own
  # data after training (report columns 'FL + site fine-tuning', 'Pooled + site fine-tuning').
  config.baselines.personalize = False

  config.checkpoint = ml_collections.ConfigDict()
  # Save every n rounds (and the last); a resume redoes the rest.
  config.checkpoint.every = 1
  config.checkpoint.keep = 2           # last rounds kept (plus the best by validation accuracy)

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 128         # images per evaluation step

  # A second numerics path (changes float rounding, not the maths; fedblood.backend.numerics).
  config.numerics = ml_collections.ConfigDict()
  # jax_default_matmul_precision for the run ('' = JAX's default), e.g. 'highest', 'bfloat16'.
  config.numerics.matmul_precision = ''
  # False: run without fedblood's XLA flags (start the process with FEDBLOOD_XLA_FLAGS=0).
  config.numerics.xla_flags = True
  return config
