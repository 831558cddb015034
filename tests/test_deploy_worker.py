"""The site's warm worker: answers as a fresh process would, bit for bit, and recovers.

Each test drives :mod:`fedblood.deploy.client_app`'s handlers with the server's requests (no
Flower processes) and compares the relayed answers with those of ``worker='off'`` (one
process per message, the reference) on a second state dir.
"""

import json
import os
import signal
import stat

import numpy as np
import pytest

pytest.importorskip('flwr')

# pylint: disable=g-import-not-at-top
from deploy_helpers import CONFIG, TINY, context, message
from fedblood.deploy import client_app, local, relay, wire
from fedblood.rundir import lock
# pylint: enable=g-import-not-at-top


@pytest.fixture
def sites(tmp_path):
  """Two node configs of center synth1: a warm worker's, and one answering in-process."""
  nodes = {mode: {'center': 'synth1', 'state-dir': str(tmp_path / mode),
                  'cache-dir': str(tmp_path / 'cache'), 'worker': mode} for mode in ('on', 'off')}
  yield nodes
  local.kill_worker(tmp_path / 'on')


def _arrays(record) -> dict:
  return {name: record[name].numpy() for name in record.keys()}


def _train(node, config, study_id, r: int) -> dict:
  reply = client_app.train(message('train', config, study_id, round=r, committed=r - 1,
                                   evaluate='["server"]'), context(node))
  return {'params': _arrays(reply.content['params']), 'state': _arrays(reply.content['state']),
          'train': dict(reply.content['train']), 'eval': reply.content['eval']['json']}


def _same(a: dict, b: dict) -> None:
  assert a['train'] == b['train'] and a['eval'] == b['eval']
  for part in ('params', 'state'):
    assert a[part].keys() == b[part].keys()
    for name in a[part]:
      np.testing.assert_array_equal(a[part][name], b[part][name], err_msg=f'{part}/{name}')


def test_the_warm_worker_answers_as_a_fresh_process_and_survives_its_death(tmp_path, sites):
  config = wire.load_config(CONFIG, TINY)  # FedDyn: each round reads the last one's client state
  study_id = wire.study_id(config, tmp_path / 'server')
  state_dir = tmp_path / 'on'
  for r in (1, 2):
    _same(_train(sites['on'], config, study_id, r), _train(sites['off'], config, study_id, r))
  first = local.worker_pid(state_dir)
  assert first is not None and first != os.getpid()

  # Only the site's user can reach it: the key is 0600, the socket's folder 0700, and the
  # worker holds the state dir for its whole life.
  info = json.loads((state_dir / relay.INFO).read_text())
  assert stat.S_IMODE((state_dir / relay.KEY).stat().st_mode) == 0o600
  assert stat.S_IMODE(os.stat(os.path.dirname(info['address'])).st_mode) == 0o700
  with pytest.raises(lock.WorkdirBusy):
    with lock.hold(state_dir):
      pass

  # A ClientApp that dies mid-request: the worker answers into a closed connection, lives on.
  conn = relay._connect(state_dir)  # pylint: disable=protected-access
  conn.send({'kind': 'query', 'request': {}, 'server': None, 'frozen': None,
             'node_config': sites['on']})
  conn.close()
  _same(_train(sites['on'], config, study_id, 3), _train(sites['off'], config, study_id, 3))
  assert local.worker_pid(state_dir) == first

  # A killed worker: the next message starts another, which finds round 3's state on disk.
  os.kill(first, signal.SIGKILL)
  _same(_train(sites['on'], config, study_id, 4), _train(sites['off'], config, study_id, 4))
  assert local.worker_pid(state_dir) not in (None, first)


def test_a_refusal_comes_back_from_the_worker_as_the_sites_error(tmp_path, sites):
  config = wire.load_config(CONFIG, TINY)
  study_id = wire.study_id(config, tmp_path / 'server')
  node = {**sites['on'], 'center': 'nowhere'}
  with pytest.raises(relay.SiteError, match="center='nowhere' is not a center of this study"):
    client_app.query(message('query', config, study_id, with_state=False), context(node))
