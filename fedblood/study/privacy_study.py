"""The privacy-utility table: each (algorithm, epsilon) at its candidate chosen on validation.

  python -m fedblood.study.privacy_study --sweep P --base W --folds 0-2 [--run] [--out DIR]

``P`` is a ``--sweep --folds K`` of DP candidates (configs/wbc_privacy.py), ``W`` the
``--folds K`` study they restore their references from (configs/wbc.py: the reference, FedDyn
without DP, every center alone). Per (algorithm, epsilon), the candidate whose Table 2 round
(``fl.select``) has the best mean validation accuracy over the centers, averaged over the folds
every candidate of that group ran, is chosen; test images play no part in it. ``--run`` trains
the chosen candidates on the ``--folds`` they lack (resumable, as ``--only_folds``). The table
(``privacy_study.md`` / ``.csv``) and the figure then report the chosen candidates over
``--folds``, with W's rows on the same folds and a constant predictor as the floor.
"""

import argparse
import csv
import io
import json
import math
from pathlib import Path
import sys

import numpy as np

from fedblood import data, stats
from fedblood.reporting import aggregate, per_image, privacy_report
from fedblood.reporting.privacy_report import eps_label
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import inference, seeds

INF = math.inf
ALONE = {'local_only': 'each center alone', 'local_only_scratch': 'each center alone, from scratch',
         'local_only_reference': 'each center alone, from the reference'}


def _epsilon(config) -> float:
  dp = config['fl'].get('dp') or {}
  return INF if dp.get('mode', 'off') == 'off' else float(dp.get('target_epsilon') or 0.0)


def _runs(point: Path) -> dict:
  """``{fold: workdir}`` of a point's finished folds."""
  out = {}
  for d in sorted(point.glob('fold=*')):
    config = workdir_lib.read_config(d)
    if config and workdir_lib.path(d, workdir_lib.RESULTS).exists():
      out[int(config['data']['fold'])] = d
  return out


def val_score(run: Path) -> float:
  """The mean over centers of the validation accuracy at the round Table 2 reports."""
  chosen = workdir_lib.read_results(run)['selection']['round']
  vals = [r['val_accuracy'] for r in workdir_lib.read_rows(run)
          if r.get('stage') == 'fl' and r.get('round') == chosen and 'val_accuracy' in r
          and not r.get('held_out')]
  if not vals:
    raise ValueError(f'{run}: no validation accuracy at round {chosen} in metrics.jsonl')
  return float(np.mean(vals))


def candidates(sweep_dir: Path) -> dict:
  """``{(algorithm, epsilon): [{'name', 'dir', 'runs'}]}`` of the sweep's points."""
  groups = {}
  for point in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
    runs = _runs(point)
    if not runs:
      continue
    config = workdir_lib.read_config(next(iter(runs.values())))
    key = (config['fl']['algorithm'], _epsilon(config))
    groups.setdefault(key, []).append({'name': point.name, 'dir': point, 'runs': runs})
  if not groups:
    raise FileNotFoundError(f'--sweep {sweep_dir}: no point with a finished fold')
  return groups


def choose(group: list) -> tuple[dict, list, dict]:
  """The candidate with the best mean validation score over the folds all of them ran."""
  shared = sorted(set.intersection(*(set(c['runs']) for c in group)))
  if not shared:
    raise ValueError(f'candidates {[c["name"] for c in group]} share no finished fold')
  scores = {c['name']: float(np.mean([val_score(c['runs'][f]) for f in shared])) for c in group}
  best = max(group, key=lambda c: scores[c['name']])  # the first of equals, in name order
  return best, shared, scores


def run_missing(point: dict, base: Path, folds: int, wanted: list) -> None:
  """Trains ``point`` on the ``wanted`` folds it lacks, each from W's own fold reference."""
  missing = [f for f in wanted if f not in point['runs']]
  if not missing:
    return
  fold, run = next(iter(point['runs'].items()))
  config = inference.load_config(run)
  config.seed = int(config.seed) - fold  # fold f ran seed + f
  config.reference.restore = str(base)
  seeds.run_folds(config, point['dir'], folds, sorted(set(point['runs']) | set(missing)))
  point['runs'] = _runs(point['dir'])


def floor(base_runs: list) -> list:
  """Per fold, the test accuracy per center of always answering the federation's most common
  training class (counted on every center's training split of that fold)."""
  out = []
  for run in base_runs:
    centers = data.load_centers(inference.load_config(run).data)
    counts = np.bincount(np.concatenate([c.train.labels for c in centers]), minlength=5)
    label = int(counts.argmax())
    out.append({c.name: {'accuracy': float(np.mean(c.test.labels == label)),
                         'correct': c.test.labels == label} for c in centers})
  return out


