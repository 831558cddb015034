r"""The study on real images: a folder tree of centers, CPU scale.

  python launch.py --config configs/wbc.py --workdir /tmp/wbc
  python launch.py --config configs/wbc.py --config.data.root=/data/my_centers \
      --config.data.reference=my_hospital --workdir /tmp/mine
  python launch.py --config configs/wbc.py:smoke --workdir /tmp/wbc-smoke      # minutes, for CI

Default root: ../shared/data/wbc next to the repository (override with --config.data.root or the
FEDBLOOD_WBC_ROOT environment variable), laid out <center>/<class>/<images>, with pbc_barcelona
(CellaVision, Barcelona) as the reference and lisc_tehran, jtsc_jiangxi_tecom and bccd as the
external centers.
"""

import os
from pathlib import Path

from configs import common

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'wbc'


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  """``arg``: '' (the CPU-scale study) or 'smoke' (a few epochs and rounds at 32 px)."""
  if arg not in ('', 'smoke'):
    raise ValueError(f"configs/wbc.py takes '' or 'smoke', got {arg!r}")
  config = common.get_config()
  config.title = 'fedblood: real centers (folder tree)'
  config.data.source = 'folder'        # <root>/<center>/<class>/<images>
  config.data.root = os.environ.get('FEDBLOOD_WBC_ROOT', str(DEFAULT_ROOT))  # read-only images
  config.data.reference = 'pbc_barcelona'  # the study's reference center (CellaVision, Barcelona)
  config.data.image_size = 64          # CPU scale: cells stay recognisable, ~4x cheaper than 128 px
  # Whole image: crops of very different sizes keep the whole cell.
  config.data.resize = 'resize'
  # Per-class shares; tiny classes (1-3 basophils) stay in train.
  config.data.val_fraction = 0.15
  config.data.test_fraction = 0.2      # a larger test share: the external centers are small
  config.model.width = 0.25            # 16..128 channels: VGG16's depth at a CPU-affordable width
  config.reference.epochs = 40         # from scratch needs more epochs than the demo
  config.reference.lr = 3e-4           # a pilot collapsed to one class at 1e-3 without warmup
  config.reference.patience = 8
  config.fl.rounds = 30                # real centers differ more than synthetic ones
  if arg == 'smoke':
    config.title = 'fedblood: real centers, smoke run'
    config.progress = False
    config.data.image_size = 32
    config.model.width = 0.125
    config.reference.epochs = 2
    config.reference.patience = 0
    config.fl.rounds = 2
    config.baselines.epochs = 1
    config.baselines.patience = 0
    config.checkpoint.keep = 1
  config.lock()
  return config
