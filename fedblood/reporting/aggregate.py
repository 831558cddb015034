"""A seed (or fold) sweep's aggregate: every per-center table of report.md as mean ± sd (min).

A k-fold sweep (``--folds``) writes the same files with ``folds`` for ``seeds`` in their names.

Inputs are the seeds' own outputs (``results.json`` and ``metrics.jsonl`` of each
sub-workdir), so the aggregate can be rebuilt at any time from them alone::

  aggregate.write(workdir, seeds, [workdir / 'seed=0', workdir / 'seed=1', ...])

writes, in ``workdir``:

- ``seeds_report.md``: Table 1, Table 2 (and each other FL model whose table differs), each baseline, per center and the
  means over external / all centers, every metric as ``mean ± sd (min)``; the side-by-side
  comparison (accuracy, macro F1) as ``mean ± sd``; the figure;
- ``seeds_summary.csv``: one row per (table, row, metric): mean, sd, min, max, the values;
- ``seeds_summary.json``: the same statistics, and per center the accuracy per round;
- ``figures/accuracy_per_round_seeds.png``: mean test accuracy per round per center, with a
  band of ± one sd;
- for folds only, ``folds_per_image.json`` and two more sections of the report: every test
  image over the folds, each table's accuracy with a 95 % interval and FL against each other
  model on the same images (:mod:`fedblood.reporting.per_image`).

``sd`` is the sample standard deviation (``ddof=1``); with one seed it is undefined (``None``,
shown ``–``). A row's mean over centers is taken per seed first, then over seeds, so the
``mean, external centers`` row's sd is the spread of the seeds' external means.
"""

import csv
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from fedblood.reporting import per_image, report
from fedblood.rundir import workdir as workdir_lib

METRICS = tuple(k for k, _ in report.COLUMNS)
EXTERNAL, ALL = 'mean, external centers', 'mean, all centers'


def stats(values: Sequence[float]) -> dict:
  """``{'mean', 'sd', 'min', 'max', 'values'}`` of the non-missing ``values`` (None if none)."""
  vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and
                                                              math.isnan(v))]
  if not vals:
    return {'mean': None, 'sd': None, 'min': None, 'max': None, 'values': []}
  arr = np.asarray(vals, np.float64)
  return {'mean': float(arr.mean()), 'sd': float(arr.std(ddof=1)) if arr.size > 1 else None,
          'min': float(arr.min()), 'max': float(arr.max()), 'values': vals}


def table_sources(results: dict) -> dict:
  """``{table name: {center: summary}}`` of one run: every per-center table of its report."""
  out = {'before': results['before'], 'after': results['after']}
  for name, per in (results.get('after_models') or {}).items():
    out[f'after_models/{name}'] = per
  if 'after_last' in results:
    out['after_last'] = results['after_last']
  if results.get('after_em'):
    out['after_em'] = results['after_em']
  for name, per in (results.get('baselines') or {}).items():
    out[f'baselines/{name}'] = per
  return out


def _mean(values):
  return stats(values)['mean']


def _rows(per_center: dict, centers, reference) -> dict:
  """``{row: {metric: value}}``: each center, then the means of report.center_table."""
  rows = {c: {k: per_center[c].get(k) for k in METRICS + ('n',)} for c in centers
          if c in per_center}
  external = [c for c in centers if c != reference and c in per_center]
  groups = [(EXTERNAL, external)] if reference in per_center and external else []
  groups.append((ALL, [c for c in centers if c in per_center]))
  for label, names in groups:
    rows[label] = {k: _mean([per_center[c].get(k) for c in names]) for k in METRICS}
    rows[label]['n'] = sum(per_center[c]['n'] for c in names)
  return rows


def tables(results_list: Sequence[dict]) -> dict:
  """``{table: {row: {metric: stats}}}`` over the seeds' results (same centers in each)."""
  first = results_list[0]
  centers, reference = first['centers'], first.get('reference')
  for results in results_list[1:]:
    if results['centers'] != centers:
      raise ValueError(f'seed runs disagree on the centers: {centers} vs {results["centers"]}')
  per_seed = [{name: _rows(per, centers, reference) for name, per in table_sources(r).items()}
              for r in results_list]
  out = {}
  for name, rows in per_seed[0].items():
    out[name] = {row: {metric: stats([seed.get(name, {}).get(row, {}).get(metric)
                                      for seed in per_seed])
                       for metric in rows[row]}
                 for row in rows}
  return out


