"""Centers that never joined: one table across a leave-one-center-out sweep over folds.

A point of ``configs/wbc_loco.py``'s sweep leaves centers out of FL and of the pooled baselines
(``fl.holdout``); its runs still test every model on them (``held_out`` in ``results.json``).
Over ``--folds K`` each image of a left-out center is a test image once, so for each left-out
center :func:`write` gives, for every model that never saw its images,

* its accuracy on the center's test split of each fold, then over all those folds' test images
  with a 95 % Wilson interval;
* FL (Table 2) against the reference model alone and against the pooled model trained from
  scratch without the center, paired on the same images (bootstrap 95 % interval, McNemar's
  exact p; "above" / "below" only when the interval excludes 0): a center that never joined
  should score at or above both;
* where several rows hold the same center out (points of another sweep, or studies that ran
  apart, named on the command line), each row's FL against the first row's, on the same images
  (checked: the same folds and the same labels in the same order); and a row that trained no
  pooled model (an FL-only study) has its FL paired with the first row's pooled model from
  scratch, in a column of its own that says so (the same model only where the row's lever
  leaves the pooled fit alone, e.g. an FL setting).

``--sweep --folds`` writes it as ``loco_folds.md`` / ``.csv`` beside ``sweep_folds.md`` when a
point leaves a center out; for studies that ran apart (e.g. the recipe's and a lever's)::

  python -m fedblood.reporting.loco_table OUT recipe=/runs/loco randconv=/runs/loco_rc
"""

import csv
import io
import json
from pathlib import Path
import sys

import numpy as np

from fedblood import stats
from fedblood.reporting.report import pct, with_interval
from fedblood.rundir import workdir as workdir_lib

SUMMARY = 'folds_summary.json'
# (details table, column title): the models of a run that never saw a left-out center's images.
MODELS = (('before', 'reference alone'), ('after', 'FL'), ('after_em', 'FL, EM priors'),
          ('pooled_scratch', 'pooled from scratch without it'),
          ('pooled_reference', 'pooled from the reference without it'))
PAIRED = (('before', 'FL − reference alone'),
          ('pooled_scratch', 'FL − pooled from scratch without it'))
FIRST_FL = "FL − first row's FL"
FIRST_POOLED = "FL − first row's pooled from scratch without it"
TARGET = 0.65  # issue 23: every left-out center at 65 % or above


def _studies(directory: Path) -> list:
  """The ``--folds`` studies in ``directory``: itself, or each point of a sweep in it."""
  if (directory / SUMMARY).is_file():
    return [directory]
  points = sorted(p.parent for p in directory.glob(f'*/{SUMMARY}'))
  if not points:
    raise FileNotFoundError(f'{directory}: no {SUMMARY} in it or in a folder of it: not a '
                            'finished --folds study or --sweep --folds sweep')
  return points


def _fold_images(results: dict, center: str) -> dict:
  """``{'labels', table: correct}`` of ``center``'s test images in one fold's results."""
  details = results.get('details') or {}
  out = {}
  for table, _ in MODELS:
    m = details.get(table, {}).get(center)
    if m is None or 'predictions' not in m or 'labels' not in m:
      continue
    labels = np.asarray(m['labels'])
    out.setdefault('labels', labels)
    out[table] = np.asarray(m['predictions']) == labels
  return out


def rows_of(name: str, directory) -> list:
  """A row per (``--folds`` study, center it left out) under ``directory``: ``{'name',
  'center', 'folds': {fold: _fold_images}}``; named ``name``, or ``name/point`` where the
  directory holds several studies."""
  studies = _studies(Path(directory))
  rows = []
  for study in studies:
    summary = json.loads((study / SUMMARY).read_text())
    results = {i: workdir_lib.read_results(d) for i, d in zip(summary['folds'],
                                                              summary['workdirs'])}
    held = sorted({c for r in results.values() for c in r.get('held_out') or ()})
    for center in held:
      rows.append({'name': name if len(studies) == 1 else f'{name}/{study.name}', 'center': center,
                   'folds': {i: _fold_images(r, center) for i, r in results.items()}})
  return rows


def _common(rows: list) -> list:
  """The folds every row of one center ran, their labels checked equal across the rows."""
  folds = [i for i in rows[0]['folds'] if all(i in r['folds'] for r in rows)]
  if not folds:
    raise ValueError(f'left-out {rows[0]["center"]}: ' + ', '.join(r['name'] for r in rows)
                     + ' share no fold')
  for i in folds:
    for r in rows[1:]:
      if not np.array_equal(r['folds'][i].get('labels'), rows[0]['folds'][i].get('labels')):
        raise ValueError(f'left-out {r["center"]}, fold {i}: {r["name"]} tested other images '
                         f'than {rows[0]["name"]} (labels differ): not the same split')
  return folds


