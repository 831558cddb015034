"""What a site takes from the server and what it refuses: the trust rules of a site.

A site trusts nothing the server sends beyond the study's numbers:

* every file or folder it reads or writes comes from its own node config: the config
  fields naming one (:data:`PATH_FIELDS`: ``data.root``, ``data.cache_dir``,
  ``model.pretrained``, ``reference.restore``) are replaced by the node config's value or
  emptied, whatever the server sent (logged when they differed). Overriding rather than
  refusing is what lets the server's config name its own machine's folders and the
  deployed run still equal the simulated one; ``data.source`` (a format, not a folder) is
  the node config's ``data-source`` when set, else the study's;
* the study id names a folder in the state dir only if it is a study id
  (:data:`fedblood.deploy.relay.STUDY_ID`) that resolves to a direct child of the state
  dir; the folder records the digest of the config that made it (``study.json``), so a
  request carrying another study's id with another config is refused and touches nothing;
* the center index, round and ``committed`` are checked against the site's own study
  (:mod:`fedblood.deploy.site`);
* one process at a time holds the state dir (:func:`fedblood.rundir.lock.hold`, ``run.lock``),
  and the state dir belongs to one center (``site.json``): a second SuperNode on the same
  state dir is refused.
"""

import json
import os
from pathlib import Path

from absl import logging

from fedblood.deploy.relay import SiteError, check_study_id


# Config fields naming a file or folder: ``{field: the node config key a site takes it from}``
# (None: never read on a site, always emptied there).
PATH_FIELDS = {'data.root': 'data-root', 'data.cache_dir': 'cache-dir',
               'model.pretrained': None, 'reference.restore': None}


def site_config(config, node_config):
  """The server's ``config`` with every :data:`PATH_FIELDS` entry the site's own (in place).

  Each path field becomes the node config's value (``''``, the loaders' default, when the
  node config has none); a server value that differs is logged and ignored. ``data.source``
  is the node config's ``data-source`` when set.

  Raises:
    SiteError: ``data.source='folder'`` without a ``data-root`` in the node config.
  """
  for field, key in PATH_FIELDS.items():
    group, name = field.split('.')
    if group not in config or name not in config[group]:
      continue
    sent = str(config[group][name] or '')
    own = str(node_config.get(key, '')) if key else ''
    if sent and sent != own:
      logging.warning('ignored the server\'s %s=%r: this site takes it from its node config '
                      '(%s)', field, sent, f'{key}={own!r}' if key else 'never read here')
    config[group][name] = own
  if 'data-source' in node_config:
    config.data.source = str(node_config['data-source'])
  if config.data.source == 'folder' and not config.data.root:
    raise SiteError('data.source=\'folder\': the node config needs data-root=\'<folder holding '
                    '<center>/<class>/<images>>\' (a site never reads a folder the server names)')
  return config


def study_dir(state_dir: Path, study) -> Path:
  """``<state-dir>/<study>``, resolved, if ``study`` is a study id naming a child of it.

  Raises:
    SiteError: naming the id, for anything else (``..``, a separator, an absolute path).
  """
  reason = check_study_id(study)
  root = state_dir.resolve()
  path = None if reason else (root / study).resolve()
  if path is not None and path.parent != root:  # (a symlink the site's admin made)
    reason = f'study id {study!r} resolves to {path}, outside the state dir {root}'
  if reason:
    raise SiteError(f'refused the server\'s request: {reason}')
  return path


def write_json(path: Path, data: dict) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(data, sort_keys=True) + '\n')
  os.replace(tmp, path)


def claim(path: Path, data: dict, what: str) -> None:
  """Writes ``data`` to ``path`` on first use; refuses when ``path`` records other values."""
  if path.exists():
    held = json.loads(path.read_text())
    differ = {k: (held.get(k), v) for k, v in data.items() if held.get(k) != v}
    if differ:
      raise SiteError(f'{what}: {path} records {({k: a for k, (a, _) in differ.items()})}, this '
                      f'request has {({k: b for k, (_, b) in differ.items()})}; refused, nothing '
                      'touched')
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  write_json(path, data)
