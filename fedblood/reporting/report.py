"""Tables (markdown) and figures (png) of a run: ``report.md``.

Inputs are plain dicts, so a report can be rebuilt from ``results.json`` and
``metrics.jsonl`` alone (``write_report(workdir)`` after a run, or by hand):

- ``results`` (``results.json``): ``centers``, ``reference``, ``before`` and
  ``after`` ({center: summary}, see :func:`fedblood.model.metrics.summary`),
  optionally ``after_models`` ({eval-model name: {center: summary}}, e.g.
  FedDyn's client average vs corrected server model), ``baselines``
  ({name: {center: summary}}), ``confusion`` ({stage: {center: K x K}}),
  ``classes`` and a few run facts (algorithm, rounds, wall times).
- ``history`` (``metrics.jsonl`` rows): {stage, round, center, accuracy, ...}.

Figures use matplotlib's Agg backend (no display needed).
"""

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.ticker  # pylint: disable=g-import-not-at-top,wrong-import-position

from fedblood import names as center_names  # pylint: disable=wrong-import-position
from fedblood.model.metrics import CLASSES  # pylint: disable=wrong-import-position
from fedblood.rundir import workdir as workdir_lib  # pylint: disable=wrong-import-position

# Column titles of the per-center tables, in the study's order.
COLUMNS = (('accuracy', 'Accuracy'), ('balanced_accuracy', 'Bal. acc.'), ('precision', 'Precision'),
           ('recall', 'Recall'), ('specificity', 'Specificity'), ('f1', 'F1'))
BASELINE_TITLES = {'local_only': 'Local-only', 'pooled': 'Pooled (centralized)',
                   'local_only_scratch': 'Local-only (scratch)',
                   'local_only_reference': 'Local-only (from reference)',
                   'pooled_scratch': 'Pooled (scratch)',
                   'pooled_reference': 'Pooled (from reference)',
                   'personalized_fl': 'FL + site fine-tuning',
                   'personalized_pooled': 'Pooled + site fine-tuning'}


EM_TITLE = 'FL, held out: class priors re-estimated (EM)'
EM_NOTE = ('Table 2\'s model at each center that never joined, its predictions corrected for the '
           'class priors EM re-estimates on all of that center\'s images, labels unused (Saerens '
           'et al. 2002; `--priors em` of `--mode evaluate`).')


def _center_name(c: str, reference: str | None, held_out=()) -> str:
  name = f'{center_names.md(c)} (reference)' if c == reference else center_names.md(c)
  return f'{name} (held out)' if c in held_out else name


def pct(x) -> str:
  return '–' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{100 * x:.1f}'


def with_interval(value, low, high) -> str:
  """An accuracy (a fraction) in % with its interval, as the reports print it: ``'86.3 [84.0,
  88.4]'``."""
  return f'{pct(value)} [{pct(low)}, {pct(high)}]'


def mean(values) -> float | None:
  """The mean of the values that are not None (None if there are none)."""
  vals = [v for v in values if v is not None]
  return sum(vals) / len(vals) if vals else None


def center_table(per_center: dict, centers: Sequence[str], reference: str | None = None,
                 held_out: Sequence[str] = ()) -> str:
  """Markdown table: a row per center (metrics in %), then means over external and all centers.

  Centers in ``held_out`` (never joined FL) are marked so.
  """
  head = '| Center | n | ' + ' | '.join(t for _, t in COLUMNS) + ' |'
  rows = [head, '|' + '---|' * (len(COLUMNS) + 2)]
  for c in centers:
    m = per_center[c]
    name = _center_name(c, reference, held_out)
    rows.append(f'| {name} | {m["n"]} | ' + ' | '.join(pct(m.get(k)) for k, _ in COLUMNS) + ' |')
  external = [c for c in centers if c != reference]
  groups = [('mean, external centers', external)] if reference in centers and external else []
  groups.append(('mean, all centers', list(centers)))
  for label, names in groups:
    rows.append(f'| *{label}* | {sum(per_center[c]["n"] for c in names)} | ' + ' | '.join(
        pct(mean(per_center[c].get(k) for c in names)) for k, _ in COLUMNS) + ' |')
  return '\n'.join(rows)


