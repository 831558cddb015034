"""A site trusts nothing from the server: its ClientApp called with real Flower messages.

No Flower processes: each test builds the server's request as :mod:`fedblood.deploy.server`
does (Flower's ``Message`` and records) and calls :mod:`fedblood.deploy.client_app`'s
handlers, relayed to the site's warm worker or answered in this process (``worker='off'``);
what a site may change on disk is checked by listing the whole tree before and after.
"""

import json
import os
from pathlib import Path

import pytest

pytest.importorskip('flwr')

# pylint: disable=g-import-not-at-top
from flwr.app import Context, RecordDict

from fedblood.deploy import client_app, local, relay, server_app, site, trust, wire
from fedblood.rundir import lock
from deploy_helpers import CONFIG, TINY, context, message
# pylint: enable=g-import-not-at-top

README = Path(__file__).resolve().parents[1] / 'README.md'


def _tree(root: Path) -> dict:
  """``{relative path: (size, mtime_ns)}`` of every file and folder under ``root``.

  Lock files and the worker's log aside: every message takes the state dir's lock, which
  rewrites ``run.lock``, and the site worker logs what it ignored in ``worker.log``.
  """
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + [f for f in files if f not in ('run.lock', 'worker.log')]:
      path = Path(folder) / name
      stat = path.lstat()
      out[str(path.relative_to(root))] = (stat.st_size if name in files else 0, stat.st_mtime_ns)
  return out


def _outside(tree: dict, *inside: str) -> dict:
  return {p: v for p, v in tree.items() if not any(p == d or p.startswith(d + '/') for d in inside)}


@pytest.fixture(params=['on', 'off'])
def hostile(tmp_path, request):
  """A config whose every path names the server's machine (here: other folders of tmp_path)."""
  config = wire.load_config(CONFIG, TINY)
  config.data.root = str(tmp_path / 'server_data')
  config.data.cache_dir = str(tmp_path / 'server_cache')
  config.reference.restore = str(tmp_path / 'server_reference')
  config.model.pretrained = str(tmp_path / 'server_weights.npz')
  node = {'center': 'synth1', 'state-dir': str(tmp_path / 'site'),
          'cache-dir': str(tmp_path / 'site_cache'), 'worker': request.param}
  yield config, node
  local.kill_worker(tmp_path / 'site')


@pytest.mark.parametrize('study_id', ['../x', '/abs', 'a/../../b', '..', '', '0123456789abcdef/..',
                                      '0123456789ABCDEF', '0123456789abcdef0'])
@pytest.mark.parametrize('kind', ['train', 'evaluate'])
def test_a_bad_study_id_is_refused_and_nothing_changes(tmp_path, hostile, study_id, kind):
  config, node = hostile
  (tmp_path / 'abs').mkdir()
  before = _tree(tmp_path)
  handler = getattr(client_app, kind)
  with pytest.raises(site.SiteError, match='refused the server\'s request: study id'):
    handler(message(kind, config, study_id, with_state=False), context(node))
  assert _tree(tmp_path) == before  # not even the state dir is created


def test_study_ids_the_server_makes_are_accepted_inside_the_state_dir_only(tmp_path):
  config = wire.load_config(CONFIG, TINY)
  study_id = wire.study_id(config, tmp_path / 'server')
  assert relay.check_study_id(study_id) is None
  assert trust.study_dir(tmp_path, study_id) == tmp_path.resolve() / study_id
  with pytest.raises(site.SiteError, match='is not'):
    trust.study_dir(tmp_path, 'a\0b')
  (tmp_path / study_id).symlink_to(tmp_path.parent)  # a study folder elsewhere
  with pytest.raises(site.SiteError, match='outside the state dir'):
    trust.study_dir(tmp_path, study_id)


def test_server_chosen_paths_are_replaced_by_the_sites_own(tmp_path, hostile, caplog):
  config, node = hostile
  mine = trust.site_config(wire.config_from_json(wire.config_json(config)), node)
  assert (mine.data.root, mine.data.cache_dir) == ('', node['cache-dir'])
  assert (mine.reference.restore, mine.model.pretrained) == ('', '')
  mine = trust.site_config(wire.config_from_json(wire.config_json(config)),
                           {**node, 'data-root': str(tmp_path / 'own'), 'data-source': 'folder'})
  assert (mine.data.source, mine.data.root) == ('folder', str(tmp_path / 'own'))
  config.data.source = 'folder'  # the server's folder, and none of the site's own
  with pytest.raises(site.SiteError, match='node config needs data-root'):
    trust.site_config(wire.config_from_json(wire.config_json(config)), node)


