"""Hand-made results and history of a 3-center run (test_report, test_hardening)."""

from fedblood.model import metrics

CENTERS = ('ref', 'ext_a', 'ext_b')


def sample_results():
  # Hand-made predictions: the reference model is perfect at 'ref', poor elsewhere; FL fixes ext_a.
  y = [0, 1, 2, 3, 4, 4, 3, 2]
  before = {'ref': metrics.classify(y, y),
            'ext_a': metrics.classify(y, [4] * 8),
            'ext_b': metrics.classify([1, 1, 4, 4], [1, 4, 4, 4])}   # ext_b lacks three classes
  after = {'ref': metrics.classify(y, y),
           'ext_a': metrics.classify(y, [0, 1, 2, 3, 4, 4, 3, 1]),
           'ext_b': metrics.classify([1, 1, 4, 4], [1, 1, 4, 4])}
  return {
      'title': 'test run', 'centers': list(CENTERS), 'reference': 'ref', 'algorithm': 'fed_dyn',
      'rounds': 2, 'eval_model': 'average',
      'before': {c: metrics.summary(m) for c, m in before.items()},
      'after': {c: metrics.summary(m) for c, m in after.items()},
      'baselines': {'local_only': {c: metrics.summary(m) for c, m in before.items()},
                    'pooled': {c: metrics.summary(m) for c, m in after.items()}},
      'confusion': {'before': {c: m['confusion'] for c, m in before.items()},
                    'after': {c: m['confusion'] for c, m in after.items()}},
  }


def sample_history():
  rows = []
  for r, accs in ((1, (1.0, 0.5, 0.75)), (2, (1.0, 0.875, 1.0))):
    for c, a in zip(CENTERS, accs):
      rows.append({'stage': 'fl', 'round': r, 'center': c, 'accuracy': a})
  return rows
