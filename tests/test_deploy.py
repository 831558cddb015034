"""The study deployed on Flower: real SuperLink / SuperNode / flwr processes on 127.0.0.1.

Each test starts its own federation (free ports, TLS certificates and node keys made for
it) and kills every process it started in a ``finally`` (the Federation context).
"""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip('flwr')

from fedblood.core import simulate
from fedblood.deploy import credentials, local, wire  # pylint: disable=g-import-not-at-top
from fedblood.rundir import checkpoint, checkpoint_listing  # pylint: disable=g-import-not-at-top
from fedblood.study import experiment, train
from fedblood.study.experiment import STAGE  # pylint: disable=g-import-not-at-top
from fedblood.study.stages import fl  # pylint: disable=g-import-not-at-top
from fedblood.study.stages.reference import load_reference  # pylint: disable=g-import-not-at-top

CONFIG = str(Path(__file__).resolve().parents[1] / 'configs' / 'demo.py') + ':smoke'
# 3 tiny centers (44 / 26 / 20 training images), VGG16 at width 1/16, 32 px, 2 rounds.
TINY = ('baselines.local_only=False baselines.pooled=False model.width=0.0625 '
        'data.synthetic.images_per_center=(60,40,30)')


def _reference(root: Path, overrides: str) -> str:
  """A reference model (the seed's fresh init) saved as a checkpoint; returns the overrides."""
  ref = root / 'reference'
  overrides = f"{overrides} reference.restore='{ref}'"
  config = wire.load_config(CONFIG, overrides)
  mngr = checkpoint.manager(ref)
  checkpoint.save(mngr, 0, {'params': experiment.build(config).init()},
                  {'kind': 'reference model'})
  mngr.close()
  return overrides


def _fl_state(workdir: Path):
  """The latest FL checkpoint's arrays (server state, clients' states, key)."""
  return checkpoint_listing.stored_state(workdir / 'checkpoints' / 'fl')


def max_rel_diff(a, b) -> float:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                   / max(float(np.max(np.abs(np.asarray(x)))), 1e-30)) for x, y in zip(la, lb))


def _rows(workdir: Path) -> list:
  return [r for r in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
          if r['stage'] == 'fl']


def _run_config(overrides, workdir, **kw):
  return {'config': CONFIG, 'overrides': overrides, 'workdir': str(workdir),
          'connect-timeout': 300.0, 'round-timeout': 300.0, **kw}


@pytest.mark.slow
def test_deployed_equals_simulated_with_tls_and_node_auth(tmp_path, monkeypatch):
  """SCAFFOLD with an lr decaying over rounds, logit-adjusted local losses (each site's class
  prior from its own labels) and the server's models averaged over rounds (evaluated at the
  sites from the server state they receive), over TLS with node authentication ==
  fedblood's simulation (FedDyn's is tests/test_deploy_wbc.py's, on the real centers, and the
  replays below).

  Three registered sites and one node with an unregistered key, which the SuperLink refuses.
  Site 2 runs Flower's ``flower-supernode`` as shipped, the others ``fedblood-supernode``.
  """
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  # fl.lr_decay: round 2 runs at half round 1's lr, at each site from the round it trains.
  overrides = _reference(tmp_path, TINY + " fl.rounds=2 fl.lr_decay=0.5 fl.logit_adjust=1.0 "
                                   "fl.swa_start=1 fl.eval_model='swa_server'")
  with local.Federation(tmp_path / 'fed', tls=True, auth=True) as fed:
    fed.start_superlink()
    for k in range(3):
      private, public = credentials.make_node_key(fed.root, f'site{k}')
      fed.register(public)
      fed.start_supernode(f'site{k}', {'center': f'synth{k}', 'state-dir': str(tmp_path / f's{k}')},
                          key=private, supernode='flower' if k == 2 else None)
    intruder, _ = credentials.make_node_key(fed.root, 'intruder')
    fed.start_supernode('intruder', {'center': 'synth1', 'state-dir': str(tmp_path / 'x')},
                        key=intruder)
    for algorithm in ('scaffold',):
      algo_overrides = f"{overrides} fl.algorithm='{algorithm}'"
      deployed = tmp_path / f'deployed_{algorithm}'
      out = fed.run(_run_config(algo_overrides, deployed), timeout=600)
      assert out['status'] == 'finished:completed', out['log'][-3000:]
      simulated = tmp_path / f'simulated_{algorithm}'
      train.run(wire.load_config(CONFIG, algo_overrides), simulated)

      step_d, state_d = _fl_state(deployed)
      step_s, state_s = _fl_state(simulated)
      assert step_d == step_s == 2
      diff = max_rel_diff(state_s, state_d)
      print(f'{algorithm}: max rel diff deployed vs simulated = {diff:.3g}')
      assert diff <= 1e-5
      # Same per-round rows and Tables 1/2 as the simulated run (baselines are not deployed).
      assert _rows(deployed) == _rows(simulated)
      res_d, res_s = (json.loads((w / 'results.json').read_text()) for w in (deployed, simulated))
      for key in ('centers', 'before', 'after', 'after_models', 'after_last', 'selection',
                  'confusion', 'train_sizes'):
        assert res_d[key] == res_s[key], key
      assert res_d['eval_model'] == res_s['eval_model'] == 'swa_server'
      assert (deployed / 'report.md').exists()
      assert (deployed / 'figures' / 'accuracy_per_round.png').stat().st_size > 0
      log = (deployed / 'deploy.log').read_text()
      assert log.count(' is center ') == 3  # the intruder never became a node
    intruder_log = (fed.logs / 'intruder.log').read_text()
    assert 'Failed to activate SuperNode' in intruder_log, intruder_log[-2000:]
    assert 'SuperNode ID' not in intruder_log


