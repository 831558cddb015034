"""What the server takes from a site's train reply, each part checked before it is used.

A site's reply is trusted no more than a site trusts the server's request: the update's trees
are checked against the server's own templates (:func:`fedblood.deploy.wire.check_tree`), the
metrics must be finite, and a DP site's privacy report must be numbers in range
(:func:`fedblood.deploy.site_privacy.check_report`). A reply that fails is refused whole.
"""

import json

import numpy as np

from fedblood.deploy import site_privacy
from fedblood.deploy import wire


def problem(st, reply) -> str | None:
  """Why the train reply cannot be used, or None."""
  content = reply.content
  for name, template in (('params', st.trainable), ('state', st.client)):
    reason = wire.check_tree(content.get(name), template, name)
    if reason:
      return reason
  record = content.get('train')
  if record is None:
    return 'train metrics: missing'
  values = dict(record)
  if not all(np.isfinite(float(v)) for v in values.values()):
    return f'train metrics: non-finite values {values}'
  return _privacy_problem(content)


def _privacy_problem(content) -> str | None:
  if 'privacy' not in content:
    return None
  try:
    report = json.loads(content['privacy']['json'])
  except (KeyError, TypeError, ValueError):
    return 'privacy: not JSON'
  return site_privacy.check_report(report)


def outputs(st, reply) -> tuple:
  """``(local params, client state, metrics)`` of a reply :func:`problem` passed."""
  values = dict(reply.content['train'])
  round_metrics = {m: (np.int32 if m == 'num_steps' else np.float32)(v)
                   for m, v in values.items() if m != 'num-examples'}
  return (wire.from_record(reply.content['params'], st.trainable),
          wire.from_record(reply.content['state'], st.client), round_metrics)


def declined(reply) -> str | None:
  """The reason a site gave for not training (its privacy budget), or None."""
  record = reply.content.get('declined')
  return None if record is None else str(dict(record).get('reason', ''))[:500]


def privacy(reply) -> dict | None:
  """The site's privacy report (checked), or None if it sent none or a malformed one."""
  content = reply.content
  if 'privacy' not in content or _privacy_problem(content):
    return None
  return json.loads(content['privacy']['json'])
