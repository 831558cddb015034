"""Every test image of a k-fold sweep at once: 95 % intervals and paired comparisons.

Over the folds of ``--folds K`` every image of a center is a test image exactly once, so the
folds' per-image predictions (``details.<table>.<center>.predictions`` / ``labels`` in each
fold's results.json) together are the whole center: 258-1,497 images instead of one fold's
52-299. From them:

- each table's accuracy per center (and over every external image) with a 95 % Wilson interval
  (:func:`fedblood.stats.accuracy_interval`);
- the FL model (Table 2) against the reference model and each baseline on the same images:
  the accuracy difference with a paired bootstrap 95 % interval and McNemar's exact p
  (:func:`fedblood.stats.paired_comparison`); "above" / "below" only when the interval
  excludes 0, else "tie";
- with site fine-tuning (``baselines.personalize``), the personalised FL model against the pooled
  model fine-tuned at each site the same way, on the same images (the issue's "personalised FL
  within 1 point of pooled + site fine-tuning").

Runs without per-image predictions (a deployed run: they stay at the sites) give no section.
"""

import numpy as np

from fedblood import stats
from fedblood.reporting import report

EXTERNAL = 'all external images'
# The two site-fine-tuned models (fedblood.study.stages.baselines' tables), compared to each other.
PERSONALIZED = ('personalized_fl', 'personalized_pooled')


def correctness(results_list) -> dict:
  """``{table: {center: bool array}}``: every run's per-image correctness, runs concatenated
  in order (tables missing a center's predictions in any run are left out)."""
  out = {}
  for results in results_list:
    for table, per_center in (results.get('details') or {}).items():
      for center, m in per_center.items():
        if 'predictions' not in m or 'labels' not in m:
          continue
        correct = np.asarray(m['predictions']) == np.asarray(m['labels'])
        out.setdefault(table, {}).setdefault(center, []).append(correct)
  runs = len(results_list)
  return {t: {c: np.concatenate(parts) for c, parts in per.items() if len(parts) == runs}
          for t, per in out.items()}


def _with_external(per_center: dict, centers, reference) -> dict:
  external = [c for c in centers if c != reference and c in per_center]
  out = {c: per_center[c] for c in centers if c in per_center}
  if external:
    out[EXTERNAL] = np.concatenate([per_center[c] for c in external])
  return out


def summarize(results_list, centers, reference) -> dict:
  """``{'accuracy': {table: {center: {n, correct, accuracy, low, high}}},
  'paired': {other table: {center: Paired as dict}}}`` (FL = ``after`` against the others)."""
  correct = {t: _with_external(per, centers, reference)
             for t, per in correctness(results_list).items()}
  accuracy = {}
  for table, per in correct.items():
    accuracy[table] = {}
    for center, c in per.items():
      low, high = stats.accuracy_interval(int(c.sum()), len(c))
      accuracy[table][center] = {'n': len(c), 'correct': int(c.sum()),
                                 'accuracy': float(c.mean()), 'low': low, 'high': high}
  paired = {table: _pairs(correct.get('after', {}), per)
            for table, per in correct.items() if table != 'after'}
  out = {'accuracy': accuracy, 'paired': paired}
  if all(t in correct for t in PERSONALIZED):
    out['personalized'] = _pairs(*(correct[t] for t in PERSONALIZED))
  return out


def _pairs(a: dict, b: dict) -> dict:
  """``{center: Paired as dict}``: ``a`` against ``b`` on each center both hold whole."""
  pairs = {c: stats.paired_comparison(a[c], b[c]) for c in b if c in a and len(a[c]) == len(b[c])}
  return {c: {**p._asdict(), 'verdict': p.verdict} for c, p in pairs.items()}


def _interval(a: dict | None) -> str:
  return report.with_interval(a['accuracy'], a['low'], a['high']) if a else '–'


def _row(lead: str, p: dict) -> str:
  return (f'| {lead} | {report.pct(p["accuracy_a"])} | {report.pct(p["accuracy_b"])} | '
          f'{stats.points(p["difference"], p["low"], p["high"])} | '
          f'{p["a_only"]} / {p["b_only"]} | {p["p_mcnemar"]:.3g} | {p["verdict"]} |')


def section(summary: dict, centers, reference, label: str = 'fold') -> list[str]:
  """report lines: the intervals table and the paired comparisons (empty without data)."""
  accuracy, paired = summary['accuracy'], summary['paired']
  if 'after' not in accuracy:
    return []
  tables = ['before', 'after'] + [t for t in accuracy if t not in ('before', 'after')]
  tables = [t for t in tables if t in accuracy]
  rows = [c for c in list(centers) + [EXTERNAL] if c in accuracy['after']]
  name = lambda c: f'{c} (reference)' if c == reference else c
  out = [f'## Every test image over the {label}s: accuracy with a 95 % interval', '',
         f'Each image of a center is a test image in exactly one {label}; the {label}s\' '
         'predictions together cover the whole center. Cells: accuracy % [95 % Wilson '
         'interval].', '',
         '| center | images | ' + ' | '.join(f'`{t}`' for t in tables) + ' |',
         '|---|---|' + '---|' * len(tables)]
  for c in rows:
    cells = [_interval(accuracy[t].get(c)) for t in tables]
    out.append(f'| {name(c)} | {accuracy["after"][c]["n"]} | ' + ' | '.join(cells) + ' |')
  out += ['', '## FL (`after`, Table 2) against each other model on the same images', '',
          'Difference of accuracy in points with a paired bootstrap 95 % interval (images '
          'resampled), the images only FL / only the other gets right, and McNemar\'s exact '
          'p. "above" / "below" only when the interval excludes 0.', '',
          '| against | center | FL | other | FL - other [95 %] | only FL / only other | p | |',
          '|---|---|---|---|---|---|---|---|']
  for table, per in paired.items():
    out += [_row(f'`{table}` | {name(c)}', per[c]) for c in rows if c in per]
  personal = summary.get('personalized')
  if personal:
    out += ['', '## FL + site fine-tuning against pooled + site fine-tuning on the same images',
            '', 'Each site fine-tunes FL\'s model (`personalized_fl`) and the pooled model '
            '(`personalized_pooled`) the same way on its own training split; the same paired '
            'test as above.', '',
            '| center | FL + site FT | pooled + site FT | difference [95 %] | only FL + FT / '
            'only pooled + FT | p | |', '|---|---|---|---|---|---|---|']
    out += [_row(name(c), personal[c]) for c in rows if c in personal]
  return out + ['']
