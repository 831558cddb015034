"""The privacy-utility table and figure from finished (or stopped) runs' workdirs.

  python -m fedblood.reporting.privacy_report --round 15 --out docs/figures/privacy_utility.png \
      fed_dyn=inf:/runs/fed_dyn_epsinf fed_dyn=8:/runs/fed_dyn_eps8 ...

Each point is ``algorithm=epsilon:workdir``. Accuracy per center is the test-split accuracy
of the round-``--round`` model (default: each run's last logged round) as metrics.jsonl
logs it, so a run stopped after that round counts as one of that many rounds; the achieved
epsilon per center is the row's ``epsilon`` (absent: no DP).
"""

import argparse
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from fedblood.rundir import workdir as workdir_lib


def read_point(workdir, round_index: Optional[int] = None) -> dict:
  """``{'round', 'centers': {center: {'accuracy', 'epsilon'}}}`` of a run's FL rows."""
  rows = [r for r in workdir_lib.read_rows(workdir) if r.get('stage') == 'fl']
  if not rows:
    raise ValueError(f'{workdir}: no FL rounds in metrics.jsonl')
  last = max(r['round'] for r in rows)
  round_index = last if round_index is None else round_index
  if round_index > last:
    raise ValueError(f'{workdir}: round {round_index} asked, only {last} logged')
  picked = [r for r in rows if r['round'] == round_index]
  reference = picked[0]['center']  # rows follow the run's center order: the reference first
  recent = [r['accuracy'] for r in rows
            if round_index - 2 <= r['round'] <= round_index and r['center'] != reference]
  return {'round': round_index, 'external_last3': sum(recent) / len(recent) if recent else None,
          'centers': {r['center']: {'accuracy': r['accuracy'],
                                    'epsilon': r.get('epsilon', math.inf)} for r in picked}}


def eps_label(eps: float) -> str:
  return 'inf' if math.isinf(eps) else f'{eps:g}'


def table(points: Sequence[dict]) -> str:
  """Markdown: one row per (algorithm, target epsilon), accuracy % (achieved epsilon) per center.

  The first center is the reference; the last column averages the external centers over the
  point's last three rounds (single rounds swing by 10+ points early in training).
  """
  centers = list(points[0]['centers'])
  head = ('| Algorithm | target epsilon | ' + ' | '.join(centers)
          + ' | mean, external centers | the same, mean of the last 3 rounds |')
  lines = [head, '|' + '---|' * (len(centers) + 4)]
  for p in points:
    cells = []
    for c in centers:
      v = p['centers'][c]
      eps = '' if math.isinf(v['epsilon']) else f' (ε {v["epsilon"]:.2f})'
      cells.append(f'{100 * v["accuracy"]:.1f}{eps}')
    external = [p['centers'][c]['accuracy'] for c in centers[1:]]
    mean = 100 * sum(external) / len(external) if external else float('nan')
    last3 = p.get('external_last3')
    last3 = f'{100 * last3:.1f}' if last3 is not None else ''
    lines.append(f'| {p["algorithm"]} | {eps_label(p["target"])} | ' + ' | '.join(cells)
                 + f' | {mean:.1f} | {last3} |')
  return '\n'.join(lines)


def plot(points: Sequence[dict], path) -> Path:
  """Accuracy per center against target epsilon (inf at the right), one panel per algorithm."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  algorithms = list(dict.fromkeys(p['algorithm'] for p in points))
  targets = sorted({p['target'] for p in points})
  finite = [t for t in targets if not math.isinf(t)]
  inf_x = (max(finite) * 2) if finite else 1.0
  fig, axes = plt.subplots(1, len(algorithms), figsize=(5 * len(algorithms), 3.8), sharey=True,
                           squeeze=False)
  for ax, alg in zip(axes[0], algorithms):
    mine = sorted((p for p in points if p['algorithm'] == alg), key=lambda p: p['target'])
    xs = [inf_x if math.isinf(p['target']) else p['target'] for p in mine]
    for center in mine[0]['centers']:
      ax.plot(xs, [100 * p['centers'][center]['accuracy'] for p in mine], 'o-', label=center)
    ax.set_xscale('log')
    ax.set_xticks(xs)
    ax.set_xticklabels([eps_label(p['target']) for p in mine])
    ax.set_xlabel('target epsilon per center (delta 1e-5)')
    ax.set_title(f'{alg}, round {mine[0]["round"]}')
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel('test accuracy (%)')
  axes[0][-1].legend(fontsize=8)
  return save(fig, path)


def save(fig, path) -> Path:
  """Writes a matplotlib figure as a PNG at ``path`` (folders made), closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def parse_point(spec: str, round_index: Optional[int]) -> dict:
  try:
    label, workdir = spec.split(':', 1)
    algorithm, target = label.split('=')
    target = math.inf if target == 'inf' else float(target)
  except ValueError as e:
    raise ValueError(f'point {spec!r}: expected algorithm=epsilon:workdir') from e
  return {'algorithm': algorithm, 'target': target, 'workdir': workdir,
          **read_point(workdir, round_index)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('points', nargs='+', help='algorithm=epsilon:workdir')
  parser.add_argument('--round', type=int, default=None)
  parser.add_argument('--out', required=True, help='PNG path of the figure')
  args = parser.parse_args(argv)
  points = [parse_point(s, args.round) for s in args.points]
  print(table(points))
  print(f'figure: {plot(points, args.out)}')
  print(json.dumps(points))


if __name__ == '__main__':
  main()
