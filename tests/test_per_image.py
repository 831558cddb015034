"""Pooled per-image intervals and paired comparisons of a k-fold sweep (hand-made predictions)."""

import numpy as np

from fedblood import stats
from fedblood.model import metrics
from fedblood.reporting import per_image


def _results(labels: dict, predictions: dict) -> dict:
  """A results dict whose ``details`` holds classify() of each table's predictions."""
  return {'details': {table: {c: metrics.classify(labels[c], preds[c]) for c in labels}
                      for table, preds in predictions.items()}}


def test_folds_concatenate_and_intervals_and_pairs_follow_the_counts():
  rng = np.random.default_rng(0)
  runs, truth = [], {'ref': [], 'x': [], 'y': []}
  for _ in range(2):  # two folds
    labels = {c: rng.integers(0, 5, n) for c, n in (('ref', 20), ('x', 30), ('y', 25))}
    after = {c: np.where(rng.random(len(v)) < 0.8, v, (v + 1) % 5) for c, v in labels.items()}
    before = {c: np.where(rng.random(len(v)) < 0.5, v, (v + 2) % 5) for c, v in labels.items()}
    runs.append(_results(labels, {'before': before, 'after': after}))
    for c in labels:
      truth[c].append((after[c] == labels[c], before[c] == labels[c]))
  summary = per_image.summarize(runs, ['ref', 'x', 'y'], 'ref')
  for c in ('ref', 'x', 'y'):
    fl = np.concatenate([a for a, _ in truth[c]])
    ref = np.concatenate([b for _, b in truth[c]])
    got = summary['accuracy']['after'][c]
    assert (got['n'], got['correct']) == (len(fl), int(fl.sum()))
    assert (got['low'], got['high']) == stats.accuracy_interval(int(fl.sum()), len(fl))
    paired = summary['paired']['before'][c]
    expected = stats.paired_comparison(fl, ref)
    assert (paired['a_only'], paired['b_only']) == (expected.a_only, expected.b_only)
    assert paired['difference'] == expected.difference and paired['verdict'] == expected.verdict
  external = summary['accuracy']['after'][per_image.EXTERNAL]
  assert external['n'] == 2 * (30 + 25)  # every external image, the reference's not
  assert external['correct'] == sum(summary['accuracy']['after'][c]['correct'] for c in 'xy')
  lines = per_image.section(summary, ['ref', 'x', 'y'], 'ref')
  assert any(line.startswith('| ref (reference) | 40 |') for line in lines)
  assert any(line.startswith('| `before` | all external images |') for line in lines)


def test_a_clear_difference_is_above_and_runs_without_predictions_give_no_section():
  labels = {'ref': np.zeros(200, int), 'x': np.zeros(200, int)}
  good = {c: np.zeros(200, int) for c in labels}
  bad = {c: np.r_[np.zeros(100, int), np.ones(100, int)] for c in labels}
  summary = per_image.summarize([_results(labels, {'after': good, 'before': bad})],
                                ['ref', 'x'], 'ref')
  assert summary['paired']['before']['x']['verdict'] == 'above'
  assert summary['paired']['before']['x']['b_only'] == 0
  deployed = {'details': {'after': {'x': {'n': 3, 'accuracy': 1.0}}}}  # sites keep predictions
  summary = per_image.summarize([deployed], ['ref', 'x'], 'ref')
  assert summary == {'accuracy': {}, 'paired': {}}
  assert per_image.section(summary, ['ref', 'x'], 'ref') == []


def test_site_fine_tuned_models_are_paired_with_each_other_when_both_ran():
  labels = {'ref': np.zeros(40, int), 'x': np.zeros(60, int)}
  right = {c: np.zeros(len(v), int) for c, v in labels.items()}
  # pooled + FT misses the first 30 images of x, FL + FT the last 6: 24 more for FL + FT
  fl_ft = {'ref': right['ref'], 'x': np.r_[np.zeros(54, int), np.ones(6, int)]}
  pooled_ft = {'ref': right['ref'], 'x': np.r_[np.ones(30, int), np.zeros(30, int)]}
  tables = {'after': right, 'before': right, 'personalized_fl': fl_ft,
            'personalized_pooled': pooled_ft}
  summary = per_image.summarize([_results(labels, tables)], ['ref', 'x'], 'ref')
  got = summary['personalized']['x']
  expected = stats.paired_comparison(fl_ft['x'] == 0, pooled_ft['x'] == 0)
  assert (got['a_only'], got['b_only']) == (30, 6) == (expected.a_only, expected.b_only)
  assert got['difference'] == expected.difference == 0.4 and got['verdict'] == 'above'
  assert summary['personalized']['ref']['difference'] == 0.0
  lines = per_image.section(summary, ['ref', 'x'], 'ref')
  assert '## FL + site fine-tuning against pooled + site fine-tuning on the same images' in lines
  assert any(line.startswith('| x | 90.0 | 50.0 | +40.0 [') and '| 30 / 6 |' in line
             for line in lines)
  without = per_image.summarize([_results(labels, {'after': right, 'personalized_fl': fl_ft})],
                                ['ref', 'x'], 'ref')
  assert 'personalized' not in without  # one of the two alone: nothing to pair
