"""Seed sweeps: --seeds parsing, the aggregate of known inputs (exact), a vectorized 2-seed smoke."""

import csv
import json
import logging
from pathlib import Path
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from fedblood import data
from fedblood.reporting import aggregate, sweep_table
from fedblood.rundir import checkpoint
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import seeds, sweep
from study_helpers import fl_state, smoke_config

REPO = Path(__file__).resolve().parents[1]


def test_parse_seeds():
  assert seeds.parse_seeds('0-4') == [0, 1, 2, 3, 4]
  assert seeds.parse_seeds('3') == [3]
  assert seeds.parse_seeds('0-2, 9') == [0, 1, 2, 9]
  for bad, match in (('4-1', 'runs backwards'), ('1,1', r'seeds \[1\] appear twice'),
                     ('a', "expected e.g. '0-4'"), ('', "expected e.g. '0-4'"),
                     ('-1', "expected e.g. '0-4'")):
    with pytest.raises(ValueError, match=match):
      seeds.parse_seeds(bad)


def test_fold_ids_are_every_fold_or_those_named_among_them():
  assert seeds.fold_ids(5) == [0, 1, 2, 3, 4]
  assert seeds.fold_ids(5, '0-2') == [0, 1, 2] and seeds.fold_ids(5, '4,1') == [1, 4]
  assert seeds.fold_ids(3, [2]) == [2]
  with pytest.raises(ValueError, match=r"--only_folds '2-5': folds \[5\] do not exist in --folds 5"):
    seeds.fold_ids(5, '2-5')
  with pytest.raises(ValueError, match=r"--only_folds '1,1': seeds \[1\] appear twice"):
    seeds.fold_ids(5, '1,1')
  with pytest.raises(ValueError, match='expected a number of folds'):
    seeds.fold_ids(1, '0')


def _summary(acc, n=4):
  return {'n': n, **{k: acc for k in aggregate.METRICS}}


def _seed_run(root: Path, seed: int, accs: dict, after_accs: dict, history: list) -> Path:
  """A seed's workdir as the pipeline leaves it: results.json and metrics.jsonl."""
  d = root / f'seed={seed}'
  d.mkdir(parents=True)
  results = {'title': 't', 'centers': ['a', 'b', 'c'], 'reference': 'a', 'algorithm': 'fed_dyn',
             'rounds': 2, 'before': {c: _summary(v) for c, v in accs.items()},
             'after': {c: _summary(v) for c, v in after_accs.items()},
             'after_models': {'server': {c: _summary(v) for c, v in after_accs.items()},
                              'active_mean': {c: _summary(0.25) for c in accs}},
             'baselines': {'pooled': {c: _summary(0.5) for c in accs}}}
  (d / 'results.json').write_text(json.dumps(results))
  (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in history))
  return d


