"""DP at a deployed site (fedblood.deploy.site_privacy): secret noise, its own ledger, its budget.

In-process, as tests/test_deploy_site.py: the server's requests are built as the server builds
them and answered by the site's ClientApp handlers (``worker='off'``).
"""

import json
import math

import numpy as np
import pytest

pytest.importorskip('flwr')
dp_accounting = pytest.importorskip('dp_accounting')

# pylint: disable=g-import-not-at-top
from fedblood.deploy import client_app, site, site_privacy, study, wire
from deploy_helpers import CONFIG, TINY, context, message
# pylint: enable=g-import-not-at-top

# synth1 has n = 26 training images: q = 8 / 26, ceil(26 / 8) = 4 DP-SGD steps a round.
DP = TINY + " fl.dp.mode='example' fl.dp.noise_multiplier=1.2 fl.batch_size=8"
RATE, STEPS, SIGMA, DELTA = 8 / 26, 4, 1.2, 1e-5


def _epsilon(steps: int) -> float:
  """dp-accounting's own epsilon for ``steps`` Poisson-sampled Gaussian steps of synth1."""
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(RATE, dp_accounting.GaussianDpEvent(SIGMA)), steps))
  return acc.get_epsilon(DELTA)


def _node(tmp_path, **extra) -> dict:
  return {'center': 'synth1', 'state-dir': str(tmp_path / 'site'),
          'cache-dir': str(tmp_path / 'cache'), 'worker': 'off', **extra}


def _params(reply) -> list:
  return [np.asarray(a.numpy()) for a in reply.content['params'].values()]


def _ledger(tmp_path) -> list:
  return json.loads((tmp_path / 'site' / site_privacy.LEDGER).read_text())['mechanisms']


def test_a_dp_site_draws_secret_noise_and_accounts_for_every_update_it_sent(tmp_path):
  config = wire.load_config(CONFIG, DP)
  study_id = wire.study_id(config, tmp_path / 'server')
  node = _node(tmp_path)
  # The same request twice (a retried round 1): the seed is the server's, the noise is not.
  first, second = (client_app.train(message('train', config, study_id), context(node))
                   for _ in range(2))
  assert any(not np.array_equal(a, b) for a, b in zip(_params(first), _params(second)))
  report = json.loads(second.content['privacy']['json'])
  assert report['steps'] == 2 * STEPS and report['rate'] == RATE
  assert report['epsilon'] == pytest.approx(_epsilon(2 * STEPS), rel=1e-9)
  assert report['site_epsilon'] == report['epsilon'] and report['budget'] is None
  assert [(e['round'], e['steps']) for e in _ledger(tmp_path)] == [(1, STEPS), (1, STEPS)]
  # Without DP the site's update is the simulation's, seeded: the same twice.
  plain = wire.load_config(CONFIG, TINY)
  node = _node(tmp_path / 'plain')
  first, second = (client_app.train(message('train', plain, wire.study_id(plain, tmp_path)),
                                    context(node)) for _ in range(2))
  assert all(np.array_equal(a, b) for a, b in zip(_params(first), _params(second)))
  assert 'privacy' not in first.content


def test_a_site_at_its_budget_declines_and_spends_nothing(tmp_path):
  config = wire.load_config(CONFIG, DP)
  study_id = wire.study_id(config, tmp_path / 'server')
  budget = (_epsilon(STEPS) + _epsilon(2 * STEPS)) / 2  # room for one round, not two
  node = _node(tmp_path, **{'dp-epsilon-budget': budget})
  trained = client_app.train(message('train', config, study_id), context(node))
  assert 'params' in trained.content and 'declined' not in trained.content
  ledger = _ledger(tmp_path)
  declined = client_app.train(message('train', config, study_id, round=2, committed=1),
                              context(node))
  assert 'params' not in declined.content
  reason = declined.content['declined']['reason']
  assert 'privacy budget' in reason and 'dp-epsilon-budget' in reason, reason
  report = json.loads(declined.content['privacy']['json'])
  assert report['epsilon'] == pytest.approx(_epsilon(STEPS), rel=1e-9)  # what it did spend
  assert _ledger(tmp_path) == ledger
  assert sorted(p.name for p in (tmp_path / 'site' / study_id / 'client_state').iterdir()
                if p.name.isdigit()) == ['1']
  # A site with a budget trains only with DP.
  plain = wire.load_config(CONFIG, TINY)
  reply = client_app.train(message('train', plain, wire.study_id(plain, tmp_path / 'p')),
                           context(_node(tmp_path / 'p', **{'dp-epsilon-budget': 8})))
  assert 'params' not in reply.content
  assert 'only with differential privacy' in reply.content['declined']['reason']


@pytest.mark.parametrize('key, value, says', [
    ('dp-epsilon-budget', 'eight', 'dp-epsilon-budget=.eight. is not a number'),
    ('dp-epsilon-budget', 0, r'dp-epsilon-budget=0.0 must be > 0'),
    ('dp-delta', 0.5, r'dp-delta=0.5 must be in \(0, 1/n\)')])
def test_a_bad_budget_in_the_node_config_is_named(tmp_path, key, value, says):
  config = wire.load_config(CONFIG, DP)
  with pytest.raises(site.SiteError, match=says):
    client_app.train(message('train', config, wire.study_id(config, tmp_path / 'server')),
                     context(_node(tmp_path, **{key: value})))
  assert not (tmp_path / 'site' / site_privacy.LEDGER).exists()


def test_the_server_checks_a_sites_privacy_report():
  good = {'epsilon': 1.0, 'delta': 1e-5, 'site_epsilon': 1.0, 'noise_multiplier': 1.0,
          'rate': 0.3, 'steps': 4}
  assert site_privacy.check_report(good) is None
  assert 'epsilon' in site_privacy.check_report({**good, 'epsilon': math.nan})
  assert 'steps' in site_privacy.check_report({**good, 'steps': -1})
  assert 'not a mapping' in site_privacy.check_report([1])


def test_client_level_dp_is_refused_in_a_deployment():
  config = wire.load_config(CONFIG, TINY + " fl.dp.mode='client' fl.algorithm='fed_avg'")
  with pytest.raises(ValueError, match="fl.dp.mode='client' adds its noise at the server"):
    study.build(config)


def test_a_site_calibrates_its_own_noise_to_the_target_epsilon(tmp_path):
  config = wire.load_config(CONFIG, DP + ' fl.dp.target_epsilon=5.0 fl.rounds=3')
  reply = client_app.train(message('train', config, wire.study_id(config, tmp_path / 'server')),
                           context(_node(tmp_path)))
  sigma = json.loads(reply.content['privacy']['json'])['noise_multiplier']
  acc = dp_accounting.rdp.RdpAccountant()  # all 3 rounds of this site at its sigma: the target
  acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      RATE, dp_accounting.GaussianDpEvent(sigma)), 3 * STEPS))
  assert 4.9 < acc.get_epsilon(DELTA) <= 5.0