def per_round(histories: Sequence[Sequence[dict]], befores: Sequence[dict]) -> dict:
  """``{center: {'round': [...], 'mean', 'sd', 'min'}}``: FL test accuracy (round 0: before)."""
  by_center: dict = {}
  for history, before in zip(histories, befores):
    for center, m in before.items():
      by_center.setdefault(center, {}).setdefault(0, []).append(m.get('accuracy'))
    for row in history:
      if row.get('stage') == 'fl' and row.get('accuracy') is not None:
        by_center.setdefault(row['center'], {}).setdefault(row['round'], []).append(
            row['accuracy'])
  out = {}
  for center, rounds in by_center.items():
    order = sorted(rounds)
    s = [stats(rounds[r]) for r in order]
    out[center] = {'round': order, **{k: [x[k] for x in s] for k in ('mean', 'sd', 'min')}}
  return out


def cell(s: dict, with_min: bool = True) -> str:
  """``mean ± sd`` in % (and ``(min ...)``) of a :func:`stats` dict; – without values."""
  pct = report.pct
  if s['mean'] is None:
    return '–'
  text = pct(s['mean']) + (f' ± {pct(s["sd"])}' if s['sd'] is not None else '')
  return text + (f' (min {pct(s["min"])})' if with_min else '')


def _label(row: str, reference) -> str:
  if row == reference:
    return f'{row} (reference)'
  return f'*{row}*' if row in (EXTERNAL, ALL) else row


def center_table(rows: dict, reference) -> str:
  """Markdown like report.center_table, each cell ``mean ± sd (min min)`` in %."""
  lines = ['| Center | n | ' + ' | '.join(t for _, t in report.COLUMNS) + ' |',
           '|' + '---|' * (len(report.COLUMNS) + 2)]
  for row, cells in rows.items():
    n = [int(v) for v in cells['n']['values'] if v is not None]  # images per run: a count
    n_text = (str(n[0]) if len(set(n)) == 1 else f'{min(n)}-{max(n)}') if n else '–'
    lines.append(f'| {_label(row, reference)} | {n_text} | ' +
                 ' | '.join(cell(cells[k]) for k in METRICS) + ' |')
  return '\n'.join(lines)


def comparison_table(agg: dict, centers, reference, algorithm: str, key: str) -> str:
  """Markdown like report.comparison_table: ``key`` per center per model, ``mean ± sd``."""
  columns = [('Reference model (Table 1)', 'before')]
  models = [n for n in agg if n.startswith('after_models/')] or ['after']
  columns += [(f'FL {algorithm} {n.split("/", 1)[1]} (Table 2)' if '/' in n else 'FL (Table 2)',
               n) for n in models]
  if 'after_last' in agg:
    columns.append(('FL, last round', 'after_last'))
  if 'after_em' in agg:
    columns.append((report.EM_TITLE, 'after_em'))
  columns += [(report.BASELINE_TITLES.get(n.split('/', 1)[1], n.split('/', 1)[1]), n)
              for n in agg if n.startswith('baselines/')]
  lines = ['| Center | ' + ' | '.join(t for t, _ in columns) + ' |',
           '|' + '---|' * (len(columns) + 1)]
  empty = stats([])
  for row in [*centers, EXTERNAL]:
    if not any(row in agg[n] for _, n in columns):
      continue
    lines.append(f'| {_label(row, reference)} | ' + ' | '.join(
        cell(agg[n].get(row, {}).get(key, empty), False) for _, n in columns) + ' |')
  return '\n'.join(lines)


def plot_band(rounds: dict, path, reference=None, over: str = 'seeds') -> Path:
  """Mean test accuracy per round per center over the runs (``over``), with a ± sd band."""
  fig, ax = report.plt.subplots(figsize=(6.4, 4.0), dpi=110)
  for center, s in rounds.items():
    x = np.asarray(s['round'])
    mean = 100 * np.asarray(s['mean'], float)
    sd = 100 * np.asarray([v if v is not None else 0.0 for v in s['sd']], float)
    line, = ax.plot(x, mean, marker='o', markersize=3,
                    linewidth=2.2 if center == reference else 1.4, label=center)
    ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_xlabel('federated round (0 = reference model)')
  ax.set_ylabel(f'test accuracy (%), mean ± sd over {over}')
  ax.set_ylim(0, 102)
  ax.xaxis.set_major_locator(report.matplotlib.ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='lower right')
  ax.set_title(f'Accuracy per round, every center (band: ± 1 sd over {over})')
  return report._save(fig, path)  # pylint: disable=protected-access