def _row(model: str, eps: float, results: list, table: str, **extra) -> dict:
  """Per-center test accuracy per fold, and the external centers' per-image correctness."""
  centers, reference = results[0]['centers'], results[0]['reference']
  source = lambda r: r[table] if table in ('before', 'after') else r['baselines'][table]
  accuracy = {c: [source(r)[c]['accuracy'] for r in results] for c in centers}
  correct = per_image.correctness(results).get(table, {})
  external = [c for c in centers if c != reference]
  return {'model': model, 'epsilon': eps, 'accuracy': accuracy, 'external': external,
          'images': np.concatenate([correct[c] for c in external]), **extra}


def _floor_row(per_fold: list, external: list) -> dict:
  return {'model': 'constant: the most common training class', 'epsilon': INF,
          'accuracy': {c: [f[c]['accuracy'] for f in per_fold] for c in per_fold[0]},
          'external': external,
          'images': np.concatenate([f[c]['correct'] for f in per_fold for c in external])}


def _spent(run: Path) -> float:
  """The largest epsilon any center spent over the whole run (its last round)."""
  rows = [r for r in workdir_lib.read_rows(run) if r.get('stage') == 'fl' and 'epsilon' in r]
  last = max((r['round'] for r in rows), default=None)
  return max((r['epsilon'] for r in rows if r['round'] == last), default=INF)


def rows(sweep_dir, base, folds: list, run: bool = False) -> tuple[list, list]:
  """The table's rows (W's and the chosen candidates') over ``folds``; the choices made."""
  base = Path(base)
  base_runs = [seeds.fold_dir(base, f) for f in folds]
  base_results = [workdir_lib.read_results(d) for d in base_runs]
  k = int(workdir_lib.read_config(base_runs[0])['data']['folds'])
  external = [c for c in base_results[0]['centers'] if c != base_results[0]['reference']]
  out = [_floor_row(floor(base_runs), external),
         _row('reference model alone (Table 1)', INF, base_results, 'before'),
         *(_row(ALONE[key], INF, base_results, key) for key in ALONE
           if key in base_results[0].get('baselines', {}))]
  if len(out) == 2:
    raise ValueError(f'--base {base}: no local-only baseline (baselines.local_only=False): '
                     'the table compares with each center alone')
  fl = [_row(base_results[0]['algorithm'], INF, base_results, 'after', fl=True,
             chosen='(the base study: no DP)')]
  choices = []
  groups = candidates(sweep_dir)
  for algorithm, eps in sorted(groups, key=lambda key: (key[0], -key[1])):
    group = groups[(algorithm, eps)]
    best, shared, scores = choose(group)
    choices.append({'algorithm': algorithm, 'epsilon': eps, 'chosen': best['name'],
                    'on_folds': shared, 'val': scores})
    if run:
      run_missing(best, base, k, folds)
    lacking = [f for f in folds if f not in best['runs']]
    if lacking:
      print(f'{algorithm} epsilon {eps:g}: {best["name"]} lacks folds {lacking} (--run trains '
            'them)')
      continue
    results = [workdir_lib.read_results(best['runs'][f]) for f in folds]
    fl.append(_row(algorithm, eps, results, 'after', fl=True, chosen=best['name'],
                   val=scores[best['name']], spent=max(_spent(best['runs'][f]) for f in folds)))
  return out + sorted(fl, key=lambda r: (r['model'], -r['epsilon'])), choices


def _external_mean(row: dict) -> list:
  """Per fold, the mean accuracy over the external centers."""
  return [float(np.mean(v)) for v in zip(*(row['accuracy'][c] for c in row['external']))]


def _short(point: str) -> str:
  """A point's name without the fields its row already shows (algorithm, epsilon)."""
  shown = ('fl.algorithm=', 'fl.dp.target_epsilon=')
  return ', '.join(f'`{p}`' for p in point.split(',') if not p.startswith(shown)) or point


