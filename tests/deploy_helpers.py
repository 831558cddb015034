"""Shared by the site tests: the server's requests to a site, built as the server builds them."""

import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from fedblood.deploy import study, wire

CONFIG = str(Path(__file__).resolve().parents[1] / 'configs' / 'demo.py') + ':smoke'
# 3 tiny centers (44 / 26 / 20 training images), VGG16 at width 1/16, 32 px.
TINY = ('baselines.local_only=False baselines.pooled=False model.width=0.0625 '
        'data.synthetic.images_per_center=(60,40,30)')


def message(kind: str, config, study_id: str, with_state: bool = True, **fields) -> Message:
  """The server's ``kind`` request to center synth1 (index 1), with the seed's fresh state."""
  request = {'config': wire.config_json(config), 'study': study_id, 'center': 'synth1',
             'index': 1, 'round': 1, 'nmax': 44, 'committed': 0, 'weight': 0.3,
             'evaluate': '[]', **fields}
  content = RecordDict({'request': ConfigRecord(request)})
  if with_state:
    fresh = wire.config_from_json(wire.config_json(config))
    fresh.model.pretrained = ''  # the server's weights file (not made here)
    st = study.build(fresh)
    trainable, frozen = st.experiment.split(st.experiment.init())
    server, _ = st.algorithm.init(trainable, len(st.centers))
    content['server'], content['frozen'] = wire.to_record(server), wire.to_record(frozen)
  # As the node receives it from the SuperLink (which sets the message id).
  return Message(content, metadata=Metadata(
      run_id=1, message_id=f'{kind}-1', src_node_id=1, dst_node_id=7, reply_to_message_id='',
      group_id='1', created_at=time.time(), ttl=600.0, message_type=kind))


def context(node_config: dict) -> Context:
  return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
