"""Synthetic centers: deterministic, class-shaped, and shifted between centers."""

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedblood.data import synthetic
from fedblood.data.layouts import CLASSES


def test_deterministic_shapes_and_all_classes():
  images, labels = synthetic.make_center(1, 60, seed=0, size=32)
  assert images.shape == (60, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (60,) and labels.dtype == np.int32
  assert (np.bincount(labels, minlength=5) >= 2).all()
  again, labels_again = synthetic.make_center(1, 60, seed=0, size=32)
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(labels, labels_again)
  other, _ = synthetic.make_center(1, 60, seed=1, size=32)
  assert not np.array_equal(images, other)


def test_styles_differ_between_centers_and_not_with_num_centers():
  a, b = synthetic.center_style(0, 0), synthetic.center_style(1, 0)
  assert not np.allclose(a.mixing, b.mixing) and a.scale != b.scale
  np.testing.assert_array_equal(synthetic.center_style(0, 0).mixing, a.mixing)


def test_chunked_rendering_is_deterministic():
  style = synthetic.center_style(0, 0)
  labels = np.arange(10) % 5
  a = synthetic.generate(labels, style, [0, 1], size=32, chunk=4)
  assert a.shape == (10, 32, 32, 3)
  np.testing.assert_array_equal(a, synthetic.generate(labels, style, [0, 1], size=32, chunk=4))


def test_morphology_nucleus_size_and_granules():
  """Lymphocytes: the most nucleus per cell; basophils: the darkest; eosinophils: the reddest."""
  style = synthetic.Style(mixing=np.eye(3, dtype=np.float32),
                          background=np.ones(3, np.float32), gradient=np.zeros(2, np.float32),
                          vignette=0.0, scale=1.0, blur=0.3, noise=0.0, rbc_rate=0.0,
                          class_probs=np.full(5, 0.2, np.float32))
  labels = np.repeat(np.arange(5), 20)
  x = synthetic.generate(labels, style, 0, size=64).astype(np.float32) / 255
  background = x[:, :2, :2].mean((1, 2, 3))[:, None, None]
  cell = x.min(-1) < background - 0.03          # anything on the empty slide
  dark = x.mean(-1) < 0.4 * background          # nucleus or basophil granules
  per_class = lambda v: np.array([v[labels == c].mean() for c in range(5)])
  dark_share = per_class(dark.sum((1, 2)) / cell.sum((1, 2)))
  assert CLASSES[int(np.argmax(dark_share))] == 'basophil'
  dark_share[0] = 0
  assert CLASSES[int(np.argmax(dark_share))] == 'lymphocyte'
  redness = per_class(((x[..., 0] - x[..., 2]) * cell).sum((1, 2)) / cell.sum((1, 2)))
  assert CLASSES[int(np.argmax(redness))] == 'eosinophil'
  size = per_class(cell.sum((1, 2)))
  assert CLASSES[int(np.argmax(size))] == 'monocyte'
  assert CLASSES[int(np.argmin(size))] == 'lymphocyte'


def _colour_histograms(images):
  """Joint RGB histogram, 4 levels per channel: 64 features of colour, none of position."""
  q = images.astype(np.int64) // 64
  idx = (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).reshape(len(images), -1)
  idx += 64 * np.arange(len(images))[:, None]
  counts = np.bincount(idx.ravel(), minlength=64 * len(images)).reshape(len(images), 64)
  return counts / idx.shape[1]


def _fit(x, y):
  return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)


def test_domain_shift_between_centers_and_recovery_when_pooled():
  centers = [synthetic.make_center(k, n, seed=0, size=32)
             for k, n in enumerate((400, 300, 300, 200))]
  feats = [(_colour_histograms(x), y) for x, y in centers]
  cut = [int(0.7 * len(y)) for _, y in feats]
  train = [(x[:c], y[:c]) for (x, y), c in zip(feats, cut)]
  test = [(x[c:], y[c:]) for (x, y), c in zip(feats, cut)]

  only_0 = _fit(*train[0])
  own = only_0.score(*test[0])
  others = [only_0.score(*t) for t in test[1:]]
  pooled = _fit(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]))
  pooled_others = [pooled.score(*t) for t in test[1:]]
  print(f'center 0 model: own {own:.2f}, others {np.round(others, 2)}; '
        f'pooled model on others {np.round(pooled_others, 2)}')
  assert own > 0.85
  assert max(others) < own - 0.25                  # every other center loses clearly
  assert min(pooled_others) > max(others) + 0.25   # training on all centers recovers
  assert min(pooled_others) > 0.8
