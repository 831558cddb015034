r"""The study as published: VGG16, 224 px, ImageNet weights, PBC reference + four centers, FedDyn.

  python launch.py --config configs/paper.py --config.model.pretrained=/weights/vgg16.pth \
      --config.data.root=/data/manual --workdir /runs/paper
  python launch.py --config configs/paper.py --sweep --config.model.pretrained=/weights/vgg16.pth \
      --workdir /runs/paper-sweep                                   # every point of get_sweep()

The centers come through the TFDS builders of the named public sets (each downloaded by hand into
data.root; a missing one is an error saying what to download and where). Blocks 1-3 are frozen
during federated fine-tuning, as in Natali et al. (2024). Sized for an accelerator.
"""

from configs import common


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  """The study's configuration (``arg`` unused)."""
  del arg
  config = common.get_config()
  config.title = 'fedblood: the study (VGG16, 224 px, FedDyn)'
  config.data.source = 'manual'        # the named public sets, read by their TFDS builders
  # Where they were downloaded ('' = <TFDS dir>/downloads/manual).
  config.data.root = ''
  # Reference + four external centers.
  config.data.centers = ('pbc', 'raabin', 'lisc', 'jtsc', 'bccd')
  config.data.reference = 'pbc'        # PBC (Acevedo et al. 2020), Hospital Clinic Barcelona
  config.data.image_size = 224         # VGG16's native input size, as in the study
  config.model.width = 1.0             # the full VGG16
  config.model.head = 'fc'             # the classic 4096-4096 head, as in the study
  config.model.pretrained = ''         # ImageNet weights: pass --config.model.pretrained=vgg16.pth
  config.model.frozen_blocks = 3       # the study froze blocks 1-3
  config.reference.epochs = 30         # fine-tuning from ImageNet converges in a few epochs
  config.reference.lr = 1e-4           # a pretrained network wants a small Adam step
  config.reference.warmup_epochs = 1
  config.reference.patience = 5
  config.fl.algorithm = 'fed_dyn'      # the study's aggregation
  config.fl.rounds = 100               # communication rounds
  config.fl.local_epochs = 1           # one pass per round
  config.fl.lr = 0.01                  # local SGD on a pretrained VGG16
  config.fl.alpha = 0.01               # FedDyn's CIFAR default; swept in get_sweep()
  config.baselines.local_only = False  # costly at this scale: enable when needed
  config.baselines.pooled = False
  # An FL step holds (2 + 5) copies of the trainable params (server model, its client average,
  # 5 lambda_k): ~3.7 GB with the fc head and blocks 1-3 frozen. Keep the last one (+ the best).
  config.checkpoint.keep = 1
  config.lock()
  return config


def get_sweep() -> list[dict]:
  """Ablations around the study's setting, one factor at a time, three seeds each (30 runs)."""
  factors = [{}]                                                   # the study itself
  factors += [{'fl.alpha': a} for a in (0.1, 0.001)]               # FedDyn's regulariser
  factors += [{'model.frozen_blocks': n} for n in (0, 4)]          # how much of VGG16 is shared
  factors += [{'fl.local_epochs': e} for e in (2, 5)]              # local work per round (drift)
  factors += [{'fl.algorithm': a} for a in ('fed_avg', 'fed_prox', 'scaffold')]  # baselines
  return [dict(f, seed=s) for f in factors for s in (0, 1, 2)]
