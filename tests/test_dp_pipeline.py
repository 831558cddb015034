"""fl.dp through the pipeline (smoke study): epsilon per round, results.json, report, resume."""

import json

import pytest

from fedblood import data, privacy
from fedblood.rundir import checkpoint
from fedblood.study import train
from study_helpers import interrupt_saves, smoke_config

dp_accounting = pytest.importorskip('dp_accounting')


def dp_config(smoke_cfg, reference_dir):
  config = smoke_config(smoke_cfg.data.cache_dir)
  config.reference.restore = str(reference_dir)
  config.baselines.local_only = config.baselines.pooled = False
  config.fl.dp.mode = 'example'
  config.fl.dp.target_epsilon = 5.0
  config.fl.dp.microbatch = 16
  return config


@pytest.fixture(scope='module')
def dp_run(smoke, tmp_path_factory):
  config, reference_dir = smoke
  config = dp_config(config, reference_dir)
  workdir = tmp_path_factory.mktemp('dp') / 'run'
  train.run(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_epsilon_per_round_and_in_results_and_report(dp_run):
  config, workdir = dp_run
  results = json.loads((workdir / 'results.json').read_text())
  sizes = results['train_sizes']
  priv = results['privacy']
  assert priv['mode'] == 'example' and priv['calibrated_to_epsilon'] == 5.0
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  fl_rows = [r for r in rows if r['stage'] == 'fl']
  assert len(fl_rows) == 3 * len(sizes)
  for row in fl_rows:  # the same event built independently: rounds * ceil(n_k / B) steps
    n, steps = sizes[row['center']], row['round'] * -(-sizes[row['center']] // 32)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        32 / n, dp_accounting.GaussianDpEvent(priv['noise_multiplier'])), steps)
    assert row['epsilon'] == accountant.get_epsilon(1e-5)
  finals = {r['center']: r['epsilon'] for r in fl_rows if r['round'] == 3}
  assert {c: v['epsilon'] for c, v in priv['centers'].items()} == finals
  assert 4.9 < max(finals.values()) <= 5.0  # calibrated on the most exposed center
  report = (workdir / 'report.md').read_text()
  assert 'record level (DP-SGD per center)' in report and f'{max(finals.values()):.3g}' in report


@pytest.mark.slow
def test_resumed_dp_run_accounts_and_trains_as_an_uninterrupted_one(dp_run, tmp_path,
                                                                    monkeypatch):
  config, reference = dp_run
  workdir = tmp_path / 'run'
  # Saves: the reference model, round 1, then the run stops before round 2's save.
  real_save = interrupt_saves(monkeypatch, 3)
  with pytest.raises(KeyboardInterrupt):
    train.run(config, workdir)
  monkeypatch.setattr(checkpoint, 'save', real_save)
  train.run(config, workdir)
  for name in ('results.json', 'metrics.jsonl'):
    assert (workdir / name).read_bytes() == (reference / name).read_bytes(), name


def test_dp_off_adds_nothing_to_results(smoke):
  _, workdir = smoke  # the smoke run has fl.dp.mode = 'off'
  results = json.loads((workdir / 'results.json').read_text())
  assert 'privacy' not in results
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert not any('epsilon' in r for r in rows)
  assert privacy.plan(smoke[0].fl, results['train_sizes']) is None


def test_privacy_report_table_and_figure(smoke, tmp_path):
  from fedblood.reporting import privacy_report  # pylint: disable=g-import-not-at-top
  _, workdir = smoke
  plain = privacy_report.parse_point(f'fed_dyn=inf:{workdir}', 2)
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  expected = {r['center']: r['accuracy'] for r in rows if r['stage'] == 'fl' and r['round'] == 2}
  assert {c: v['accuracy'] for c, v in plain['centers'].items()} == expected
  noisy = dict(plain, target=3.0, centers={c: {'accuracy': 0.5, 'epsilon': 2.5} for c in expected})
  text = privacy_report.table([plain, noisy])
  assert '| fed_dyn | inf | ' in text and '| fed_dyn | 3 | 50.0 (ε 2.50) |' in text
  external = [r['accuracy'] for r in rows if r['stage'] == 'fl' and r['round'] <= 2
              and r['center'] != 'synth0']
  assert plain['external_last3'] == pytest.approx(sum(external) / len(external))
  path = privacy_report.plot([plain, noisy], tmp_path / 'fig.png')
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='round 9 asked, only 3 logged'):
    privacy_report.parse_point(f'fed_dyn=inf:{workdir}', 9)


@pytest.mark.slow
def test_a_center_at_its_budget_stops_and_the_others_go_on(smoke, tmp_path):
  config, reference_dir = smoke
  config = dp_config(config, reference_dir)
  config.fl.dp.target_epsilon = 0.0
  config.fl.dp.noise_multiplier = 1.5
  sizes = {c.name: len(c.train.labels) for c in data.load_centers(config.data)}
  plan = privacy.plan(config.fl, sizes)
  k = plan.centers.index('synth2')
  one, two = (privacy.epsilons(plan, [rounds * s for s in plan.steps_per_round])[k]
              for rounds in (1, 2))
  config.fl.dp.budget = {'synth2': (one + two) / 2}  # room for one round, not two
  workdir = tmp_path / 'run'
  results = train.run(config, workdir)
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  active = {(r['round'], r['center']): r['active'] for r in rows if r['stage'] == 'fl'}
  assert active == {(r, c): not (c == 'synth2' and r > 1) for r in (1, 2, 3) for c in sizes}
  n = sizes['synth2']
  accountant = dp_accounting.rdp.RdpAccountant()  # one round of synth2, built independently
  accountant.compose(dp_accounting.PoissonSampledDpEvent(
      32 / n, dp_accounting.GaussianDpEvent(1.5)), -(-n // 32))
  assert results['privacy']['centers']['synth2'] == {
      'epsilon': accountant.get_epsilon(1e-5), 'rate': 32 / n, 'steps': -(-n // 32),
      'budget': (one + two) / 2}
  assert results['privacy']['centers']['synth0']['steps'] == 3 * plan.steps_per_round[0]


@pytest.mark.parametrize('mode, budget, says', [
    ('example', {'nowhere': 1.0}, r'fl.dp.budget.nowhere: no training center named'),
    ('example', {'synth1': -1.0}, r'fl.dp.budget.synth1=-1.0 must be a number > 0'),
    ('off', {'synth1': 3.0}, r"fl.dp.budget=.* needs fl.dp.mode='example' or 'client'")])
def test_a_bad_budget_is_refused_before_any_work(tmp_path, mode, budget, says):
  config = smoke_config(tmp_path / 'tfds')
  config.fl.dp.mode = mode
  config.fl.dp.budget = budget
  with pytest.raises(ValueError, match=says):
    train.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()
