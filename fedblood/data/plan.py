"""The data plan of a config: its centers and their splits' labels, from the listing alone.

``plan(config.data)`` lists every center as :func:`fedblood.data.load_centers` would (the same
specs, the same stratified split of the same file names) but decodes no image and builds no
dataset: a synthetic center's labels are drawn without its images, a folder's come from its
class folders. What validation (:mod:`fedblood.study.validate`) checks against the data uses it:
centers too small to split, ``fl.holdout`` names, the DP sampling rates, the class count.
"""

import numpy as np

from fedblood.data import config as data_config
from fedblood.data import layouts
from fedblood.data import loader
from fedblood.data import splits as splits_lib
from fedblood.data import synthetic


def _listing(fields: dict) -> tuple[list, np.ndarray]:
  """``(file names, labels)`` of one center spec (:func:`fedblood.data.loader.center_specs`)."""
  if fields['layout'] == 'synthetic':
    labels = synthetic.center_labels(fields['synth_index'], fields['synth_images'],
                                     fields['synth_seed'])
    return synthetic.file_names(labels), labels
  listing = layouts.list_center(fields['layout'], fields['path'])
  return list(listing.files), np.asarray(listing.labels)


def plan(data_cfg) -> list[loader.Center]:
  """Every center of ``data_cfg``, the reference first, with label-only splits.

  Returns:
    ``[Center(name, train, val, test)]`` whose splits hold ``labels`` (int32 [N]) and ``files``;
    ``images`` is None.

  Raises:
    ValueError / FileNotFoundError: as :func:`fedblood.data.load_centers`, naming the key or
      folder at fault.
  """
  loader.check_config(data_cfg)
  folds, fold = data_config.folds_of(data_cfg)
  centers = []
  for name, fields in loader.center_specs(data_cfg):
    files, labels = _listing(fields)
    which = splits_lib.assign(files, labels, data_cfg.val_fraction, data_cfg.test_fraction,
                              data_cfg.split_seed, center=name, folds=folds, fold=fold,
                              warn=False)
    files = np.asarray(files, dtype=str)
    splits = [loader.Split(None, labels[which == s].astype(np.int32), files[which == s])
              for s in (splits_lib.TRAIN, splits_lib.VAL, splits_lib.TEST)]
    centers.append(loader.Center(name, *splits))
  return centers
