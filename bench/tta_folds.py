r"""Test-time averaging (``model.tta``) measured after the fact on a finished --folds study.

Each fold's Table 2 model (the round ``fl.select`` chose) is evaluated again, on every center's
validation and test split, without and with the averaging over the 8 flips and quarter turns;
nothing is retrained (a study with ``model.tta=True`` would also pick its epochs and rounds with
it). Over the folds every test image is tested once, so the test columns pool every image of a
center, and TTA is compared with the plain model on the same images (paired bootstrap interval,
McNemar's p). Validation decides: the option is worth keeping only where the validation mean
rises.

  python bench/tta_folds.py --workdir /work/studies/wbc_folds5 [--folds 0,1,2]

Prints one JSON line and writes ``<workdir>/tta_folds.md``.
"""

import argparse
import json
from pathlib import Path

import ml_collections
import numpy as np

from fedblood import data, stats
from fedblood.study import experiment, inference


def _correct(exp, params, split) -> np.ndarray:
  m = exp.evaluate(*exp.split(params), split)
  return np.asarray(m['predictions']) == np.asarray(m['labels'])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a finished --folds study')
  parser.add_argument('--folds', default=None, help='comma-separated folds (default: all)')
  args = parser.parse_args()
  root = Path(args.workdir)
  folds = sorted(root.glob('fold=*')) if args.folds is None else [
      root / f'fold={f}' for f in args.folds.split(',')]
  pooled = {}  # (split, center) -> ([plain correct], [tta correct])
  rounds = []
  for fold in folds:
    loaded = inference.load_model(fold)
    rounds.append(loaded.round)
    averaged = ml_collections.ConfigDict(loaded.config.to_dict())
    averaged.model.tta = True
    tta = experiment.build(averaged)
    for center in data.load_centers(loaded.config.data):
      for split in ('val', 'test'):
        s = getattr(center, split)
        if not len(s.labels):
          continue
        plain, with_tta = pooled.setdefault((split, center.name), ([], []))
        plain.append(_correct(loaded.experiment, loaded.params, s))
        with_tta.append(_correct(tta, loaded.params, s))
  names = sorted({c for _, c in pooled}, key=lambda c: (c != loaded.config.data.reference, c))
  out = {'folds': [f.name for f in folds], 'rounds': rounds, 'centers': {}}
  lines = [f'# Test-time averaging on {root} ({len(folds)} folds, Table 2 rounds {rounds})', '',
           '| center | split | images | plain | TTA | TTA - plain [95 %] | p |',
           '|---|---|---|---|---|---|---|']
  for split in ('val', 'test'):
    for group in names + ['external']:
      members = [c for c in names if c != names[0]] if group == 'external' else [group]
      if not all((split, c) in pooled for c in members):
        continue
      a = np.concatenate([x for c in members for x in pooled[(split, c)][1]])
      b = np.concatenate([x for c in members for x in pooled[(split, c)][0]])
      p = stats.paired_comparison(a, b)
      out['centers'].setdefault(group, {})[split] = p._asdict()
      lines.append(f'| {group} | {split} | {p.n} | {100 * p.accuracy_b:.1f} | '
                   f'{100 * p.accuracy_a:.1f} | {100 * p.difference:+.1f} [{100 * p.low:+.1f}, '
                   f'{100 * p.high:+.1f}] | {p.p_mcnemar:.3g} |')
  (root / 'tta_folds.md').write_text('\n'.join(lines) + '\n')
  print(json.dumps(out))


if __name__ == '__main__':
  main()
