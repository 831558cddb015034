"""The deployed server's exchange with its sites, against a grid that refuses pushes.

The SuperLink refuses the objects of a push session that a second push of the same messages
replaced (Flower's client resends a request that timed out); the server pushes the same
messages again rather than failing the run. The grid here is a stand-in for Flower's
``HttpGrid`` that raises Flower's own ``ObjectPushError`` a set number of times.
"""

import pytest

pytest.importorskip('flwr')

# pylint: disable=g-import-not-at-top
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError
from flwr.supercore.task_identity import TaskIdentity

from fedblood.deploy import sites
# pylint: enable=g-import-not-at-top


class RefusingGrid:
  """Refuses the first ``refusals`` pushes; records every push's message IDs."""

  def __init__(self, refusals: int):
    self.refusals, self.pushes = refusals, []

  def push_messages(self, msgs):
    ids = []
    for m in msgs:  # as HttpGrid.push_messages: the ID is the message's content hash
      m.metadata.__dict__['_message_id'] = m.object_id
      ids.append(m.metadata.message_id)
    self.pushes.append(ids)
    if len(self.pushes) <= self.refusals:
      raise ObjectPushError('0' * 64, 1, f'session-{len(self.pushes)}')
    return ids

  def pull_messages(self, ids):
    del ids
    return []


@pytest.fixture(autouse=True)
def server_app_identity(monkeypatch):
  """The ServerApp process's run, which a Message made there takes."""
  monkeypatch.setattr(TaskIdentity, '_run_id', 1)
  monkeypatch.setattr(TaskIdentity, '_node_id', SUPERLINK_NODE_ID)
  monkeypatch.setattr(TaskIdentity, '_task_id', 1)


def _messages(n):
  return [Message(RecordDict({'request': ConfigRecord({'center': f'c{k}'})}), dst_node_id=k + 1,
                  message_type='evaluate', ttl=60.0) for k in range(n)]


def test_a_refused_push_is_pushed_again_with_the_same_messages_and_logged(tmp_path):
  grid = RefusingGrid(refusals=sites.PUSH_TRIES - 1)
  s = sites.Sites(grid, None, {}, tmp_path, timeout=0.0)
  s.node_of = {'c0': 1, 'c1': 2}
  msgs = _messages(2)
  assert s._exchange('evaluate', msgs) == []  # pylint: disable=protected-access
  assert len(grid.pushes) == sites.PUSH_TRIES
  assert all(p == grid.pushes[0] for p in grid.pushes)  # the same requests, not new ones
  assert s.unanswered == {1, 2}  # then it waits for their replies as usual
  log = (tmp_path / 'deploy.log').read_text().splitlines()
  again = [l for l in log if 'pushing the same 2 requests again' in l]
  assert len(again) == sites.PUSH_TRIES - 1 and all('evaluate: ' in l for l in again)


def test_a_push_refused_every_time_fails_the_exchange(tmp_path):
  grid = RefusingGrid(refusals=sites.PUSH_TRIES)
  s = sites.Sites(grid, None, {}, tmp_path, timeout=0.0)
  with pytest.raises(ObjectPushError):
    s._exchange('train', _messages(1))  # pylint: disable=protected-access
  assert len(grid.pushes) == sites.PUSH_TRIES