TITLES = {'before': 'Table 1: reference model on every center (before FL)',
          'after': 'Table 2: after federated fine-tuning',
          'after_last': 'FL at the last round (beside Table 2)', 'after_em': report.EM_TITLE}


def _title(name: str) -> str:
  if name in TITLES:
    return TITLES[name]
  kind, _, model = name.partition('/')
  return (f'Table 2 with the `{model}` model' if kind == 'after_models'
          else f'Baseline: {report.BASELINE_TITLES.get(model, model)}')


def _selection_lines(results_list, label: str) -> list[str]:
  """The round each run's Table 2 reports (``fl.select``), when the runs say."""
  chosen = [r.get('selection') for r in results_list]
  if not all(chosen):
    return []
  rounds = ', '.join(str(s['round']) for s in chosen)
  return [f"- Table 2's round per {label} (`fl.select='{chosen[0]['rule']}'`): {rounds}, of "
          f"{chosen[0]['last_round']}"]


def write(workdir, seeds: Sequence[int], dirs: Sequence, label: str = 'seed') -> Path:
  """Writes the aggregate files of the runs in ``dirs``; returns ``<label>s_report.md``.

  ``seeds``: what tells the runs apart, by ``label``: their seeds (``'seed'``, a seed sweep)
  or their folds (``'fold'``, a k-fold sweep, :func:`fedblood.study.seeds.run_folds`).
  """
  workdir, many = Path(workdir), f'{label}s'
  results_list = []
  for d in dirs:
    path = workdir_lib.path(d, workdir_lib.RESULTS)
    if not path.exists():
      raise FileNotFoundError(f'{label} sweep: {path} is missing (that {label} has not finished)')
    results_list.append(workdir_lib.read_results(d))
  first = results_list[0]
  centers, reference = first['centers'], first.get('reference')
  agg = tables(results_list)
  rounds = per_round([workdir_lib.read_rows(d) for d in dirs], [r['before'] for r in results_list])
  figure = plot_band(rounds, workdir_lib.path(workdir, workdir_lib.FIGURES)
                     / f'accuracy_per_round_{many}.png', reference, many)

  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(['table', 'row', 'metric', 'mean', 'sd', 'min', 'max', many, 'values'])
  for name, rows in agg.items():
    for row, cells in rows.items():
      for metric, s in cells.items():
        writer.writerow([name, row, metric, *('' if s[k] is None else repr(s[k])
                                              for k in ('mean', 'sd', 'min', 'max')),
                         len(s['values']), ';'.join(repr(v) for v in s['values'])])
  (workdir / f'{many}_summary.csv').write_text(buf.getvalue())
  (workdir / f'{many}_summary.json').write_text(json.dumps(
      {many: list(seeds), 'workdirs': [str(d) for d in dirs], 'centers': centers,
       'reference': reference, 'sd': 'sample standard deviation (ddof=1)', 'tables': agg,
       'accuracy_per_round': rounds}, indent=1))

  algorithm = first.get('algorithm', '')
  parts = [f'# {first.get("title", "fedblood run")}: {len(seeds)} {many}', '',
           f'- {many}: {", ".join(str(s) for s in seeds)} (runs in '
           f'{", ".join(f"`{Path(d).name}`" for d in dirs)})',
           f'- algorithm: `{algorithm}`, rounds: {first.get("rounds", "?")}, reference center: '
           f'`{reference}`', *_selection_lines(results_list, label), '',
           f'Metrics in %, each cell mean ± sd (min) over the {many}; sd is the sample standard '
           f'deviation. A mean row is averaged over centers per {label}, then over {many}.', '']
  for name, rows in agg.items():
    if name.startswith('after_models/') and rows == agg['after']:
      continue  # as report.md: a model's table only where it differs from Table 2
    parts += [f'## {_title(name)}', '', center_table(rows, reference), '']
  parts += ['## Reference model, FL and baselines side by side (accuracy, mean ± sd)', '',
            comparison_table(agg, centers, reference, algorithm, 'accuracy'), '',
            '### The same, macro F1', '',
            comparison_table(agg, centers, reference, algorithm, 'f1'), '',
            f'## Accuracy per round (mean ± sd over {many})', '',
            f'![accuracy per round](figures/{figure.name})', '']
  if label == 'fold':  # every image is tested once over the folds: pooled intervals
    images = per_image.summarize(results_list, centers, reference)
    (workdir / 'folds_per_image.json').write_text(json.dumps(images, indent=1))
    parts += per_image.section(images, centers, reference, label)
  path = workdir / f'{many}_report.md'
  path.write_text('\n'.join(parts))
  return path