def table(out_rows: list) -> tuple[str, str]:
  """(markdown, csv): accuracy %, mean ± sd over folds; every external image with its 95 %
  interval; FL rows paired against the better 'each center alone' row on the same images."""
  alone = max((r for r in out_rows if r['model'].startswith('each center alone')),
              key=lambda r: r['images'].mean())
  centers = list(out_rows[0]['accuracy'])
  head = ['model', 'epsilon', 'epsilon spent', *centers, 'external mean',
          'every external image [95 %]', f'vs {alone["model"]} [95 %]', 'chosen on validation']
  md = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(['model', 'epsilon', 'epsilon_spent', *(f'{c} {m}' for c in centers
                                                          for m in ('mean', 'sd')),
                   'external_mean', 'external_sd', 'external_images', 'external_correct',
                   'vs_alone', 'vs_alone_low', 'vs_alone_high', 'chosen', 'val'])
  for r in out_rows:
    cells = [aggregate.stats(r['accuracy'][c]) for c in centers]
    ext = aggregate.stats(_external_mean(r))
    a = r['images']
    low, high = stats.accuracy_interval(int(a.sum()), len(a))
    vs = None
    if r.get('fl'):
      vs = stats.paired_comparison(a, alone['images'])
    spent = f'{r["spent"]:.2f}' if 'spent' in r else ''
    md.append('| ' + ' | '.join([
        r['model'], eps_label(r['epsilon']), spent, *(aggregate.cell(s, False) for s in cells),
        aggregate.cell(ext, False), f'{100 * a.mean():.1f} [{100 * low:.1f}, {100 * high:.1f}]',
        '' if vs is None else f'{vs.points} {vs.verdict}',
        (f'{_short(r["chosen"])} ({100 * r["val"]:.1f})' if 'val' in r else r.get('chosen', ''))])
              + ' |')
    writer.writerow([r['model'], eps_label(r['epsilon']), r.get('spent', ''),
                     *(s[m] for s in cells for m in ('mean', 'sd')), ext['mean'], ext['sd'],
                     len(a), int(a.sum()), *((vs.difference, vs.low, vs.high) if vs else
                                             ('', '', '')), r.get('chosen', ''), r.get('val', '')])
  return '\n'.join(md) + '\n', buf.getvalue()


def plot(out_rows: list, path) -> Path:
  """External mean (± sd over folds) against epsilon per algorithm; W's rows as lines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fl = [r for r in out_rows if r.get('fl')]
  finite = sorted({r['epsilon'] for r in fl if not math.isinf(r['epsilon'])}) or [1.0]
  inf_x = max(finite) * 2.5
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for algorithm in dict.fromkeys(r['model'] for r in fl):
    mine = sorted((r for r in fl if r['model'] == algorithm), key=lambda r: r['epsilon'])
    xs = [inf_x if math.isinf(r['epsilon']) else r['epsilon'] for r in mine]
    s = [aggregate.stats(_external_mean(r)) for r in mine]
    ax.errorbar(xs, [100 * x['mean'] for x in s], [100 * (x['sd'] or 0) for x in s],
                marker='o', capsize=3, label=algorithm)
  for r, style in zip([r for r in out_rows if not r.get('fl')], (':', '--', '-.', '-.')):
    ax.axhline(100 * np.mean(_external_mean(r)), ls=style, lw=1, color='gray')
    ax.text(finite[0], 100 * np.mean(_external_mean(r)) + 0.5, r['model'], fontsize=7,
            color='dimgray')
  ax.set_xscale('log')
  ax.set_xticks(finite + [inf_x])
  ax.set_xticklabels([eps_label(e) for e in finite] + ['inf'])
  ax.set_xlabel('epsilon per center (one image, delta 1e-5)')
  ax.set_ylabel('test accuracy, mean of the external centers (%)')
  ax.legend(fontsize=8, loc='lower right')
  ax.grid(alpha=0.3)
  return privacy_report.save(fig, path)


def write(sweep_dir, base, folds: list, out=None, run: bool = False) -> Path:
  """Writes ``privacy_study.md`` / ``.csv`` / ``.json`` and the figure into ``out`` (default:
  the sweep's folder); returns the markdown's path."""
  out = Path(out or sweep_dir)
  out_rows, choices = rows(sweep_dir, base, folds, run)
  md, text = table(out_rows)
  figure = plot(out_rows, workdir_lib.path(out, workdir_lib.FIGURES) / 'privacy_utility.png')
  head = (f'# Privacy-utility: test accuracy (%), mean ± sd over folds {folds}\n\n'
          'Each DP row is its (algorithm, epsilon)\'s candidate with the best mean validation '
          'accuracy (in brackets); the other rows are the base study\'s models on the same '
          'folds.\n\n')
  (out / 'privacy_study.md').write_text(
      head + md + f'\n![privacy-utility]({figure.relative_to(out)})\n')
  (out / 'privacy_study.csv').write_text(text)
  (out / 'privacy_study.json').write_text(json.dumps(choices, indent=1))
  return out / 'privacy_study.md'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sweep', required=True, help='the --sweep --folds study of DP candidates')
  parser.add_argument('--base', required=True, help='the --folds study they restore from')
  parser.add_argument('--folds', default='0-2', help="the folds reported ('0-2', '0,3')")
  parser.add_argument('--run', action='store_true', help='train the chosen on the folds they lack')
  parser.add_argument('--out', default=None, help='folder of the table (default: --sweep)')
  args = parser.parse_args(argv)
  print(write(args.sweep, args.base, seeds.parse_seeds(args.folds, '--folds'), args.out, args.run))


if __name__ == '__main__':
  main(sys.argv[1:])
