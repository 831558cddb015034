"""A new site's scale chosen from its own unlabelled images: ``--crop auto``.

A white cell fills about a third of a PBC or LISC frame and most of a JTSC or BCCD one, and a
model trained at one scale is lost at another: Table 2's model of the study's fold 0 scores 87.6 %
on LISC's images cropped to their central half (LISC's ``data.crop``) and 19.8 % on the whole
frames. ``data.crop`` sets each federated site's crop; a center the run never saw has none.

``auto`` tries each central crop of :data:`CROPS` on up to :data:`AUTO_IMAGES` of the site's
images and keeps the one whose predictions carry the most information about the images: the
mutual information between an image and its predicted class,
``I = H(mean_i p_i) - mean_i H(p_i)`` (the information maximisation of Liang et al. 2020, SHOT).
Confident predictions (low mean entropy) score high only while they stay diverse (high entropy of
their mean): at a wrong scale a model often calls most cells one class, confidently, which the
entropy alone would reward. No label is read. Measured in docs/results.md ("A center that never
joined: its scale").

Usage::

  crop, scores = scale.auto_crop(predict, read, len(files))
"""

from typing import Callable

import numpy as np

AUTO = 'auto'
# Central crops tried, the whole frame first (it wins a tie).
CROPS = (1.0, 0.85, 0.7, 0.6, 0.5, 0.4)
# Images the choice looks at, evenly spaced over the site's sorted files (every class folder).
AUTO_IMAGES = 256
# A crop replaces the whole frame only when its information is this much higher (nats): a model
# that says nearly the same at every crop (scores within noise, e.g. 1e-7 for one that calls
# every cell one class) keeps the images whole. Measured gains where the scale matters: 0.22
# (LISC, a center the federation never saw: 0.66 whole, 0.88 at 0.5).
MIN_GAIN = 0.01


def entropy(probs: np.ndarray) -> np.ndarray:
  """Shannon entropy (nats) over the last axis."""
  p = np.asarray(probs, np.float64)
  return -(p * np.log(np.maximum(p, 1e-12))).sum(-1)


def information(probs: np.ndarray) -> float:
  """``H(mean p) - mean H(p)`` of [N, C] class probabilities: 0 for one answer or none."""
  probs = np.asarray(probs, np.float64)
  return float(entropy(probs.mean(0)) - entropy(probs).mean())


def sample(n: int, k: int = AUTO_IMAGES) -> np.ndarray:
  """Up to ``k`` indices evenly spaced over ``range(n)`` (all of them when n <= k)."""
  if n < 1:
    raise ValueError('no images to choose a crop on')
  return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


def choose(scores: dict, min_gain: float = MIN_GAIN) -> float:
  """The crop of the highest score; a tie goes to the crop listed first (the larger one), and
  the first (the whole frame) stays unless another beats it by ``min_gain`` nats."""
  first = best = next(iter(scores))
  for crop, score in scores.items():
    if score > scores[best]:
      best = crop
  return best if scores[best] >= scores[first] + min_gain else first


def auto_crop(predict: Callable[[np.ndarray], np.ndarray],
              read: Callable[[np.ndarray, float], np.ndarray], n: int,
              crops=CROPS) -> tuple[float, dict]:
  """The crop a site's images are read at, chosen on those images alone.

  Args:
    predict: uint8 images [K, S, S, 3] -> class probabilities [K, C] (the model as trained).
    read: (image indices, crop) -> those images read at that central crop.
    n: how many images the site has.
    crops: the candidates, in order of preference on a tie.

  Returns:
    (the chosen crop, ``{crop: information}`` for every candidate).
  """
  picked = sample(n)
  scores = {float(c): information(predict(read(picked, float(c)))) for c in crops}
  return choose(scores), scores
