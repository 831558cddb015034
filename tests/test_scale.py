"""fedblood.study.scale: a new site's crop chosen on its own images (--crop auto)."""

import numpy as np
import pytest

from fedblood.study import scale


def test_information_is_zero_for_one_answer_and_log_k_for_k_sure_answers():
  one = np.tile([0.1, 0.6, 0.3], (8, 1))  # every image the same answer, however unsure
  assert scale.information(one) == pytest.approx(0.0, abs=1e-12)
  sure = np.eye(4)[np.arange(8) % 4]  # confident and spread evenly over 4 classes
  assert scale.information(sure) == pytest.approx(np.log(4))
  confident_one_class = np.tile([0.0, 1.0, 0.0, 0.0], (8, 1))
  unsure_spread = np.full((8, 4), 0.25)
  # Entropy alone would call the collapsed answer best; information scores both 0.
  assert scale.information(confident_one_class) == pytest.approx(0.0, abs=1e-12)
  assert scale.information(unsure_spread) == pytest.approx(0.0, abs=1e-12)
  assert scale.entropy(confident_one_class).max() == pytest.approx(0.0, abs=1e-9)  # entropy's best


def test_sample_spreads_over_every_image():
  assert scale.sample(5).tolist() == [0, 1, 2, 3, 4]
  picked = scale.sample(1000, 4)
  assert picked.tolist() == [0, 333, 666, 999]
  with pytest.raises(ValueError, match='no images'):
    scale.sample(0)


def test_choose_takes_the_best_and_a_tie_goes_to_the_larger_crop():
  assert scale.choose({1.0: 0.2, 0.7: 0.9, 0.5: 0.4}) == 0.7
  assert scale.choose({1.0: 0.5, 0.6: 0.5}) == 1.0
  # Scores within noise (a model that answers alike at every crop) keep the whole frame.
  assert scale.choose({1.0: 5.5e-7, 0.85: 6.2e-7, 0.6: 7.3e-7}) == 1.0
  assert scale.choose({1.0: 0.66, 0.6: 0.665}) == 1.0
  assert scale.choose({1.0: 0.66, 0.6: 0.88, 0.5: 0.884}) == 0.5
  assert scale.choose({1.0: 0.0, 0.6: 1e-7}, min_gain=0.0) == 0.6


def test_auto_crop_reads_each_candidate_and_keeps_the_informative_one():
  """A model that is sure and diverse only at the crop 0.6: that crop is chosen, on the sampled
  images, and every candidate's score is returned."""
  reads = []

  def read(picked, crop):
    reads.append((tuple(picked), crop))
    return np.full((len(picked), 2, 2, 3), crop, np.float32) + picked[:, None, None, None]

  def predict(images):
    crop = float(images[0, 0, 0, 0] - np.floor(images[0, 0, 0, 0]))
    labels = images[:, 0, 0, 0].astype(int) % 3
    if abs(crop - 0.6) < 1e-6:
      return np.eye(3)[labels]
    return np.tile([0.05, 0.9, 0.05], (len(images), 1))  # confident, one class: uninformative

  crop, scores = scale.auto_crop(predict, read, 10)
  assert crop == 0.6
  assert list(scores) == list(scale.CROPS)
  assert scores[0.6] == pytest.approx(scale.information(np.eye(3)[np.arange(10) % 3]))
  assert [c for _, c in reads] == list(scale.CROPS)
  assert all(p == tuple(range(10)) for p, _ in reads)