def test_a_query_reads_and_writes_only_the_sites_folders(tmp_path, hostile):
  config, node = hostile
  before = _tree(tmp_path)
  reply = client_app.query(message('query', config, wire.study_id(config, tmp_path),
                                    with_state=False), context(node))
  assert dict(reply.content['site'])['center'] == 'synth1'
  after = _tree(tmp_path)
  assert _outside(after, 'site', 'site_cache') == before
  assert any(p.startswith('site_cache/') for p in after)  # the site's own data cache


def test_train_writes_only_the_state_dir_and_never_another_studys_state(tmp_path, hostile):
  config, node = hostile
  study_id = wire.study_id(config, tmp_path / 'server')
  client_app.query(message('query', config, study_id, with_state=False), context(node))
  before = _tree(tmp_path)
  reply = client_app.train(message('train', config, study_id), context(node))
  assert 'params' in reply.content and reply.content['train']['num-examples'] == 26
  after = _tree(tmp_path)
  assert _outside(after, 'site') == _outside(before, 'site')
  steps = tmp_path / 'site' / study_id / 'client_state'
  assert sorted(p.name for p in steps.iterdir() if p.name.isdigit()) == ['1']
  record = json.loads((tmp_path / 'site' / study_id / 'study.json').read_text())
  assert record['center'] == 'synth1'

  # Another study's config under this study's id, asking to start over (committed=0 would
  # delete round 1): refused, nothing touched.
  other = wire.config_from_json(wire.config_json(config))
  other.fl.lr = 0.5
  before = _tree(tmp_path)
  with pytest.raises(site.SiteError, match='config_sha256'):
    client_app.train(message('train', other, study_id, round=2), context(node))
  assert _tree(tmp_path) == before

  # Fields the site knows better than the server: its index, the rounds.
  for fields, what in (({'index': 0}, 'index 0'), ({'committed': 1}, 'committed 1'),
                       ({'round': 0}, 'round 0')):
    with pytest.raises(site.SiteError, match=what):
      client_app.train(message('train', config, study_id, **fields), context(node))
  assert _tree(tmp_path) == before


def test_two_sites_on_one_state_dir_are_refused(tmp_path):
  config = wire.load_config(CONFIG, TINY)
  node = {'center': 'synth1', 'state-dir': str(tmp_path / 'site'),
          'cache-dir': str(tmp_path / 'cache'), 'worker': 'off'}  # one process per message
  query = lambda n: client_app.query(message('query', config, wire.study_id(config, tmp_path),
                                              with_state=False), context(n))
  query(node)
  with lock.hold(tmp_path / 'site'):  # another SuperNode's ClientApp at work on it
    with pytest.raises(site.SiteError, match='is in use by another process'):
      query(node)
  with pytest.raises(site.SiteError, match="records {'center': 'synth1'}"):
    query({**node, 'center': 'synth2'})  # a second SuperNode given the same state dir
  query(node)  # the lock was released: the site answers again


def test_two_servers_on_one_workdir_are_refused(tmp_path):
  workdir = tmp_path / 'server'
  server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                           run_config={'config': CONFIG, 'overrides': TINY,
                                       'workdir': str(workdir)})
  with lock.hold(workdir):  # the first server's run
    before = _tree(tmp_path)
    with pytest.raises(lock.WorkdirBusy, match=f'PID {os.getpid()}'):
      server_app.main(None, server_context)  # refused before it touches the grid or the workdir
    assert _tree(tmp_path) == before


def test_the_loopback_federation_has_telemetry_off_and_its_scripts_first_on_path(tmp_path,
                                                                               monkeypatch):
  monkeypatch.setenv('FLWR_TELEMETRY_ENABLED', '1')
  monkeypatch.setenv('PATH', '/usr/bin:/bin')  # a virtualenv that is not activated
  env = local.Federation(tmp_path).env
  assert env['FLWR_TELEMETRY_ENABLED'] == '0'
  first = Path(env['PATH'].split(os.pathsep)[0])
  assert (first / 'flower-superexec').exists() and (first / 'flwr').exists()


def test_the_readme_turns_telemetry_off_for_every_flower_command():
  text = README.read_text()
  section = text[text.index('## Run across hospitals'):]
  section = section[:section.index('\n## ', 1)]
  assert 'export FLWR_TELEMETRY_ENABLED=0' in section
  assert section.index('export FLWR_TELEMETRY_ENABLED=0') < section.index('flower-superlink')


def test_the_loopback_federation_picks_ports_no_outgoing_connection_can_take():
  low = int(Path('/proc/sys/net/ipv4/ip_local_port_range').read_text().split()[0])
  for _ in range(20):
    port = local.free_port()
    assert 1024 <= port < low  # below the kernel's ephemeral range
