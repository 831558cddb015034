r"""``--crop auto`` measured on centers a model never trained on: read whole, at the hand-set
``data.crop``, and at the crop the site chooses on its own images (fedblood/study/scale.py).

Two kinds of unseen center, from finished runs, nothing retrained:
  * ``--study W`` (a --folds study): each fold's reference model (round 0, trained at the
    reference center alone) on every other center;
  * ``--loco L ...`` (leave-one-center-out studies, configs/wbc_loco.py): each fold's Table 2
    model on the center left out of FL (``fl.holdout``).
Every image of the center is read (the model saw none of them). The three readings are compared
on the same images (paired bootstrap interval, McNemar's p), per kind and over all cases.

  python bench/auto_crop.py --study /work/studies/wbc_folds5 \
      --loco /work/studies/loco/fl.holdout=__bccd_,_ --out /tmp/auto_crop.md

Prints one JSON line and writes ``--out`` (markdown).
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np

from fedblood import stats
from fedblood.data import loader
from fedblood.study import inference, scale


def _folds(path: Path) -> list[Path]:
  folds = sorted(path.glob('fold=*'))
  return folds or [path]


def _cases(studies, locos) -> list[tuple[Path, int | None, str, str]]:
  """(workdir, round, center, kind) of every model on a center it never trained on."""
  cases = []
  for study in studies:
    for fold in _folds(Path(study)):
      cfg = inference.load_config(fold)
      names = [n for n, _ in loader.center_specs(cfg.data)]
      cases += [(fold, 0, c, 'reference model') for c in names[1:]]
  for loco in locos:
    for fold in _folds(Path(loco)):
      cfg = inference.load_config(fold)
      cases += [(fold, None, c, 'left out of FL') for c in cfg.fl.holdout]
  return cases


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--study', nargs='*', default=[], help='--folds studies (reference models)')
  parser.add_argument('--loco', nargs='*', default=[], help='leave-one-center-out studies')
  parser.add_argument('--out', required=True, help='markdown file to write')
  args = parser.parse_args()
  cases = _cases(args.study, args.loco)
  if not cases:
    raise SystemExit('bench/auto_crop.py: no case; give --study and/or --loco')
  readings = ('whole', 'data.crop', 'auto')
  rows, pooled = [], {}
  for workdir, round_index, center, kind in cases:
    loaded = inference.load_model(workdir, round_index)
    folder = os.path.join(loaded.config.data.root, center)
    row = {'workdir': str(workdir), 'round': loaded.round, 'center': center, 'kind': kind}
    for reading, crop in zip(readings, (1.0, None, scale.AUTO)):
      images, labels, crop_info = inference.read_folder(loaded, folder, crop)
      probs = inference._probs(loaded, images)  # pylint: disable=protected-access
      correct = probs.argmax(-1) == labels
      row[reading] = {'accuracy': float(correct.mean()), 'crop': crop_info['value']}
      for key in (kind, 'all'):
        pooled.setdefault(key, {}).setdefault(reading, []).append(correct)
    rows.append(row)
    print(json.dumps({'center': center, 'kind': kind, 'workdir': str(workdir),
                      **{r: row[r] for r in readings}}), flush=True)
  lines = ['# `--crop auto` on centers the model never trained on', '',
           'Accuracy % over every image of the center; the crop read at in brackets.', '',
           '| model | center | images | whole (1.0) | data.crop (hand) | auto |',
           '|---|---|---|---|---|---|']
  for i, r in enumerate(rows):
    cells = [f'{100 * r[k]["accuracy"]:.1f} ({r[k]["crop"]:g})' for k in readings]
    lines.append(f'| {r["kind"]}, {Path(r["workdir"]).name} round {r["round"]} | {r["center"]} | '
                 f'{len(pooled["all"]["whole"][i])} | ' + ' | '.join(cells) + ' |')
  lines += ['', '## Paired on the same images (auto against each other reading)', '',
            '| cases | images | auto | other | auto - other [95 %] | only auto / only other | p |',
            '|---|---|---|---|---|---|---|']
  summary = {}
  for key, by in pooled.items():
    auto = np.concatenate(by['auto'])
    for other in ('whole', 'data.crop'):
      b = np.concatenate(by[other])
      p = stats.paired_comparison(auto, b)
      summary[f'{key}: auto - {other}'] = round(100 * float(auto.mean() - b.mean()), 2)
      lines.append(f'| {key}, against {other} | {len(auto)} | {100 * auto.mean():.1f} | '
                   f'{100 * b.mean():.1f} | {100 * p.difference:+.1f} [{100 * p.low:+.1f}, '
                   f'{100 * p.high:+.1f}] | {p.a_only} / {p.b_only} | {p.p_mcnemar:.3g} |')
  Path(args.out).write_text('\n'.join(lines) + '\n')
  print(json.dumps({'cases': len(rows), **summary, 'out': args.out}))


if __name__ == '__main__':
  main()
