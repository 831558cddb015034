"""The round driver with fake train / evaluate callbacks on a tiny state, through real Orbax.

The deployed server drives its rounds through :func:`fedblood.study.driver.drive` as the simulation
does, so these pin what a deployed run now does too: the best-validation step is kept and
``checkpoint.every`` is honoured.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedblood.rundir import checkpoint
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import driver

NAMES = ('a', 'b')
VAL = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.4, 6: 0.5}  # the best round is 2


def _template():
  return {'server': {'w': jnp.zeros(3)}, 'clients': {'c': jnp.zeros((len(NAMES), 2))},
          'rng': jax.random.key_data(jax.random.key(0))}


def _run(workdir, rounds: int, every: int, keep: int = 1):
  mngr, state, start, meta = driver.open_run(workdir, _template(), keep)
  ckpt = driver.Checkpoints(mngr, every, state['rng'], {'centers': list(NAMES)})
  run = driver.Run(NAMES, rounds, start, 'server', lambda s: {'server': s['w']},
                   lambda r: np.ones(len(NAMES), bool), None, ckpt)
  return run, (state['server'], state['clients']), meta


def _train_round(r, members, actives, states):
  out = []
  for active, (server, clients) in zip(actives, states):
    server = {'w': server['w'] + r}
    metrics = {'loss': np.full(len(NAMES), 1.0 / r), 'accuracy': np.full(len(NAMES), 0.5)}
    out.append((server, clients, metrics, active))
  return out


def _evaluate(r, server):
  del server
  test = {'accuracy': 0.5, 'n': 4}
  return {name: (test, {'accuracy': VAL[r], 'n': 2}) for name in NAMES}


def _drive(workdir, rounds, every, **kwargs):
  workdir.mkdir(exist_ok=True)
  run, state, _ = _run(workdir, rounds, every)
  rows = []
  ((server, _),) = driver.drive([run], [state], _train_round, [_evaluate], [rows.append], **kwargs)
  run.ckpt.mngr.close()
  return run, server, rows


def test_drive_keeps_the_best_step_and_honours_every(tmp_path):
  metas = []
  run, server, rows = _drive(tmp_path, rounds=5, every=2, extra_meta=lambda: {'deploy': 1})
  assert float(server['w'][0]) == 15.0
  assert [(row['round'], row['center']) for row in rows] == [
      (r, c) for r in range(1, 6) for c in NAMES]
  assert rows[2] == {'stage': 'fl', 'round': 2, 'center': 'a', 'model': 'server',
                     'active': True, 'loss': 0.5, 'train_accuracy': 0.5, 'accuracy': 0.5,
                     'n': 4, 'val_accuracy': 0.9, 'val_n': 2}
  mngr = checkpoint.manager(workdir_lib.checkpoints(tmp_path, workdir_lib.FL), keep=1,
                            best_metric=driver.BEST_METRIC)
  # Saved each 2 rounds and the last (2, 4, 5); kept: the last one and the best (round 2).
  assert sorted(mngr.all_steps()) == [2, 5]
  for step in (2, 5):
    _, meta = checkpoint.restore(mngr, _template(), step)
    metas.append(meta)
  mngr.close()
  assert metas[0]['metrics'] == {'val_accuracy': 0.9, 'test_accuracy': 0.5, 'loss': 0.5}
  assert metas[0]['best_metric'] == 'val_accuracy' and metas[0]['deploy'] == 1
  assert metas[1]['round'] == 5 and metas[1]['centers'] == list(NAMES)


def test_drive_resumes_after_the_last_committed_round(tmp_path):
  _drive(tmp_path, rounds=3, every=2)
  run, state, meta = _run(tmp_path, rounds=6, every=2)
  assert run.start == 3 and meta['round'] == 3 and float(state[0]['w'][0]) == 6.0
  run.ckpt.mngr.close()
  seen = []
  _, server, rows = _drive(tmp_path, rounds=6, every=2,
                           on_round=lambda i, r, summary: seen.append((i, r, summary['loss'])))
  assert float(server['w'][0]) == 21.0
  assert [r for _, r, _ in seen] == [4, 5, 6] and {row['round'] for row in rows} == {4, 5, 6}


def test_drive_catches_up_runs_resumed_at_different_rounds(tmp_path):
  calls = []

  def train_round(r, members, actives, states):
    calls.append((r, tuple(members)))
    return _train_round(r, members, actives, states)

  runs, states = [], []
  for i, start in enumerate((2, 0)):
    workdir = tmp_path / str(i)
    workdir.mkdir()
    if start:
      _drive(workdir, rounds=start, every=1)
    run, state, _ = _run(workdir, rounds=3, every=1)
    runs.append(run)
    states.append(state)
  driver.drive(runs, states, train_round, [_evaluate] * 2, [lambda row: None] * 2)
  assert calls == [(1, (1,)), (2, (1,)), (3, (0, 1))]
  for run in runs:
    run.ckpt.mngr.close()


def test_non_finite_parameters_stop_the_run(tmp_path):
  def train_round(r, members, actives, states):
    ((server, clients, metrics, active),) = _train_round(r, members, actives, states)
    return [({'w': server['w'] * jnp.nan}, clients, metrics, active)]

  run, state, _ = _run(tmp_path, rounds=2, every=1)
  with pytest.raises(FloatingPointError, match='round 1: the server model has non-finite'):
    driver.drive([run], [state], train_round, [_evaluate], [lambda row: None])
  run.ckpt.mngr.close()


def _reopen(workdir, rounds):
  run, state, _ = _run(workdir, rounds=rounds, every=1)
  return run, state


def test_select_takes_the_best_validation_round_and_restores_it(tmp_path):
  _drive(tmp_path, rounds=5, every=2)  # kept: 2 (the best, val 0.9) and 5 (the last)
  run, state = _reopen(tmp_path, 5)
  selection, server = driver.select(run, state, 'val')
  assert selection == {'rule': 'val', 'round': 2, 'last_round': 5}
  assert float(server['w'][0]) == 3.0  # 1 + 2: round 2's state, not the last one's (15)
  selection, server = driver.select(run, state, 'last')
  assert selection['round'] == 5 and server is state[0]
  models, info = driver.finish(run, state, 'frozen', 'val')
  assert float(models['server'][0][0]) == 3.0 and models['server'][1] == 'frozen'
  assert float(info['last'][0][0]) == 15.0 and info['selection']['round'] == 2
  with pytest.raises(ValueError, match='fl.select must be one of'):
    driver.selected_round(run.ckpt.mngr, 'best', 5)
  # A manager opened without the ranking (as --mode evaluate opens one) picks the same round.
  plain = checkpoint.manager(workdir_lib.checkpoints(tmp_path, workdir_lib.FL))
  assert driver.selected_round(plain, 'val', 5) == 2
  plain.close()


def test_select_ties_go_to_the_earliest_round_and_no_validation_means_last(tmp_path, monkeypatch):
  monkeypatch.setitem(VAL, 3, 0.9)  # rounds 2 and 3 tie
  _drive(tmp_path / 'tie', rounds=4, every=1)
  run, state = _reopen(tmp_path / 'tie', 4)
  assert driver.select(run, state, 'val')[0]['round'] == 2
  run.ckpt.mngr.close()

  def no_val(r, server):
    return {name: (test, {}) for name, (test, _) in _evaluate(r, server).items()}

  workdir = tmp_path / 'noval'
  workdir.mkdir()
  run, state, _ = _run(workdir, rounds=3, every=1)
  (state,) = driver.drive([run], [state], _train_round, [no_val], [lambda row: None])
  assert driver.select(run, state, 'val')[0]['round'] == 3
  run.ckpt.mngr.close()


def test_participation_and_eval_model():
  key = jax.random.key(3)
  assert driver.participation(0.5, key, 2, 4).sum() == 2
  with pytest.raises(ValueError, match=r'fl.participation must be in \(0, 1\]'):
    driver.participation(0.0, key, 1, 4)
  assert driver.eval_model_name('active_mean', {'server': 0}) == 'server'
  assert driver.eval_model_name('active_mean', {'server': 0, 'active_mean': 1}) == 'active_mean'
  with pytest.raises(ValueError, match='fl.eval_model must be one of'):
    driver.eval_model_name('best', {'server': 0})
