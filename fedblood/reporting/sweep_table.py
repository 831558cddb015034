"""One table across a sweep repeated over seeds or folds (``--sweep`` with ``--seeds``/``--folds``).

Each sweep point is an ordinary seeds or folds study in ``<workdir>/<point>``, with its own
aggregate (``<label>s_summary.json``, :mod:`fedblood.reporting.aggregate`). :func:`write` reads
them and writes ``sweep_<label>s.md`` / ``.csv``, a row per point:

* FL's test accuracy (Table 2) at each center and its external mean, mean ± sd over the runs;
  the last round's external mean and the pooled-from-scratch baseline's, where the runs have them;
* over folds, where every image is a test image once: the external accuracy over every external
  test image with its 95 % Wilson interval, and the paired difference of the point's FL against
  the first point's on the same images (bootstrap 95 % interval, McNemar's p). "above" / "below"
  only when the interval excludes 0: the ablation's answer, made by the tool.
* over folds, the centers a point left out of FL (``fl.holdout``): ``loco_folds.md``
  (:mod:`fedblood.reporting.loco_table`).

:func:`compare` writes the same table for studies that ran apart, e.g. a lever's ``--folds``
study (restoring the references) against the default's::

  python -m fedblood.reporting.sweep_table OUT default=/runs/wbc5 equal=/runs/levers/equal
"""

import csv
import io
import json
from pathlib import Path
import sys
from typing import Sequence

import numpy as np

from fedblood import stats
from fedblood.reporting import aggregate, loco_table, per_image
from fedblood.reporting.report import with_interval
from fedblood.rundir import workdir as workdir_lib

BASELINE = ('baselines/pooled_scratch', 'baselines/pooled')  # the first a run has


def _point(directory: Path, label: str, only=None) -> dict:
  """A study's tables and per-image correctness; ``only``: those of its runs labelled so (the
  folds every compared study ran), the tables then computed over them."""
  summary = json.loads((directory / f'{label}s_summary.json').read_text())
  centers, reference = summary['centers'], summary['reference']
  keep = [d for run, d in zip(summary[f'{label}s'], summary['workdirs'])
          if only is None or run in only]
  results = [workdir_lib.read_results(d) for d in keep]
  tables = summary['tables'] if len(keep) == len(summary['workdirs']) else aggregate.tables(results)
  correct = per_image.correctness(results).get('after', {})
  external = [c for c in centers if c != reference]
  images = (np.concatenate([correct[c] for c in external])
            if external and all(c in correct for c in external) else None)
  return {'tables': tables, 'centers': centers, 'reference': reference,
          'runs': len(results), 'images': images}


def _columns(first: dict) -> list:
  """``[(title, table, row)]``: the stats cells of each row."""
  ext = aggregate.EXTERNAL
  columns = [(f'{c} (reference)' if c == first['reference'] else c, 'after', c)
             for c in first['centers']]
  columns.append(('external mean', 'after', ext))
  if 'after_last' in first['tables']:
    columns.append(('external, last round', 'after_last', ext))
  baseline = next((b for b in BASELINE if b in first['tables']), None)
  if baseline:
    columns.append((f'external, {baseline.split("/")[1].replace("_", " ")}', baseline, ext))
  return columns


