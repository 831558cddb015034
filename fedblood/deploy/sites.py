"""The deployed server's sites: which node answers for which center, and ``deploy.log``."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError


# Seconds between the server's pulls for replies (Flower's own send_and_receive sleeps 3 s
# between pulls, which a round would wait on).
POLL_S = 0.05
# A request outlives the server's wait by this much, so that the server's own deadline, not
# the message's expiry, decides that a site did not answer (and deploy.log says so).
TTL_MARGIN_S = 30.0
# Pushes of one batch of requests before the exchange gives up (see ``Sites.push``).
PUSH_TRIES = 3


def note(workdir: Path, text: str) -> None:
  """A line in ``deploy.log`` and on stdout (Flower streams it to ``flwr run --stream``)."""
  now = time.time()
  stamp = time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now)) + f'.{int(now % 1 * 1000):03d}Z'
  line = f'{stamp} {text}'
  print(f'fedblood: {text}', flush=True)
  with open(workdir / 'deploy.log', 'a') as f:
    f.write(line + '\n')


class Sites:
  """Which node answers for which center; asks new nodes who they are."""

  def __init__(self, grid, st, base_request: dict, workdir: Path, timeout: float):
    self.grid, self.st, self.base, self.workdir, self.timeout = (
        grid, st, base_request, workdir, timeout)
    self.node_of, self.sizes = {}, {}
    self.unanswered = set()  # nodes the last exchange waited for in vain (hung or gone)

  def center_of(self, node_id):
    return {n: c for c, n in self.node_of.items()}.get(node_id)

  def send(self, kind: str, payloads: dict, content: dict) -> dict:
    """Sends ``kind`` to ``{node_id: request fields}``; returns ``{node_id: reply}`` (no errors)."""
    msgs = [Message(RecordDict({'request': ConfigRecord({**self.base, **fields}), **content}),
                    dst_node_id=node, message_type=kind, ttl=self.timeout + TTL_MARGIN_S)
            for node, fields in payloads.items()]
    replies = self._exchange(kind, msgs)
    # An error the SuperLink writes (e.g. the node stopped its heartbeat) comes from the
    # SuperLink, not the node: name the node the request went to.
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    out = {}
    for reply in replies:
      node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
      who = f'node {node} (center {self.center_of(node)!r})'
      if reply.has_error():
        note(self.workdir, f'{kind}: {who} failed: {reply.error.reason}')
      elif 'site' not in reply.content:
        note(self.workdir, f'{kind}: refused the reply of {who}: no site record')
      else:
        out[node] = reply
    return out

  def _exchange(self, kind: str, msgs: list) -> list:
    """Pushes ``msgs`` and pulls their replies until all came or ``timeout`` passed.

    A node that has not answered by then is left out of this exchange (logged); its late
    reply is never read, as later pulls ask for later messages' replies only.
    """
    if not msgs:
      return []
    ids = set(self.push(kind, msgs))
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    deadline, out = time.time() + self.timeout, []
    while ids:
      got = list(self.grid.pull_messages(ids))
      out += got
      ids -= {m.metadata.reply_to_message_id for m in got}
      if not ids or time.time() > deadline:
        break
      time.sleep(POLL_S)
    self.unanswered = {dst.get(i) for i in ids}
    if ids:
      late = sorted(f'node {dst.get(i)} (center {self.center_of(dst.get(i))!r})' for i in ids)
      note(self.workdir, f'{kind}: no reply within {self.timeout:.0f} s from {", ".join(late)}: '
                         'left out of this exchange')
    return out

  def push(self, kind: str, msgs: list) -> list:
    """``grid.push_messages(msgs)``, pushed again when the SuperLink refuses one of its objects.

    The SuperLink keeps a push session per batch and refuses the objects of a session that
    another push of the same messages replaced: the Flower client resends a request that timed
    out (30 s, on a loaded machine), and when the first copy lands last, the session the client
    holds is gone (``ObjectPushError``). A message's ID is its content's hash and the SuperLink
    stores a known message once, so pushing the same messages again opens a fresh session for
    the same requests: no site gets a request twice.
    """
    attempt = 1
    while True:
      try:
        return list(self.grid.push_messages(msgs))
      except ObjectPushError as e:
        if attempt == PUSH_TRIES:
          raise
        note(self.workdir, f'{kind}: the SuperLink refused a pushed object ({e}); pushing the '
                           f'same {len(msgs)} requests again ({attempt}/{PUSH_TRIES - 1})')
        attempt += 1

  def evaluate(self, names, content: dict, models) -> dict:
    """``{center: {model: {split: metrics}}}`` from the connected sites of ``names``."""
    requests = {self.node_of[c]: {'center': c, 'evaluate': json.dumps(list(models))}
                for c in names if c in self.node_of}
    return self.evals(self.send('evaluate', requests, content) if requests else {})

  def evals(self, replies: dict) -> dict:
    """The evaluations ``{node: reply}`` carry, by center (empty ones left out)."""
    out = {}
    for node, reply in replies.items():
      center = self.center_of(node)
      if center is None or reply.content['site']['center'] != center or \
          'eval' not in reply.content:
        continue
      evaluation = json.loads(reply.content['eval']['json'])
      if evaluation:
        out[center] = evaluation
    return out

  def refresh(self, content: dict | None = None, models=()) -> dict:
    """Asks nodes not yet known for their center; returns ``{center: eval JSON}`` if asked."""
    ids = set(self.grid.get_node_ids())
    self.node_of = {c: n for c, n in self.node_of.items() if n in ids}
    new = ids - set(self.node_of.values())
    fields = {'evaluate': json.dumps(list(models))}
    replies = self.send('query', {n: fields for n in new}, content or {})
    evals = {}
    for node, reply in replies.items():
      site = dict(reply.content['site'])
      center, size = site.get('center'), site.get('train_size')
      if center not in self.st.centers:
        note(self.workdir, f'query: refused node {node}: center {center!r} is not in the study '
                           f'{self.st.centers}')
        continue
      if self.sizes.get(center, size) != size:
        note(self.workdir, f'query: refused node {node} for center {center!r}: it reports '
                           f'{size} training images, the study has {self.sizes[center]}')
        continue
      if center in self.node_of and self.node_of[center] in ids:
        note(self.workdir, f'query: refused node {node} for center {center!r}: node '
                           f'{self.node_of[center]} answers for it and is still connected')
        continue
      self.node_of[center], self.sizes[center] = node, int(size)
      note(self.workdir, f'node {node} is center {center!r} ({size} training images)')
      if 'eval' in reply.content:
        evals[center] = json.loads(reply.content['eval']['json'])
    return evals