def _wait_for(path: Path, fed, timeout: float = 600.0) -> None:
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout
  while not path.exists():
    if time.time() > deadline:
      raise TimeoutError(f'{path} did not appear; logs in {fed.logs}')
    time.sleep(0.5)


def _wait_for_line(path: Path, text: str, fed, timeout: float = 600.0) -> None:
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout
  while not (path.exists() and text in path.read_text()):
    if time.time() > deadline:
      raise TimeoutError(f'{path} did not say {text!r}; logs in {fed.logs}')
    time.sleep(0.2)


def _replay(overrides, masks):
  """The simulation's own round function over the rounds' actual participation masks."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fedblood import data  # pylint: disable=g-import-not-at-top
  config = wire.load_config(CONFIG, overrides)
  exp = experiment.build(config)
  ref, _ = load_reference(config.reference.restore, exp)
  centers = data.load_centers(config.data)
  _, round_fn, state, frozen = fl.fl_template(exp, config.fl, ref, len(centers))
  sim = simulate.pad_centers([c.train for c in centers])
  fl_key = jax.random.fold_in(exp.key, STAGE['fl'])
  server, clients = state['server'], state['clients']
  for r, active in enumerate(masks, 1):
    server, clients, _ = round_fn(server, clients, frozen, sim, jnp.asarray(active), fl_key,
                                  jnp.int32(r))
  return {'server': server, 'clients': clients, 'rng': state['rng']}


def _masks(log: str, names=('synth0', 'synth1', 'synth2')) -> list:
  masks = {}
  for line in log.splitlines():
    if ': active centers ' in line:
      r = int(line.split(' round ')[1].split(':')[0])
      active = line.split('active centers ')[1].split(' of ')[0]
      masks[r] = [f"'{n}'" in active for n in names]
  return [masks[r] for r in sorted(masks)]


@pytest.mark.slow
def test_faults_tampered_reply_crashed_site_restarted_server(tmp_path, monkeypatch):
  """FedDyn, 3 rounds: site2's round-1 reply has NaN params (refused, named); site1's worker
  dies whenever it trains round 2 (the relay's retry dies too: the round goes on without
  it, and site1 trains round 3 from its round-1 state on disk); the SuperLink (and with it
  the ServerApp) is killed -9 after round 2 and restarted, and the run resumes from its
  checkpoint. The final state equals the simulation's round function over the same
  participation, [1,1,0], [1,0,1], [1,1,1], exactly as FedDyn defines it."""
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  overrides = _reference(tmp_path, TINY + " fl.rounds=3 fl.algorithm='fed_dyn'")
  workdir = tmp_path / 'deployed'
  run_config = _run_config(overrides, workdir, **{'round-timeout': 90.0})
  faulty = os.pathsep.join([str(Path(__file__).parent / 'deploy_tamper'), str(local.REPO)])
  sites = {k: {'center': f'synth{k}', 'state-dir': str(tmp_path / f's{k}')} for k in range(3)}
  with local.Federation(tmp_path / 'fed', persistent=True) as fed:
    fed.start_superlink()
    fed.start_supernode('site0', sites[0])
    fed.start_supernode('site1', sites[1],
                        env={'FEDBLOOD_CRASH_ROUND': '2', 'PYTHONPATH': faulty})
    fed.start_supernode('site2', sites[2],
                        env={'FEDBLOOD_TAMPER_ROUND': '1', 'PYTHONPATH': faulty})
    first = fed.start_run(run_config)
    _wait_for(workdir / 'checkpoints' / 'fl' / '2', fed)
    fed.kill('superlink')
    fed.start_superlink()
    # As the README tells an operator: stop the dead run, so that the sites drop its round-3
    # requests now instead of when the SuperLink declares it dead (about 50 s later).
    stopped = fed.flwr('stop', str(first), 'fedblood')
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    out = fed.wait_run(fed.start_run(run_config), timeout=600)
    assert out['status'] == 'finished:completed', out['log'][-3000:]
  log = (workdir / 'deploy.log').read_text()
  refused = [line for line in log.splitlines() if 'refused the reply' in line]
  assert len(refused) == 1 and 'round 1' in refused[0] and "(center 'synth2')" in refused[0]
  assert 'non-finite' in refused[0] and 'node ' in refused[0]
  assert "train: node" in log and "(center 'synth1') failed" in log  # round 2's crash, named
  assert 'resuming after round 2' in log
  masks = _masks(log)
  assert masks[:2] == [[True, True, False], [True, False, True]]
  assert masks[-1] == [True, True, True]
  template = _replay(overrides, [[True, True, False], [True, False, True], [True, True, True]])
  mngr = checkpoint.manager(workdir / 'checkpoints' / 'fl')
  state, meta = checkpoint.restore(mngr, template)
  mngr.close()
  assert meta['round'] == 3
  diff = max_rel_diff(template, state)
  print(f'faults: max rel diff deployed vs simulated replay = {diff:.3g}')
  assert diff <= 1e-5
  rounds = [r['round'] for r in _rows(workdir)]
  assert rounds == sorted(rounds) and set(rounds) == {1, 2, 3}  # resumed log, no duplicates


@pytest.mark.slow
def test_a_hung_site_drops_out_of_its_round_and_rejoins_with_its_state(tmp_path, monkeypatch):
  """FedDyn, 3 rounds, 2 sites: site1's worker hangs (SIGSTOP) when asked to train round 2.
  The server waits round-timeout once (bounded, logged; it does not ask the silent site to
  evaluate as well), runs round 2 without it, and discards its late reply (sent after the
  test's SIGCONT); site1 trains round 3 from its round-1 state. The final state equals the
  simulation's round function over [1,1], [1,0], [1,1]."""
  import signal  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  overrides = _reference(tmp_path, 'baselines.local_only=False baselines.pooled=False '
                         'model.width=0.0625 data.synthetic.num_centers=2 '
                         "data.synthetic.images_per_center=(60,40) fl.rounds=3 "
                         "fl.algorithm='fed_dyn'")
  workdir = tmp_path / 'deployed'
  hang = os.pathsep.join([str(Path(__file__).parent / 'deploy_tamper'), str(local.REPO)])
  with local.Federation(tmp_path / 'fed') as fed:
    fed.start_superlink()
    fed.start_supernode('site0', {'center': 'synth0', 'state-dir': str(tmp_path / 's0')})
    fed.start_supernode('site1', {'center': 'synth1', 'state-dir': str(tmp_path / 's1')},
                        env={'FEDBLOOD_HANG_ROUND': '2', 'PYTHONPATH': hang})
    run_id = fed.start_run(_run_config(overrides, workdir, **{'round-timeout': 40.0}))
    _wait_for_line(workdir / 'deploy.log', "round 2: active centers ['synth0']", fed)
    pid = local.worker_pid(tmp_path / 's1')
    assert pid is not None and Path(f'/proc/{pid}/stat').read_text().split(')')[1].split()[0] == 'T'
    os.kill(pid, signal.SIGCONT)  # its round-2 reply now arrives, late
    out = fed.wait_run(run_id, timeout=300)
    assert out['status'] == 'finished:completed', out['log'][-3000:]
  log = (workdir / 'deploy.log').read_text()
  silent = [line for line in log.splitlines() if 'no reply within 40 s from node' in line]
  assert len(silent) == 1 and "(center 'synth1'): left out" in silent[0]  # one wait, not two
  assert 'evaluate:' not in log  # the silent site was not asked to evaluate as well
  masks = _masks(log, names=('synth0', 'synth1'))
  assert masks == [[True, True], [True, False], [True, True]]
  template = _replay(overrides, masks)
  mngr = checkpoint.manager(workdir / 'checkpoints' / 'fl')
  state, meta = checkpoint.restore(mngr, template)
  mngr.close()
  assert meta['round'] == 3
  assert max_rel_diff(template, state) == 0


@pytest.mark.slow
def test_all_sites_vanish_ends_with_an_error_not_a_hang(tmp_path, monkeypatch):
  """The only site is killed -9 once round 1 is checkpointed (by then it has trained round 2
  too: round 2's train request carried round 1's evaluation): round 3 ends the run with a
  clear error after round-timeout, and round 2's checkpoint stays for a resume."""
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  overrides = _reference(tmp_path, 'baselines.local_only=False baselines.pooled=False '
                         'model.width=0.0625 data.synthetic.num_centers=1 '
                         'data.synthetic.images_per_center=(60,) fl.rounds=3')
  workdir = tmp_path / 'deployed'
  with local.Federation(tmp_path / 'fed') as fed:
    fed.start_superlink()
    fed.start_supernode('site0', {'center': 'synth0', 'state-dir': str(tmp_path / 's0')})
    run_id = fed.start_run(_run_config(overrides, workdir, **{'round-timeout': 45.0}))
    _wait_for(workdir / 'checkpoints' / 'fl' / '1', fed)
    fed.kill('site0')
    out = fed.wait_run(run_id, timeout=300)
  assert out['status'] == 'finished:failed', out['log'][-3000:]
  stopped = (workdir / 'deploy.log').read_text().splitlines()[-1]
  assert 'stopped: FederationError: round 3: no site trained within 45 s' in stopped
  assert 'rerun to resume' in stopped
  step, _ = _fl_state(workdir)
  assert step == 2


@pytest.mark.slow
def test_deployed_dp_sites_account_for_themselves_and_one_at_its_budget_drops_out(tmp_path,
                                                                                  monkeypatch):
  """DP-SGD at each site: the epsilon each reports is dp-accounting's for what it ran; synth2's
  budget holds one round, so it declines round 2 and the run completes without it."""
  dpa = pytest.importorskip('dp_accounting')
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  sigma, batch, sizes = 1.2, 8, {'synth0': 44, 'synth1': 26, 'synth2': 20}

  def epsilon(center, rounds):
    n = sizes[center]
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(
        batch / n, dpa.GaussianDpEvent(sigma)), rounds * -(-n // batch)))
    return acc.get_epsilon(1e-5)

  overrides = _reference(tmp_path, f"{TINY} fl.rounds=2 fl.dp.mode='example' "
                                   f'fl.dp.noise_multiplier={sigma} fl.batch_size={batch}')
  budget = (epsilon('synth2', 1) + epsilon('synth2', 2)) / 2
  with local.Federation(tmp_path / 'fed') as fed:
    fed.start_superlink()
    for k in range(3):
      fed.start_supernode(f'site{k}', {'center': f'synth{k}', 'state-dir': str(tmp_path / f's{k}'),
                                       **({'dp-epsilon-budget': budget} if k == 2 else {})})
    deployed = tmp_path / 'deployed'
    out = fed.run(_run_config(overrides, deployed), timeout=600)
  assert out['status'] == 'finished:completed', out['log'][-3000:]
  log = (deployed / 'deploy.log').read_text()
  assert "round 2: center 'synth2' declined to train: privacy budget" in log, log[-3000:]
  active = {(r['round'], r['center']): r['active'] for r in _rows(deployed)}
  assert active == {(r, c): not (r == 2 and c == 'synth2') for r in (1, 2) for c in sizes}
  results = json.loads((deployed / 'results.json').read_text())
  privacy = results['privacy']
  assert privacy['noise'].startswith('secret')
  for center, rounds in (('synth0', 2), ('synth1', 2), ('synth2', 1)):
    assert privacy['centers'][center]['epsilon'] == pytest.approx(epsilon(center, rounds),
                                                                  rel=1e-9), center
  epsilons = {r['center']: r['epsilon'] for r in _rows(deployed) if r['round'] == 2}
  assert epsilons == {c: privacy['centers'][c]['epsilon'] for c in sizes}
  assert 'epsilon per center' in (deployed / 'report.md').read_text()
