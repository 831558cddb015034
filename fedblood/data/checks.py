"""Checks of loaded centers: splits a study needs, and the same image in two places.

Small centers are refused, not worked around: a center of one or two images has an empty test
(or training) split, so it has no Table 1 / Table 2 row and nothing to train on, and averaging
it in as "no data" would make the external-center means silently mean something else. The
message names the center and its counts, before any training.

Duplicates: every image is hashed at the model's resolution (its uint8 pixels after decoding
and resizing, so the same file stored twice, or re-encoded losslessly, is found). An image in
two centers, or in two splits (train in one center and test in another is a leak in the pooled
baseline; train and test of one center, in its local-only baseline), is a warning naming every
copy: deduplicating is the user's decision, not the loader's.
"""

import hashlib

from absl import logging
import numpy as np

SPLITS = ('train', 'val', 'test')
_SHOWN = 10


def require_splits(centers) -> None:
  """Raises ValueError naming every center whose training or test split is empty."""
  bad = []
  for c in centers:
    counts = {s: len(getattr(c, s).labels) for s in SPLITS}
    if not counts['train'] or not counts['test']:
      bad.append(f'{c.name!r} ({sum(counts.values())} images: train {counts["train"]}, '
                 f'val {counts["val"]}, test {counts["test"]})')
  if bad:
    raise ValueError(
        f'center(s) {", ".join(bad)} too small to split: every center needs at least one '
        'training and one test image (3+ images per class keep a test share with the default '
        'fractions). Add images, or leave the center out of data.centers.')


def duplicates(centers) -> list[list[str]]:
  """Groups of ``'center/split/file'`` holding identical images across centers or splits."""
  seen: dict[bytes, list[tuple[str, str, str]]] = {}
  for c in centers:
    for s in SPLITS:
      split = getattr(c, s)
      for image, name in zip(split.images, split.files):
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
        seen.setdefault(digest, []).append((c.name, s, str(name)))
  groups = []
  for places in seen.values():
    if len({(center, split) for center, split, _ in places}) > 1:
      groups.append([f'{center}/{split}/{name}' for center, split, name in places])
  return groups


def warn_duplicates(centers) -> list[list[str]]:
  """Logs a warning naming the copies of every duplicated image; returns the groups."""
  groups = duplicates(centers)
  if groups:
    shown = '; '.join(' = '.join(g) for g in groups[:_SHOWN])
    more = f'; ... and {len(groups) - _SHOWN} more' if len(groups) > _SHOWN else ''
    logging.warning('%d image(s) appear in more than one center or split (identical pixels at '
                    'this image size): %s%s', len(groups), shown, more)
  return groups
