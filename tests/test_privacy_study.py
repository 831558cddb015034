"""The privacy-utility study (fedblood.study.privacy_study) on a tiny folds study, end to end:
the choice on validation, the chosen trained on the folds it lacks, the rows and the floor."""

import csv
import json

import numpy as np
import pytest

from fedblood import data
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import privacy_study, seeds, sweep
from study_helpers import smoke_config

pytest.importorskip('dp_accounting')


def _val_at_selected(run):
  chosen = workdir_lib.read_results(run)['selection']['round']
  return np.mean([r['val_accuracy'] for r in workdir_lib.read_rows(run)
                  if r.get('stage') == 'fl' and r['round'] == chosen])


@pytest.mark.slow
def test_each_epsilon_takes_its_best_validation_candidate_and_reports_every_fold(tmp_path):
  config = smoke_config(tmp_path / 'tfds')
  config.fl.rounds = 2
  config.baselines.pooled = False
  base = tmp_path / 'base'
  seeds.run_folds(config, base, 2)  # reference, FL without DP, each center alone
  config.baselines.local_only = False
  config.fl.dp.mode, config.fl.dp.target_epsilon, config.fl.dp.microbatch = 'example', 5.0, 8
  config.fl.batch_size = 8  # sampling rate < 1 at the smallest center's 20 training images
  config.reference.restore = str(base)
  config_file = tmp_path / 'candidates.py'
  config_file.write_text('def get_sweep():\n  return [{"fl.lr": 0.001}, {"fl.lr": 0.2}]\n')
  seeds.run_sweep(config, str(config_file), tmp_path / 'P', folds=2, only_folds='0')

  path = privacy_study.write(tmp_path / 'P', base, [0, 1], run=True)
  points = {n: tmp_path / 'P' / n for n in ('fl.lr=0.001', 'fl.lr=0.2')}
  scores = {n: _val_at_selected(p / 'fold=0') for n, p in points.items()}
  best = max(scores, key=scores.get)
  choices = json.loads((tmp_path / 'P' / 'privacy_study.json').read_text())
  assert [(c['algorithm'], c['epsilon'], c['chosen'], c['on_folds']) for c in choices] == [
      (config.fl.algorithm, 5.0, best, [0])]
  assert choices[0]['val'] == pytest.approx(scores)
  # Only the chosen candidate was trained on fold 1, from fold 1's own reference.
  other = next(n for n in points if n != best)
  assert (points[best] / 'fold=1' / 'results.json').exists()
  assert not (points[other] / 'fold=1' / 'results.json').exists()
  saved = workdir_lib.read_config(points[best] / 'fold=1')
  assert saved['reference']['restore'] == str(base / 'fold=1') and saved['seed'] == config.seed + 1

  rows = {r['model'] + ' ' + r['epsilon']: r
          for r in csv.DictReader((tmp_path / 'P' / 'privacy_study.csv').open())}
  runs = [workdir_lib.read_results(points[best] / f'fold={f}') for f in (0, 1)]
  dp_row = rows[f'{config.fl.algorithm} 5']
  assert dp_row['chosen'] == best
  assert float(dp_row['synth1 mean']) == pytest.approx(np.mean([r['after']['synth1']['accuracy']
                                                                 for r in runs]))
  assert 0 < float(dp_row['epsilon_spent']) <= 5.0 + 1e-6
  assert int(dp_row['external_images']) == sum(r['after'][c]['n'] for r in runs
                                               for c in ('synth1', 'synth2'))
  base_runs = [workdir_lib.read_results(base / f'fold={f}') for f in (0, 1)]
  assert float(rows['reference model alone (Table 1) inf']['synth2 mean']) == pytest.approx(
      np.mean([r['before']['synth2']['accuracy'] for r in base_runs]))
  assert float(rows[f'{config.fl.algorithm} inf']['external_mean']) == pytest.approx(np.mean(
      [np.mean([r['after'][c]['accuracy'] for c in ('synth1', 'synth2')]) for r in base_runs]))
  # The floor: always the most common training class of the fold's federation.
  floor = rows['constant: the most common training class inf']
  accs = []
  for f in (0, 1):
    centers = data.load_centers(sweep.apply(config, {'data.folds': 2, 'data.fold': f}).data)
    label = np.bincount(np.concatenate([c.train.labels for c in centers]), minlength=5).argmax()
    accs.append(np.mean([np.mean(c.test.labels == label) for c in centers[1:]]))
  assert float(floor['external_mean']) == pytest.approx(np.mean(accs))
  text = path.read_text()
  assert f'| `{best}` (' in text and 'vs each center alone' in text
  assert (tmp_path / 'P' / 'figures' / 'privacy_utility.png').stat().st_size > 5000