def comparison_table(results: dict, key: str = 'accuracy') -> str:
  """Markdown table of ``key`` per center: reference model, FL model(s), and every baseline."""
  centers, reference = results['centers'], results.get('reference')
  columns = [('Reference model (Table 1)', results['before'])]
  after_models = results.get('after_models') or {'': results['after']}
  for name, per_center in after_models.items():
    columns.append((f'FL {results.get("algorithm", "")} {name}'.strip() + ' (Table 2)'
                    if name else 'FL (Table 2)', per_center))
  if _last_differs(results):
    columns.append((f'FL, last round ({results["selection"]["last_round"]})',
                    results['after_last']))
  if results.get('after_em'):
    columns.append((EM_TITLE, results['after_em']))
  for name, per_center in (results.get('baselines') or {}).items():
    columns.append((BASELINE_TITLES.get(name, name), per_center))
  rows = ['| Center | ' + ' | '.join(t for t, _ in columns) + ' |',
          '|' + '---|' * (len(columns) + 1)]
  for c in centers:
    name = _center_name(c, reference, results.get('held_out', ()))
    cells = ' | '.join(pct(pc.get(c, {}).get(key)) for _, pc in columns)
    rows.append(f'| {name} | {cells} |')
  external = [c for c in centers if c != reference]
  if external:
    rows.append('| *mean, external* | ' + ' | '.join(
        pct(mean(pc.get(c, {}).get(key) for c in external)) for _, pc in columns) + ' |')
  return '\n'.join(rows)


def plot_accuracy_per_round(history: Sequence[dict], path, reference: str | None = None,
                            before: dict | None = None, stage: str = 'fl') -> Path:
  """Figure 2: test accuracy per round, one line per center, the reference level marked.

  Round 0 is the reference model before FL (from ``before``). The reference
  level is the reference model's accuracy on its own center: the level the
  external centers would reach if the model transferred perfectly.
  """
  series: dict[str, list[tuple[int, float]]] = {}
  for row in history:
    if row.get('stage') == stage and row.get('accuracy') is not None:
      series.setdefault(row['center'], []).append((row['round'], row['accuracy']))
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
  for center, points in series.items():
    if before and center in before and before[center].get('accuracy') is not None:
      points = [(0, before[center]['accuracy'])] + points
    points.sort()
    ax.plot([r for r, _ in points], [100 * a for _, a in points], marker='o', markersize=3,
            linewidth=2.2 if center == reference else 1.4, label=center_names.plot(center))
  if reference and before and reference in before:
    level = 100 * before[reference]['accuracy']
    label = f'reference level ({center_names.plot(reference)} before FL, {level:.1f}%)'
    ax.axhline(level, color='0.3', linestyle='--', linewidth=1, label=label)
  ax.set_xlabel('federated round (0 = reference model)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_ylim(0, 102)
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='lower right')
  ax.set_title('Accuracy per round, every center')
  return _save(fig, path)


def _save(fig, path) -> Path:
  """Writes ``fig`` as a PNG at ``path`` (parents created) and frees it."""
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_confusion(confusion, path, title: str, class_names: Sequence[str] = CLASSES) -> Path:
  """A confusion matrix (rows true, columns predicted) with counts in the cells."""
  k = len(class_names)
  fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=110)
  ax.imshow(confusion, cmap='Blues')
  top = max((max(row) for row in confusion), default=0)
  for i in range(k):
    for j in range(k):
      v = confusion[i][j]
      ax.text(j, i, str(v), ha='center', va='center', fontsize=8,
              color='white' if top and v > top / 2 else 'black')
  short = [n[:4] for n in class_names]
  ax.set_xticks(range(k), short)
  ax.set_yticks(range(k), short)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title, fontsize=9)
  return _save(fig, path)


def _confusion_figures(results: dict, figures: Path) -> list[str]:
  """Plots each stored confusion matrix into ``figures``; one markdown section per stage."""
  confusion_md, centers = [], results['centers']
  class_names = results.get('classes', CLASSES)
  for stage, label, heading in (('before', 'reference model', 'Reference model (Table 1)'),
                                ('after', 'after FL', 'After FL (Table 2)')):
    cells = []
    for c in centers:
      matrix = (results.get('confusion') or {}).get(stage, {}).get(c)
      if matrix is None:
        continue
      name = f'confusion_{stage}_{center_names.slug(c)}.png'
      plot_confusion(matrix, figures / name, f'{center_names.plot(c)}: {label}', class_names)
      cells.append(f'![{center_names.md(c)} {label}](figures/{name})')
    if cells:
      confusion_md.append(f'**{heading}**\n\n' + ' '.join(cells))
  return confusion_md