def test_aggregate_of_known_inputs_is_exact(tmp_path):
  # Values exact in binary: means and sample sds below are exact floats.
  befores = [{'a': 1.0, 'b': 0.25, 'c': 0.5}, {'a': 1.0, 'b': 0.5, 'c': 0.5},
             {'a': 1.0, 'b': 0.75, 'c': 0.5}]
  afters = [{'a': 0.75, 'b': 0.5, 'c': 0.0}, {'a': 0.75, 'b': 0.5, 'c': 0.5},
            {'a': 0.75, 'b': 0.5, 'c': 1.0}]
  dirs = []
  for s, (before, after) in enumerate(zip(befores, afters)):
    history = [{'stage': 'reference', 'epoch': 1, 'accuracy': 0.1}]
    history += [{'stage': 'fl', 'round': r, 'center': c, 'accuracy': after[c] * r / 2}
                for r in (1, 2) for c in after]
    dirs.append(_seed_run(tmp_path, s, before, after, history))
  path = aggregate.write(tmp_path, [0, 1, 2], dirs)
  out = json.loads((tmp_path / 'seeds_summary.json').read_text())
  assert out['seeds'] == [0, 1, 2] and out['centers'] == ['a', 'b', 'c']
  t = out['tables']
  assert sorted(t) == ['after', 'after_models/active_mean', 'after_models/server',
                       'baselines/pooled', 'before']
  assert t['after_models/server'] == t['after']
  b = t['before']['b']['accuracy']
  assert (b['mean'], b['sd'], b['min'], b['max'], b['values']) == (0.5, 0.25, 0.25, 0.75,
                                                                   [0.25, 0.5, 0.75])
  assert t['before']['a']['f1'] == {'mean': 1.0, 'sd': 0.0, 'min': 1.0, 'max': 1.0,
                                    'values': [1.0, 1.0, 1.0]}
  c = t['after']['c']['accuracy']
  assert (c['mean'], c['sd'], c['min']) == (0.5, 0.5, 0.0)
  # Mean rows: per seed over centers first (external b, c: 0.25, 0.5, 0.75), then over seeds.
  ext = t['after']['mean, external centers']['accuracy']
  assert ext['values'] == [0.25, 0.5, 0.75] and (ext['mean'], ext['sd']) == (0.5, 0.25)
  assert t['after']['mean, external centers']['n']['values'] == [8, 8, 8]
  assert t['before']['mean, all centers']['accuracy']['values'] == [0.5833333333333334,
                                                                     2 / 3, 0.75]
  # Per round: round 0 is the reference model (before), then the FL rows.
  rounds = out['accuracy_per_round']['c']
  assert rounds['round'] == [0, 1, 2]
  assert rounds['mean'] == [0.5, 0.25, 0.5] and rounds['sd'] == [0.0, 0.25, 0.5]
  assert rounds['min'] == [0.5, 0.0, 0.0]

  rows = list(csv.DictReader((tmp_path / 'seeds_summary.csv').open()))
  row = next(r for r in rows if (r['table'], r['row'], r['metric']) == ('before', 'b', 'accuracy'))
  assert (row['mean'], row['sd'], row['min'], row['max'], row['seeds'], row['values']) == (
      '0.5', '0.25', '0.25', '0.75', '3', '0.25;0.5;0.75')
  assert len(rows) == 5 * 5 * 7  # tables x (3 centers + 2 means) x (6 metrics + n)

  md = path.read_text()
  assert path.name == 'seeds_report.md'
  assert '| b | 4 | 50.0 ± 25.0 (min 25.0) |' in md
  assert '| *mean, external centers* | 8 | 50.0 ± 25.0 (min 25.0) |' in md
  assert '## Baseline: Pooled (centralized)' in md
  # As report.md: another FL model's table only where it differs from Table 2.
  assert '`active_mean` model' in md and '`server` model' not in md
  # Side by side: reference model, the FL models (server, active_mean), pooled, as mean ± sd.
  assert '| c | 50.0 ± 0.0 | 50.0 ± 50.0 | 25.0 ± 0.0 | 50.0 ± 0.0 |' in md
  assert '![accuracy per round](figures/accuracy_per_round_seeds.png)' in md
  with Image.open(tmp_path / 'figures' / 'accuracy_per_round_seeds.png') as image:
    assert image.format == 'PNG' and image.size[0] > 300


def test_aggregate_has_the_held_out_centers_em_table(tmp_path):
  dirs = []
  for s, em in enumerate((0.5, 0.75)):
    d = _seed_run(tmp_path, s, {'a': 1.0, 'b': 0.5, 'c': 0.25}, {'a': 1.0, 'b': 0.5, 'c': 0.25},
                  [])
    results = json.loads((d / 'results.json').read_text())
    results.update(held_out=['c'], after_em={'c': _summary(em)})
    (d / 'results.json').write_text(json.dumps(results))
    dirs.append(d)
  path = aggregate.write(tmp_path, [0, 1], dirs)
  t = json.loads((tmp_path / 'seeds_summary.json').read_text())['tables']['after_em']
  assert list(t) == ['c', 'mean, all centers']
  assert t['c']['accuracy']['values'] == [0.5, 0.75] and t['c']['accuracy']['mean'] == 0.625
  md = path.read_text()
  assert '## FL, held out: class priors re-estimated (EM)' in md
  assert '| c | 4 | 62.5 ± 17.7 (min 50.0) |' in md


