"""fedblood.reporting.loco_table: the centers that never joined, over the folds, on known inputs."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedblood import stats
from fedblood.reporting import loco_table

LABELS = {0: [0, 1, 2, 3], 1: [4, 4, 0, 1, 2]}  # the left-out center's test images per fold


def _run(d: Path, held, preds: dict) -> str:
  """A fold's workdir as a run leaves it: ``preds`` {table: predictions} on center 'b'."""
  d.mkdir(parents=True)
  labels = LABELS[int(d.name.split('=')[1])]
  details = {t: {'b': {'predictions': p, 'labels': labels}, 'a': {'predictions': [0],
                                                                   'labels': [0]}}
             for t, p in preds.items()}
  (d / 'results.json').write_text(json.dumps({'centers': ['a', 'b'], 'reference': 'a',
                                              'held_out': held, 'details': details}))
  return str(d)


def _study(d: Path, held, preds_per_fold: dict) -> Path:
  dirs = [_run(d / f'fold={i}', held, p) for i, p in preds_per_fold.items()]
  (d / 'folds_summary.json').write_text(json.dumps({'folds': list(preds_per_fold),
                                                    'workdirs': dirs}))
  return d


def test_left_out_center_per_fold_over_its_images_and_paired(tmp_path):
  right = {i: list(v) for i, v in LABELS.items()}
  wrong = {i: [(x + 1) % 5 for x in v] for i, v in LABELS.items()}
  # Study A (a sweep of one point): FL right on 3 of 4 then 5 of 5 images, the reference alone
  # on 1 of 4 then 2 of 5, the pooled model without 'b' on every image.
  fl_a = {0: right[0][:3] + wrong[0][3:], 1: right[1]}
  ref_a = {0: right[0][:1] + wrong[0][1:], 1: right[1][:2] + wrong[1][2:]}
  _study(tmp_path / 'A' / 'fl.holdout=b', ['b'], {
      i: {'before': ref_a[i], 'after': fl_a[i], 'pooled_scratch': right[i]} for i in (0, 1)})
  # Study B, apart, ran fold 1 only: FL right on 1 of 5 images; no pooled model.
  fl_b = right[1][:1] + wrong[1][1:]
  _study(tmp_path / 'B', ['b'], {1: {'before': right[1], 'after': fl_b}})
  path = loco_table.write(tmp_path / 'out', {'a': tmp_path / 'A', 'b': tmp_path / 'B'})
  rows = list(csv.DictReader((tmp_path / 'out' / 'loco_folds.csv').open()))
  get = lambda row, q: next(r for r in rows if r['row'] == row and r['quantity'] == q)
  # Compared over the fold both ran (fold 1): every row on the same 5 images.
  fl = get('a', 'FL')
  assert fl['folds'] == '1' and fl['images'] == '5' and fl['correct'] == '5'
  assert float(fl['value']) == 1.0
  assert (float(fl['low']), float(fl['high'])) == pytest.approx(stats.accuracy_interval(5, 5))
  ref = get('a', 'reference alone')
  assert float(ref['value']) == pytest.approx(0.4) and ref['correct'] == '2'
  paired = get('a', 'FL − reference alone')
  expect = stats.paired_comparison(np.ones(5, bool), np.array([1, 1, 0, 0, 0], bool))
  assert float(paired['value']) == pytest.approx(0.6) and float(paired['low']) == expect.low
  assert float(paired['p_mcnemar']) == pytest.approx(expect.p_mcnemar)  # 3 discordant: 0.25
  assert float(get('a', 'FL − pooled from scratch without it')['value']) == 0.0
  assert float(get('b', "FL − first row's FL")['value']) == pytest.approx(0.2 - 1.0)
  # B trained no pooled model: none of its own, its FL paired with the first row's (all right)
  assert not any(r['row'] == 'b' and r['quantity'] in ('pooled from scratch without it',
                                                       'FL − pooled from scratch without it')
                 for r in rows)
  borrowed = get('b', "FL − first row's pooled from scratch without it")
  assert float(borrowed['value']) == pytest.approx(0.2 - 1.0) and borrowed['images'] == '5'
  assert not any(r['row'] == 'a' and r['quantity'].startswith("FL − first row's") for r in rows)
  text = path.read_text()
  assert '| b | 5 | a (folds 1) | 40.0: 40.0 [' in text and '| yes |' in text and '| no |' in text
  # Alone, study A is compared over both its folds: per fold, then over the 9 images.
  loco_table.write(tmp_path / 'alone', {'a': tmp_path / 'A'})
  alone = list(csv.DictReader((tmp_path / 'alone' / 'loco_folds.csv').open()))
  fl = next(r for r in alone if r['quantity'] == 'FL')
  assert fl['per_fold'] == '0.75;1.0' and fl['images'] == '9' and fl['correct'] == '8'
  assert '75.0 / 100.0: 88.9 [' in (tmp_path / 'alone' / 'loco_folds.md').read_text()


def test_loco_table_refuses_other_images_and_unfinished_studies(tmp_path):
  _study(tmp_path / 'A', ['b'], {1: {'after': LABELS[1]}})
  other = _study(tmp_path / 'B', ['b'], {1: {'after': LABELS[1]}})
  results = json.loads((other / 'fold=1' / 'results.json').read_text())
  results['details']['after']['b']['labels'] = [4, 4, 0, 1, 3]  # another split's images
  (other / 'fold=1' / 'results.json').write_text(json.dumps(results))
  with pytest.raises(ValueError, match=r'left-out b, fold 1: B tested other images than A'):
    loco_table.write(tmp_path / 'out', {'A': tmp_path / 'A', 'B': other})
  _study(tmp_path / 'C', ['b'], {0: {'after': LABELS[0]}})
  with pytest.raises(ValueError, match='A, C share no fold'):
    loco_table.write(tmp_path / 'out', {'A': tmp_path / 'A', 'C': tmp_path / 'C'})
  with pytest.raises(FileNotFoundError, match='not a finished --folds study'):
    loco_table.write(tmp_path / 'out', {'x': tmp_path / 'out'})
  _study(tmp_path / 'D', [], {1: {'after': LABELS[1]}})  # no center left out: no table
  assert loco_table.write(tmp_path / 'none', {'D': tmp_path / 'D'}) is None
  with pytest.raises(SystemExit, match='left a center out'):
    loco_table.main([str(tmp_path / 'none'), f'D={tmp_path / "D"}'])
  assert not (tmp_path / 'none').exists()