def _last_differs(results: dict) -> bool:
  """Whether Table 2 reports another round than the last (``fl.select``)."""
  chosen = results.get('selection')
  return bool(chosen) and 'after_last' in results and chosen['round'] != chosen['last_round']


def selection_line(selection: dict) -> str:
  """The report's line on which round Table 2 reports (results.json's ``selection``)."""
  chosen, last = selection['round'], selection['last_round']
  if selection['rule'] == 'last':
    return f"- Table 2 reports the last round ({last}; `fl.select='last'`)"
  beside = '; the last round is beside it in the comparison' if chosen != last else ''
  return (f'- Table 2 reports round {chosen} of {last}, the best mean validation accuracy over '
          f"the training centers (`fl.select='val'`, as the baselines pick their epoch){beside}")


def _facts(results: dict) -> list[str]:
  """The bullet lines under the report's title: algorithm, models, privacy, held out."""
  facts = [f'- algorithm: `{results.get("algorithm", "?")}`, rounds: {results.get("rounds", "?")}, '
           f'reference center: {center_names.code(results.get("reference"))}']
  if results.get('eval_model'):
    facts.append(f'- Table 2 evaluates the `{results["eval_model"]}` model')
  if results.get('selection'):
    facts.append(selection_line(results['selection']))
  if 'active_mean' in (results.get('after_models') or {}):
    facts.append('- FedDyn\'s two models: `active_mean` is the plain average of the active '
                 'clients\' models (what the FedDyn paper reports), `server` the corrected server '
                 'model the clients start each round from')
  if results.get('privacy'):
    from fedblood import privacy  # pylint: disable=g-import-not-at-top
    facts += privacy.report_lines(results['privacy'])
  if results.get('held_out'):
    facts.append('- held out (never joined FL or the pooled baseline, evaluated as new centers): '
                 + ', '.join(center_names.code(c) for c in results['held_out']))
  for key, label in (('wall_time_s', 'wall time'),):
    if results.get(key) is not None:
      facts.append(f'- {label}: {results[key]:.0f} s')
  return facts


def write_report(workdir, results: dict | None = None,
                 history: Sequence[dict] | None = None) -> Path:
  """Writes figures/ and report.md for a workdir; returns the report's path.

  Args:
    workdir: the run's directory.
    results: the results dict (default: read ``results.json``).
    history: the per-round rows (default: :func:`fedblood.rundir.workdir.read_rows`).
  """
  workdir = Path(workdir)
  if results is None:
    results = workdir_lib.read_results(workdir)
  if history is None:
    history = workdir_lib.read_rows(workdir)
  centers, reference = results['centers'], results.get('reference')
  figures = workdir_lib.path(workdir, workdir_lib.FIGURES)
  plot_accuracy_per_round(history, figures / 'accuracy_per_round.png', reference, results['before'])
  confusion_md = _confusion_figures(results, figures)
  facts = _facts(results)
  note = ('Metrics in %. Macro means (precision, recall, specificity, F1, balanced accuracy) run '
          'over the classes present in each center\'s test split; absent classes are listed per '
          'center in results.json (`details`).')
  parts = [
      f'# {results.get("title", "fedblood run")}', '', *facts, '', note, '',
      '## Table 1: reference model on every center (before FL)', '',
      center_table(results['before'], centers, reference), '',
      '## Table 2: after federated fine-tuning', '',
      center_table(results['after'], centers, reference, results.get('held_out', ())), '',
  ]
  for name, per_center in (results.get('after_models') or {}).items():
    if per_center is not results['after'] and per_center != results['after']:
      parts += [f'### Table 2 with the `{name}` model', '',
                center_table(per_center, centers, reference, results.get('held_out', ())), '']
  if results.get('after_em'):
    parts += [f'### {EM_TITLE}', '', EM_NOTE, '',
              center_table(results['after_em'], list(results['after_em'])), '']
  parts += ['## Reference model, FL and baselines side by side (accuracy)', '',
            comparison_table(results, 'accuracy'), '',
            '### The same, macro F1', '', comparison_table(results, 'f1'), '',
            '## Accuracy per round', '',
            '![accuracy per round](figures/accuracy_per_round.png)', '']
  if confusion_md:
    parts += ['## Confusion matrices (test splits)', '', '\n\n'.join(confusion_md), '']
  path = workdir_lib.path(workdir, workdir_lib.REPORT)
  path.write_text('\n'.join(parts))
  return path