def test_aggregate_needs_every_seed_finished_and_one_seed_has_no_sd(tmp_path):
  d = _seed_run(tmp_path, 0, {'a': 1.0, 'b': 0.5, 'c': 0.5}, {'a': 1.0, 'b': 0.5, 'c': 0.5}, [])
  with pytest.raises(FileNotFoundError, match=r'seed=1[/\\]results.json is missing'):
    aggregate.write(tmp_path, [0, 1], [d, tmp_path / 'seed=1'])
  aggregate.write(tmp_path, [0], [d])
  s = json.loads((tmp_path / 'seeds_summary.json').read_text())['tables']['after']['b']['accuracy']
  assert s == {'mean': 0.5, 'sd': None, 'min': 0.5, 'max': 0.5, 'values': [0.5]}
  assert '| b | 4 | 50.0 (min 50.0) |' in (tmp_path / 'seeds_report.md').read_text()


def test_launch_seed_flags_are_checked_before_any_work(tmp_path):
  for args, message in ((['--seeds', '3-1'], 'runs backwards'),
                        (['--vectorize'], '--vectorize needs --seeds'),
                        (['--folds', '1'], 'expected a number of folds from 2 to 100'),
                        (['--folds', '2', '--seeds', '0'], '--folds cannot be combined'),
                        (['--only_folds', '0'], '--only_folds needs --folds K'),
                        (['--folds', '3', '--only_folds', '3'], 'folds [3] do not exist')):
    proc = subprocess.run([sys.executable, str(REPO / 'launch.py'), '--workdir',
                           str(tmp_path / 'w'), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
  assert not (tmp_path / 'w').exists()


def test_folds_test_every_image_once_and_aggregate_over_folds(tmp_path, caplog):
  config = smoke_config(tmp_path / 'tfds')
  config.fl.rounds = 1
  config.baselines.local_only = config.baselines.pooled = False
  path = seeds.run_folds(config, tmp_path / 'w', 2)
  assert path == tmp_path / 'w' / 'folds_report.md' and '2 folds' in path.read_text()
  tested = {}
  for i in (0, 1):
    saved = json.loads((tmp_path / 'w' / f'fold={i}' / 'config.json').read_text())
    assert (saved['data']['folds'], saved['data']['fold'], saved['seed']) == (2, i, config.seed + i)
    for center in data.load_centers(sweep.apply(config, {'data.folds': 2, 'data.fold': i}).data):
      every = set(center.train.files) | set(center.val.files) | set(center.test.files)
      tested.setdefault(center.name, (every, []))[1].append(set(center.test.files))
  for name, (every, (first, second)) in tested.items():  # each image tested once over 2 folds
    assert first and second and not first & second and first | second == every, name
  summary = json.loads((tmp_path / 'w' / 'folds_summary.json').read_text())
  assert summary['folds'] == [0, 1]
  results = [json.loads((tmp_path / 'w' / f'fold={i}' / 'results.json').read_text())
             for i in (0, 1)]
  assert summary['tables']['after']['synth1']['accuracy']['values'] == [
      r['after']['synth1']['accuracy'] for r in results]
  assert (tmp_path / 'w' / 'figures' / 'accuracy_per_round_folds.png').is_file()
  # Every test image once: the pooled counts are the folds' own, the intervals hold them.
  images = json.loads((tmp_path / 'w' / 'folds_per_image.json').read_text())
  for name, (_, tests) in tested.items():
    pooled = images['accuracy']['after'][name]
    assert pooled['n'] == sum(len(t) for t in tests)
    assert pooled['correct'] == round(sum(r['after'][name]['accuracy'] * r['after'][name]['n']
                                          for r in results))
    assert pooled['low'] <= pooled['accuracy'] <= pooled['high']
    vs = images['paired']['before'][name]  # FL against the reference model, same images
    assert vs['n'] == pooled['n'] and vs['accuracy_a'] == pooled['accuracy']
    assert abs(vs['difference'] - (vs['a_only'] - vs['b_only']) / vs['n']) < 1e-12
  assert 'Every test image over the folds' in path.read_text()
  # Rerun: both folds are finished, nothing is trained again, and the study's timing stays.
  stamp = (tmp_path / 'w' / 'fold=0' / 'results.json').stat().st_mtime_ns
  timing = (tmp_path / 'w' / 'folds_timing.json').read_text()
  seeds.run_folds(config, tmp_path / 'w', 2)
  assert (tmp_path / 'w' / 'fold=0' / 'results.json').stat().st_mtime_ns == stamp
  assert (tmp_path / 'w' / 'folds_timing.json').read_text() == timing
  # A study run a few folds at a time reports every fold it holds: --only_folds 1 after both.
  report = path.read_text()
  seeds.run_folds(config, tmp_path / 'w', 2, '1')
  assert json.loads((tmp_path / 'w' / 'folds_summary.json').read_text())['folds'] == [0, 1]
  assert path.read_text() == report
  # A finished fold of another config in the same workdir stays out of it, with a warning.
  other = tmp_path / 'other'
  shutil.copytree(tmp_path / 'w', other)
  saved = json.loads((other / 'fold=0' / 'config.json').read_text())
  saved['fl']['lr'] *= 2
  (other / 'fold=0' / 'config.json').write_text(json.dumps(saved))
  with caplog.at_level(logging.WARNING):
    seeds.run_folds(config, other, 2, '1')
  assert json.loads((other / 'folds_summary.json').read_text())['folds'] == [1]
  assert re.search(r'fold=0 has finished with another config \(fl\.lr: .* in the workdir, .* '
                   r'now\): left out of the report', caplog.text), caplog.text


def test_folds_restore_each_folds_own_reference_from_a_folds_study(tmp_path):
  config = smoke_config(tmp_path / 'tfds')
  study = tmp_path / 'study'
  for cfg, d in zip(*seeds.fold_runs(config, study, 2)):
    d.mkdir(parents=True)
    workdir_lib.write_config(cfg, d)  # a --folds 2 study's fold configs
  config.reference.restore = str(study)
  configs, _ = seeds.fold_runs(config, tmp_path / 'w', 2)
  # Fold i's reference was trained on fold i's split: another fold's has seen i's test images.
  assert [c.reference.restore for c in configs] == [str(study / 'fold=0'), str(study / 'fold=1')]
  # Another K splits the images otherwise: refused, as is a fold the study lacks.
  with pytest.raises(ValueError, match=r'fold=0 is fold 0 of 2, not fold 0 of 3: its reference '
                                       r'may have trained on this fold\'s test images'):
    seeds.fold_runs(config, tmp_path / 'w', 3)
  config.data.split_seed += 1  # the same K, other folds
  with pytest.raises(ValueError, match=r"fold=0 split the images with data.split_seed="):
    seeds.fold_runs(config, tmp_path / 'w', 2)
  config.data.split_seed -= 1
  # A study that ran some folds (--only_folds) restores those; asking for one it lacks is refused.
  saved = (study / 'fold=0' / 'config.json').read_text()
  (study / 'fold=0' / 'config.json').unlink()
  configs, dirs = seeds.fold_runs(config, tmp_path / 'w', 2, '1')
  assert [c.reference.restore for c in configs] == [str(study / 'fold=1')]
  assert [(c.data.fold, c.seed) for c in configs] == [(1, config.seed + 1)]
  assert dirs == [tmp_path / 'w' / 'fold=1']
  with pytest.raises(ValueError, match=r'fold=0 is missing or not a fold, not fold 0 of 2'):
    seeds.fold_runs(config, tmp_path / 'w', 2)
  (study / 'fold=0' / 'config.json').write_text(saved)
  (study / 'fold=1' / 'config.json').unlink()
  with pytest.raises(ValueError, match=r'fold=1 is missing or not a fold, not fold 1 of 2'):
    seeds.fold_runs(config, tmp_path / 'w', 2)
  config.reference.restore = str(study / 'fold=0')  # one run: trained on a split of its own
  with pytest.raises(ValueError, match=r'is one run, whose reference trained on images that '
                                       r'some fold tests'):
    seeds.fold_runs(config, tmp_path / 'w', 2)


def test_vectorize_refuses_shard_before_any_work(tmp_path):
  config = smoke_config(tmp_path / 'tfds').copy_and_resolve_references()
  config.fl.execution = 'shard'
  with pytest.raises(ValueError, match="--vectorize: fl.execution must be one of .* 'shard'"):
    seeds.run(config, tmp_path / 'w', [0, 1], vectorize=True)
  assert not (tmp_path / 'w').exists()


def test_launch_seeds_reuses_a_finished_seed_and_refuses_another_config(smoke, tmp_path):
  config, seq_dir = smoke
  shutil.copytree(seq_dir, tmp_path / 'seed=0')
  base = [sys.executable, str(REPO / 'launch.py'), '--config', 'configs/demo.py:smoke',
          f'--config.data.cache_dir={config.data.cache_dir}', '--workdir', str(tmp_path),
          '--seeds', '0']
  run = lambda *extra: subprocess.run(base + list(extra), cwd=REPO, capture_output=True,
                                      text=True, timeout=300)
  bad = run('--config.fl.rounds=2')
  assert bad.returncode != 0 and 'fl.rounds: 3 in the workdir, 2 now' in bad.stderr, bad.stderr
  assert not (tmp_path / 'seeds_report.md').exists()
  proc = run()
  assert proc.returncode == 0, proc.stderr
  assert f'report: {tmp_path / "seeds_report.md"}' in proc.stdout
  md = (tmp_path / 'seeds_report.md').read_text()
  assert '1 seeds' in md and '`seed=0`' in md
  results = json.loads((seq_dir / 'results.json').read_text())
  agg = json.loads((tmp_path / 'seeds_summary.json').read_text())['tables']
  assert agg['after']['synth2']['accuracy']['values'] == [results['after']['synth2']['accuracy']]


@pytest.mark.slow
def test_vectorized_two_seed_smoke_equals_sequential_runs(smoke, tmp_path):
  """Seeds 0 and 1 vectorized; seed 0 against the session's sequential smoke run (seed 0)."""
  config, seq_dir = smoke
  path = seeds.run(config, tmp_path, [0, 1], vectorize=True)
  for name in ('seeds_report.md', 'seeds_summary.csv', 'seeds_summary.json',
               'figures/accuracy_per_round_seeds.png', 'seed=0/report.md', 'seed=1/report.md'):
    assert (tmp_path / name).is_file(), name
  timing = json.loads((tmp_path / 'seeds_timing.json').read_text())
  assert timing['vectorize'] and timing['vectorized_fl_s'] > 0
  vec_dir = tmp_path / 'seed=0'
  assert json.loads((vec_dir / 'config.json').read_text()) == json.loads(
      (seq_dir / 'config.json').read_text())
  # The FL state after the last round: equal to float tolerance (batching changes rounding).
  (vec, meta), (seq, _) = fl_state(config, vec_dir), fl_state(config, seq_dir)
  assert meta['round'] == config.fl.rounds
  diffs, rel = [], []
  for a, b in zip(jax.tree.leaves(vec), jax.tree.leaves(seq), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diffs.append(float(np.max(np.abs(a - b))))
    rel.append(diffs[-1] / max(float(np.max(np.abs(b))), 1e-12))
  print(f'vectorized vs sequential seed 0, FL state: max |diff| {max(diffs):.2e}, max |diff| / '
        f'max |leaf| {max(rel):.2e}')
  # Observed on 2 CPU cores: 3.2e-4 (a bias of FedDyn's lambda, a difference of nearly equal
  # models; 2e-4 on the server model), losses to 2e-6 relative after 3 rounds.
  assert max(diffs) < 2e-3
  # The same rows, the same test metrics to tolerance.
  rows = lambda d: [r for r in workdir_lib.read_rows(d) if r['stage'] == 'fl']
  got, want = rows(vec_dir), rows(seq_dir)
  assert [(r['round'], r['center'], r['active']) for r in got] == [
      (r['round'], r['center'], r['active']) for r in want]
  np.testing.assert_allclose([r['loss'] for r in got], [r['loss'] for r in want], rtol=1e-4)
  np.testing.assert_allclose([r['train_accuracy'] for r in got],
                             [r['train_accuracy'] for r in want], atol=1e-4)
  np.testing.assert_allclose([r['accuracy'] for r in got], [r['accuracy'] for r in want],
                             atol=0.02)
  # The aggregate is over the two seeds' own results.
  res = [json.loads((tmp_path / f'seed={s}' / 'results.json').read_text()) for s in (0, 1)]
  agg = json.loads((tmp_path / 'seeds_summary.json').read_text())['tables']
  accs = [r['after']['synth1']['accuracy'] for r in res]
  assert agg['after']['synth1']['accuracy']['values'] == accs
  assert agg['after']['synth1']['accuracy']['min'] == min(accs)
  assert f'{len(accs)} seeds' in path.read_text()
  assert res[0]['before'] == json.loads((seq_dir / 'results.json').read_text())['before']
  # Rerunning the finished sweep trains nothing and rewrites the same aggregate.
  before = (tmp_path / 'seeds_summary.json').read_text()
  seeds.run(config, tmp_path, [0, 1], vectorize=True)
  assert (tmp_path / 'seeds_summary.json').read_text() == before
  assert checkpoint.manager(vec_dir / 'checkpoints' / 'fl').latest_step() == config.fl.rounds


def test_a_sweep_over_folds_writes_one_table_that_compares_points_on_the_same_images(tmp_path):
  config = smoke_config(tmp_path / 'tfds')
  config.fl.rounds = 1
  config.baselines.local_only = config.baselines.pooled = False
  config_file = tmp_path / 'ablation.py'
  config_file.write_text('def get_sweep():\n'
                         '  return [{"fl.eval_model": "active_mean"}, {"fl.eval_model": "server"}]\n')
  path = seeds.run_sweep(config, str(config_file), tmp_path / 'w', folds=2)
  assert path == tmp_path / 'w' / 'sweep_folds.md'
  assert not (tmp_path / 'w' / 'loco_folds.md').exists()  # no point left a center out
  names = ['fl.eval_model=active_mean', 'fl.eval_model=server']
  external, correct = ['synth1', 'synth2'], {}
  for name in names:  # each point is an ordinary --folds study
    summary = json.loads((tmp_path / 'w' / name / 'folds_summary.json').read_text())
    assert summary['folds'] == [0, 1]
    results = [json.loads((tmp_path / 'w' / name / f'fold={i}' / 'results.json').read_text())
               for i in (0, 1)]
    correct[name] = np.concatenate([
        np.asarray(r['details']['after'][c]['predictions']) ==
        np.asarray(r['details']['after'][c]['labels']) for c in external for r in results])
    assert summary['tables']['after']['mean, external centers']['accuracy']['values'] == [
        (r['after']['synth1']['accuracy'] + r['after']['synth2']['accuracy']) / 2 for r in results]
  rows = list(csv.DictReader((tmp_path / 'w' / 'sweep_folds.csv').open()))
  assert [r['point'] for r in rows] == names
  for row, name in zip(rows, names):
    assert int(row['external_images']) == len(correct[name])
    assert int(row['external_correct']) == int(correct[name].sum())
  a, b = correct[names[1]], correct[names[0]]  # the second point against the first, paired
  assert float(rows[1]['vs_first_difference']) == pytest.approx((a.sum() - b.sum()) / len(a))
  assert rows[0]['vs_first_difference'] == ''
  text = path.read_text()
  assert '| fl.eval_model=server | server |' in text and '(the reference point)' in text
  # The same table for studies that ran apart: the points' numbers, their differing fields.
  out = sweep_table.compare(tmp_path / 'cmp', {'a': tmp_path / 'w' / names[0],
                                               'b': tmp_path / 'w' / names[1]})
  apart = list(csv.DictReader((tmp_path / 'cmp' / 'sweep_folds.csv').open()))
  assert [r['point'] for r in apart] == ['a', 'b'] and out.name == 'sweep_folds.md'
  for row, same in zip(apart, rows):
    assert {k: v for k, v in row.items() if k not in ('point', 'fl.eval_model')} == {
        k: v for k, v in same.items() if k not in ('point', 'fl.eval_model')}
  assert [r['fl.eval_model'] for r in apart] == ['', 'server']  # b's field that differs from a
  # A study written before a later field (here fl.swa_start) ran it at its old value: no column.
  old_config = tmp_path / 'w' / names[0] / 'fold=0' / 'config.json'
  saved = json.loads(old_config.read_text())
  del saved['fl']['swa_start']
  old_config.write_text(json.dumps(saved))
  sweep_table.compare(tmp_path / 'cmp_old', {'a': tmp_path / 'w' / names[0],
                                             'b': tmp_path / 'w' / names[1]})
  header = (tmp_path / 'cmp_old' / 'sweep_folds.csv').read_text().splitlines()[0].split(',')
  assert 'fl.swa_start' not in header and 'fl.eval_model' in header
  with pytest.raises(FileNotFoundError, match='not a finished --folds study'):
    sweep_table.compare(tmp_path / 'cmp', {'a': tmp_path / 'w' / names[0], 'c': tmp_path})
  # A study of one fold (--only_folds 1) against the 2-fold point: compared on fold 1's images.
  one = seeds.run_folds(sweep.apply(config, {'fl.eval_model': 'server'}), tmp_path / 'one', 2,
                        '1')
  summary = json.loads((tmp_path / 'one' / 'folds_summary.json').read_text())
  assert summary['folds'] == [1] and not (tmp_path / 'one' / 'fold=0').exists()
  assert '1 folds' in one.read_text()
  fold1 = json.loads((tmp_path / 'one' / 'fold=1' / 'results.json').read_text())
  assert fold1 == json.loads((tmp_path / 'w' / names[1] / 'fold=1' / 'results.json').read_text())
  out = sweep_table.compare(tmp_path / 'cmp1', {'a': tmp_path / 'w' / names[0],
                                                'one': tmp_path / 'one'})
  assert 'over the 1 folds of each point (folds 1: those every study ran)' in out.read_text()
  sub = list(csv.DictReader((tmp_path / 'cmp1' / 'sweep_folds.csv').open()))
  n1 = sum(fold1['after'][c]['n'] for c in external)
  assert [int(r['external_images']) for r in sub] == [n1, n1]
  a1 = json.loads((tmp_path / 'w' / names[0] / 'fold=1' / 'results.json').read_text())
  mean1 = sum(a1['after'][c]['accuracy'] for c in external) / len(external)
  assert float(sub[0]['external mean mean']) == pytest.approx(mean1)  # fold 1's, not both folds'
  assert sub[0]['external mean sd'] == '' and sub[1]['fl.eval_model'] == 'server'
  # A point's run of another config is refused before anything trains.
  config.fl.rounds = 2
  with pytest.raises(ValueError, match=r'fl\.rounds: 1 in the workdir, 2 now'):
    seeds.run_sweep(config, str(config_file), tmp_path / 'w', folds=2)


def test_a_leave_one_center_out_sweep_over_folds_writes_the_left_out_centers_table(tmp_path):
  config = smoke_config(tmp_path / 'tfds')
  config.fl.rounds = 1
  config.baselines.local_only = config.baselines.pooled = False
  config_file = tmp_path / 'loco.py'
  config_file.write_text('def get_sweep():\n  return [{"fl.holdout": ("synth2",)}]\n')
  seeds.run_sweep(config, str(config_file), tmp_path / 'w', folds=2)
  point = tmp_path / 'w' / sweep.points(config, str(config_file))[0]['name']
  results = [json.loads((point / f'fold={i}' / 'results.json').read_text()) for i in (0, 1)]
  assert all(r['held_out'] == ['synth2'] for r in results)
  rows = list(csv.DictReader((tmp_path / 'w' / 'loco_folds.csv').open()))
  for quantity, table in (('FL', 'after'), ('reference alone', 'before')):
    row = next(r for r in rows if r['quantity'] == quantity)
    parts = [np.asarray(r['details'][table]['synth2']['predictions'])
             == np.asarray(r['details'][table]['synth2']['labels']) for r in results]
    assert row['center'] == 'synth2' and row['folds'] == '0;1'
    assert int(row['images']) == sum(map(len, parts))
    assert int(row['correct']) == sum(int(p.sum()) for p in parts)
    assert row['per_fold'] == ';'.join(repr(float(p.mean())) for p in parts)
  assert 'synth2' in (tmp_path / 'w' / 'loco_folds.md').read_text()


def test_the_n_column_counts_images_per_run_over_folds():
  # Folds test different numbers of images per center: the n cell is their range, a count
  # (it read 29940.0 ± 151.7, the per-fold counts formatted as percentages).
  metric = aggregate.stats([0.5, 0.75])
  rows = {'c': {'n': aggregate.stats([299, 301]), **{k: metric for k in aggregate.METRICS}},
          'd': {'n': aggregate.stats([54, 54]), **{k: metric for k in aggregate.METRICS}}}
  table = aggregate.center_table(rows, 'c')
  assert '| c (reference) | 299-301 | 62.5 ± 17.7 (min 50.0) |' in table
  assert '| d | 54 | 62.5' in table
