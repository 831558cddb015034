"""A sweep's one table: ``sweep_summary.md`` / ``.csv``, every point's headline numbers."""

import csv
import io
from pathlib import Path
from typing import Sequence

from fedblood.reporting.report import mean, pct


def headline(results: dict) -> dict:
  """The few numbers a sweep table shows for one run."""
  centers, reference = results['centers'], results.get('reference')
  external = [c for c in centers if c != reference] or list(centers)
  out = {}
  for stage in ('before', 'after'):
    per = results[stage]
    out[f'{stage}_acc_external'] = mean(per[c]['accuracy'] for c in external)
    out[f'{stage}_f1_external'] = mean(per[c]['f1'] for c in external)
    if reference in per:
      out[f'{stage}_acc_reference'] = per[reference]['accuracy']
  out['after_acc_all'] = mean(results['after'][c]['accuracy'] for c in centers)
  if 'after_last' in results:
    out['last_acc_external'] = mean(results['after_last'][c]['accuracy'] for c in external)
  if results.get('selection'):
    out['fl_round'] = results['selection']['round']
  for name, per in (results.get('baselines') or {}).items():
    out[f'{name}_acc_external'] = mean(per[c]['accuracy'] for c in external if c in per)
  return out


def write_sweep_summary(points: Sequence[dict], directory) -> tuple[Path, Path]:
  """Writes ``sweep_summary.md`` and ``sweep_summary.csv`` of every sweep point.

  Args:
    points: dicts with ``name`` (sub-workdir), ``overrides`` (flat dict) and
      ``results`` (that point's results dict, or None if it has not finished).
    directory: the sweep's parent workdir.
  """
  directory = Path(directory)
  override_keys = sorted({k for p in points for k in p['overrides']})
  heads = [headline(p['results']) if p.get('results') else {} for p in points]
  metric_keys = []
  for h in heads:
    metric_keys += [k for k in h if k not in metric_keys]
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(['name', *override_keys, *metric_keys])
  md = ['| run | ' + ' | '.join(override_keys + metric_keys) + ' |',
        '|' + '---|' * (1 + len(override_keys) + len(metric_keys))]
  for p, h in zip(points, heads):
    over = [p['overrides'].get(k, '') for k in override_keys]
    writer.writerow([p['name'], *over,
                     *('' if h.get(k) is None else f'{h[k]:.6f}' for k in metric_keys)])
    status = '' if p.get('results') else ' (not finished)'
    md.append(f'| {p["name"]}{status} | ' + ' | '.join(str(v) for v in over) + ' | ' +
              ' | '.join(pct(h.get(k)) for k in metric_keys) + ' |')
  csv_path, md_path = directory / 'sweep_summary.csv', directory / 'sweep_summary.md'
  csv_path.write_text(buf.getvalue())
  md_path.write_text('# Sweep summary (metrics in %)\n\n' + '\n'.join(md) + '\n')
  return md_path, csv_path

