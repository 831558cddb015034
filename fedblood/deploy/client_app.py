"""fedblood's Flower ``ClientApp``: a site answering the server (see :mod:`fedblood.deploy.site`).

A site runs one SuperNode with its node config::

  flower-supernode --superlink <server>:<port> --root-certificates ca.crt \\
      --auth-supernode-private-key site.key --port 9094 \\
      --node-config "center='synth1' state-dir='/srv/fb' data-source='folder' data-root='/data'"

The ClientApp process only relays each message to the site's warm worker (one process per
state dir, started on first use: :mod:`fedblood.deploy.relay`, :mod:`fedblood.deploy.worker`);
``worker='off'`` in the node config answers in the ClientApp process instead, paying the
start-up (JAX, the study, tracing, the center, the client state) on every message.
Importing this module imports neither JAX nor the site's code.

Every folder the site reads or writes comes from that node config (``state-dir``,
``data-root``, ``cache-dir``), never from the server's request
(:func:`fedblood.deploy.trust.site_config`).

Message contents (all typed records, nothing pickled):

* request: ``ConfigRecord 'request'`` (config JSON, study id, center, index, round,
  committed, weight, nmax, models to evaluate), ``ArrayRecord 'server'`` (the server
  state), ``ArrayRecord 'frozen'`` (the frozen params); a bare query has the first only.
* reply: ``ConfigRecord 'site'`` (center and split sizes), ``ConfigRecord 'eval'`` (JSON
  metrics), and for ``train`` ``ArrayRecord 'params'`` / ``'state'`` and ``MetricRecord
  'train'`` (loss, accuracy, num_steps, num-examples); under ``fl.dp`` ``ConfigRecord
  'privacy'`` (JSON: the site's epsilon, :mod:`fedblood.deploy.site_privacy`), and
  ``ConfigRecord 'declined'`` (its reason) instead of the update when the site's budget is spent.
"""

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedblood.deploy import relay

app = ClientApp()


def _answer(kind: str, msg: Message, context: Context) -> Message:
  content = msg.content
  request = dict(content['request'])
  args = kind, request, content.get('server'), content.get('frozen'), context.node_config
  if str(context.node_config.get('worker', 'on')) == 'off':
    from fedblood.deploy import site  # pylint: disable=g-import-not-at-top  (JAX)
    out = site.records(site.handle(*args))
  else:
    out = relay.call(*args)
  reply = RecordDict({'site': ConfigRecord(out['site'])})
  for key in ('eval', 'privacy'):
    if key in out:
      reply[key] = ConfigRecord({'json': json.dumps(out[key])})
  if 'declined' in out:
    reply['declined'] = ConfigRecord({'reason': out['declined']})
  if 'params' in out:
    reply['params'] = out['params']
    reply['state'] = out['state']
    reply['train'] = MetricRecord({**out['train'], 'num-examples': out['site']['train_size']})
  return Message(reply, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
  return _answer('query', msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
  return _answer('train', msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
  return _answer('evaluate', msg, context)
