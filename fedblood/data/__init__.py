"""Multi-center white-blood-cell data: real centers (TFDS), synthetic centers, augmentation.

Usage::

  from fedblood import data
  cfg = data.default_config()                # synthetic centers, 64 px
  centers = data.load_centers(cfg)           # [Center(name, train, val, test)], reference first
  n_k = [len(c.train.labels) for c in centers]
  print(data.summarize(centers))             # images per class and split
  images = data.augment(rng, images / 255., cfg.augment)   # inside the jitted step

See :mod:`fedblood.data.loader` for the sources (synthetic, a folder of centers, the named public
sets PBC / Raabin-WBC / LISC / JTSC / BCCD) and :mod:`fedblood.data.builder` for the TFDS builder.
"""

from fedblood.data.augment import augment
from fedblood.data.checks import require_splits
from fedblood.data.config import crop_of
from fedblood.data.config import crops
from fedblood.data.config import default_config
from fedblood.data.images import check_crop
from fedblood.data.layouts import CLASSES
from fedblood.data.layouts import NAMED_SETS
from fedblood.data.loader import Center
from fedblood.data.loader import Split
from fedblood.data.loader import load_centers
from fedblood.data.loader import load_folder
from fedblood.data.loader import list_folder
from fedblood.data.loader import list_images
from fedblood.data.loader import load_images
from fedblood.data.loader import read_files
from fedblood.data.loader import summarize
from fedblood.data.splits import class_counts