def _measure(row: dict, folds: list, first: dict | None) -> dict:
  """Per model: per-fold accuracies and every image's correctness; then the paired FLs."""
  out = {'models': {}, 'paired': {}}
  for table, _ in MODELS:
    parts = [row['folds'][i].get(table) for i in folds]
    if any(p is None for p in parts):
      continue
    c = np.concatenate(parts)
    low, high = stats.accuracy_interval(int(c.sum()), len(c))
    out['models'][table] = {'per_fold': [float(p.mean()) for p in parts], 'correct': c,
                            'accuracy': float(c.mean()), 'low': low, 'high': high}
  fl = out['models'].get('after')
  if fl is not None:
    for table, title in PAIRED:
      if table in out['models']:
        out['paired'][title] = stats.paired_comparison(fl['correct'],
                                                       out['models'][table]['correct'])
    if first is not None:
      borrowed = [('after', FIRST_FL)]
      if 'pooled_scratch' not in out['models']:  # an FL-only row: the first row's pooled model
        borrowed.append(('pooled_scratch', FIRST_POOLED))
      for table, title in borrowed:
        if table in first['models']:
          out['paired'][title] = stats.paired_comparison(fl['correct'],
                                                         first['models'][table]['correct'])
  return out


def _paired_cell(p) -> str:
  return f'{p.points} p {p.p_mcnemar:.2g} {p.verdict}'


def write(out, studies: dict) -> Path | None:
  """Writes ``loco_folds.md`` / ``.csv`` into ``out`` for ``{name: directory}`` (each a
  ``--folds`` study or a sweep of them); returns the markdown's path, None when no run left a
  center out."""
  rows = [r for name, d in studies.items() for r in rows_of(name, d)]
  if not rows:
    return None
  centers = list(dict.fromkeys(r['center'] for r in rows))
  paired_titles = [t for _, t in PAIRED] + [FIRST_FL, FIRST_POOLED]
  head = ['left out', 'images', 'row', *(t for _, t in MODELS), *paired_titles,
          f'FL ≥ {pct(TARGET)} %']
  md = ['# Centers that never joined: test accuracy over the folds, %', '',
        'Each model cell: the left-out center\'s test split in each fold, then over all those '
        'folds\' test images [95 % Wilson interval]. FL − other: paired on the same images '
        '(bootstrap 95 % interval, McNemar\'s p); "above" / "below" only when the interval '
        'excludes 0.', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(['center', 'row', 'folds', 'quantity', 'per_fold', 'images', 'correct',
                   'value', 'low', 'high', 'p_mcnemar'])
  for center in centers:
    group = [r for r in rows if r['center'] == center]
    folds = _common(group)
    first = None
    for r in group:
      m = _measure(r, folds, first)
      first = first or m
      n = len(next(iter(m['models'].values()))['correct']) if m['models'] else 0
      cells = []
      for table, title in MODELS:
        a = m['models'].get(table)
        cells.append('–' if a is None else
                     ' / '.join(pct(v) for v in a['per_fold'])
                     + f': {with_interval(a["accuracy"], a["low"], a["high"])}')
        if a is not None:
          writer.writerow([center, r['name'], ';'.join(map(str, folds)), title,
                           ';'.join(repr(v) for v in a['per_fold']), len(a['correct']),
                           int(a['correct'].sum()), a['accuracy'], a['low'], a['high'], ''])
      cells += [_paired_cell(m['paired'][t]) if t in m['paired'] else '–' for t in paired_titles]
      for title, p in m['paired'].items():
        writer.writerow([center, r['name'], ';'.join(map(str, folds)), title, '', p.n, '',
                         p.difference, p.low, p.high, p.p_mcnemar])
      fl = m['models'].get('after')
      cells.append('–' if fl is None else 'yes' if fl['accuracy'] >= TARGET else 'no')
      md.append(f'| {center} | {n} | {r["name"]} (folds {", ".join(map(str, folds))}) | '
                + ' | '.join(cells) + ' |')
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'loco_folds.csv').write_text(buf.getvalue())
  path = out / 'loco_folds.md'
  path.write_text('\n'.join(md) + '\n')
  return path


def main(argv) -> None:
  if len(argv) < 2 or not all('=' in a for a in argv[1:]):
    sys.exit('usage: python -m fedblood.reporting.loco_table OUT NAME=STUDY_DIR '
             '[NAME=STUDY_DIR ...]')
  path = write(argv[0], dict(a.split('=', 1) for a in argv[1:]))
  if path is None:
    sys.exit('no run of these studies left a center out (fl.holdout): no table written')
  print(path)


if __name__ == '__main__':
  main(sys.argv[1:])
