r"""The demo study on built-in synthetic centers: a few minutes on 2 CPU cores.

  python launch.py --workdir /tmp/fedblood-demo                       # this config is the default
  python launch.py --config configs/demo.py:smoke --workdir /tmp/smoke  # < 1 minute, what tests run
  python launch.py --config configs/demo.py --config.fl.algorithm=fed_avg --workdir /tmp/demo-fedavg

Four synthetic hospitals (800 / 500 / 400 / 300 images, own stain, light, scale and blur), 32 px,
VGG16 at width 1/8 with a global-average-pool head. The reference model is trained at synth0 and
loses accuracy at the others (Table 1); FedDyn with blocks 1-3 frozen recovers it (Table 2).
"""

from configs import common


def get_config(arg: str = '') -> 'ml_collections.ConfigDict':
  """``arg``: '' (the demo) or 'smoke' (tiny, for tests)."""
  if arg not in ('', 'smoke'):
    raise ValueError(f"configs/demo.py takes '' or 'smoke', got {arg!r}")
  config = common.get_config()
  config.title = 'fedblood demo: synthetic centers'
  config.data.source = 'synthetic'     # no download: images generated from data.synthetic.seed
  config.data.image_size = 32          # the smallest size VGG's five poolings allow; CPU-fast
  # 8..64 channels, ~0.23M params: CPU-fast (docs/performance.md).
  config.model.width = 0.125
  config.reference.epochs = 30         # early stopping ends it sooner
  # External centers still gain at round 15 (measured), little after 20.
  config.fl.rounds = 20
  config.fl.local_epochs = 1           # one pass per round keeps client drift small
  if arg == 'smoke':
    config.title = 'fedblood smoke run'
    config.progress = False                             # quiet test logs
    config.data.synthetic.num_centers = 3               # reference + two external centers
    config.data.synthetic.images_per_center = (120, 80, 60)
    config.reference.epochs = 2
    config.reference.patience = 0
    config.reference.frozen_blocks = 3                  # = model.frozen_blocks: one compiled step
    config.baselines.weight_decay = config.reference.weight_decay  # for reference and baselines
    config.fl.rounds = 3                                # enough to test resume mid-run
    config.baselines.epochs = 1
    config.baselines.patience = 0
    config.checkpoint.keep = 1
  config.lock()                        # a mistyped override fails instead of being ignored
  return config