def write(workdir, points: Sequence[dict], label: str) -> Path:
  """Writes ``sweep_<label>s.md`` / ``.csv``; returns the markdown's path.

  ``points``: ``{'name', 'overrides'}`` in the sweep's order, each finished in
  ``<workdir>/<name>``; the first is what the others are compared with.
  """
  workdir = Path(workdir)
  read = [_point(Path(p['dir']) if 'dir' in p else workdir / p['name'], label, p.get('only'))
          for p in points]
  columns = _columns(read[0])
  keys = sorted({k for p in points for k in p['overrides']})
  empty = aggregate.stats([])
  get = lambda r, table, row: r['tables'].get(table, {}).get(row, {}).get('accuracy', empty)
  head = ['point', *keys, *(t for t, _, _ in columns)]
  pooled = read[0]['images'] is not None and label == 'fold'
  if pooled:
    head += ['every external image [95 %]', f'vs {points[0]["name"]} [95 %]', 'p', '']
  only = points[0].get('only')
  over = (f' ({label}s {", ".join(str(i) for i in only)}: those every study ran)'
          if only is not None else '')
  md = [f'# Sweep over {label}s: FL test accuracy (Table 2), %', '',
        f'Cells: mean ± sd over the {read[0]["runs"]} {label}s of each point{over}.', '',
        '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(['point', *keys, *(f'{t} {m}' for t, _, _ in columns for m in ('mean', 'sd'))]
                  + (['external_images', 'external_correct', 'vs_first_difference', 'vs_first_low',
                      'vs_first_high', 'vs_first_p'] if pooled else []))
  for p, r in zip(points, read):
    cells = [get(r, table, row) for _, table, row in columns]
    over = [str(p['overrides'].get(k, '')) for k in keys]
    line = [p['name'], *over, *(aggregate.cell(s, False) for s in cells)]
    row = [p['name'], *over, *(('' if s[m] is None else repr(s[m])) for s in cells
                               for m in ('mean', 'sd'))]
    if pooled:
      a = r['images']
      low, high = stats.accuracy_interval(int(a.sum()), len(a))
      line.append(with_interval(a.mean(), low, high))
      row += [len(a), int(a.sum())]
      if r is read[0]:
        line += ['(the reference point)', '', '']
        row += ['', '', '', '']
      else:
        vs = stats.paired_comparison(a, read[0]['images'])
        line += [vs.points, f'{vs.p_mcnemar:.3g}', vs.verdict]
        row += [vs.difference, vs.low, vs.high, vs.p_mcnemar]
    md.append('| ' + ' | '.join(line) + ' |')
    writer.writerow(row)
  stem = workdir / f'sweep_{label}s'
  stem.with_suffix('.csv').write_text(buf.getvalue())
  path = stem.with_suffix('.md')
  path.write_text('\n'.join(md) + '\n')
  if label == 'fold':  # centers a point left out of FL (fl.holdout): loco_folds.md, if any
    loco_table.write(workdir, {p['name']: Path(p['dir']) if 'dir' in p else workdir / p['name']
                               for p in points})
  return path


def compare(out, studies: dict, label: str = 'fold') -> Path:
  """:func:`write` into ``out`` for finished ``--folds`` / ``--seeds`` studies ``{name: dir}``.

  The first study is the reference point; each point's columns are the config fields in which
  its first run differs from the first study's (``fl.weighting``, ``reference.restore``...); a
  field a study predates counts at the value it ran with (``workdir.LATER_FIELDS``).
  The paired comparison needs the same images: the studies must split the same centers into
  the same folds (checked). Studies that ran different folds of the same split (``--only_folds``)
  are compared over the folds they all ran.
  """
  dirs = {name: Path(d) for name, d in studies.items()}
  ran = {}  # {name: {label: its run's workdir}}
  for name, d in dirs.items():
    summary = d / f'{label}s_summary.json'
    if not summary.is_file():
      raise FileNotFoundError(f'{d}: no {summary.name}: not a finished --{label}s study')
    summary = json.loads(summary.read_text())
    ran[name] = dict(zip(summary[f'{label}s'], summary['workdirs']))
  common = [i for i in next(iter(ran.values())) if all(i in r for r in ran.values())]
  if not common:
    raise ValueError(f'the studies share no {label}: '
                     + '; '.join(f'{n}: {list(r)}' for n, r in ran.items()))
  only = None if all(list(r) == common for r in ran.values()) else common
  # A study written before a later field ran it at its old value: not a difference.
  runs = {name: workdir_lib.with_later_fields(
      workdir_lib.flatten(workdir_lib.read_config(r[common[0]]) or {})) for name, r in ran.items()}
  first = next(iter(runs.values()))
  points = []
  for name, flat in runs.items():
    for key in [f'data.{k}' for k in ('folds', *workdir_lib.SPLIT_KEYS)]:
      if flat.get(key) != first.get(key):
        raise ValueError(f'{dirs[name]}: data.{key.split(".", 1)[1]}={flat.get(key)!r}, the '
                         f'first study {first.get(key)!r}: not the same test images')
    points.append({'name': name, 'dir': dirs[name], 'only': only, 'overrides': {
        k: flat.get(k, '(absent)') for k in sorted(set(flat) | set(first))
        if flat.get(k) != first.get(k) and k != 'title'}})
  Path(out).mkdir(parents=True, exist_ok=True)
  return write(out, points, label)


def main(argv) -> None:
  if len(argv) < 3 or not all('=' in a for a in argv[1:]):
    sys.exit('usage: python -m fedblood.reporting.sweep_table OUT NAME=STUDY_DIR NAME=STUDY_DIR ...')
  print(compare(argv[0], dict(a.split('=', 1) for a in argv[1:])))


if __name__ == '__main__':
  main(sys.argv[1:])
