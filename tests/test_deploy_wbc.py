"""configs/wbc.py deployed on Flower: one SuperNode per real center of ../shared/data/wbc, each
reading only its own folder, TLS and node authentication on; 2 rounds equal the simulated study
of the same config (skipped when the images are absent; the 100-round study is
bench/deploy_study.py's, docs/performance.md)."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip('flwr')

from fedblood import data  # pylint: disable=g-import-not-at-top
from fedblood.deploy import credentials, local, wire  # pylint: disable=g-import-not-at-top
from fedblood.rundir import checkpoint, checkpoint_listing  # pylint: disable=g-import-not-at-top
from fedblood.study import experiment, train  # pylint: disable=g-import-not-at-top

REPO = Path(__file__).resolve().parents[1]
WBC = Path(os.environ.get('FEDBLOOD_WBC_ROOT') or REPO.parent / 'shared/data/wbc')
CONFIG = str(REPO / 'configs' / 'wbc.py')
SMALL = ('baselines.local_only=False baselines.pooled=False fl.rounds=2 data.image_size=32 '
         'model.width=0.0625')

pytestmark = [pytest.mark.skipif(not WBC.is_dir(), reason=f'{WBC} not found'), pytest.mark.slow]


def _fl_state(workdir: Path):
  step, state = checkpoint_listing.stored_state(workdir / 'checkpoints' / 'fl')
  return step, jax.tree.leaves(state)


def _rows(workdir: Path) -> list:
  rows = map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
  return [r for r in rows if r['stage'] == 'fl']


def test_real_centers_deployed_equal_simulated(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  ref = tmp_path / 'reference'
  overrides = f"{SMALL} data.root='{WBC}' reference.restore='{ref}'"
  config = wire.load_config(CONFIG, overrides)
  mngr = checkpoint.manager(ref)  # the seed's fresh init: equality needs no trained reference
  checkpoint.save(mngr, 0, {'params': experiment.build(config).init()}, {'kind': 'reference model'})
  mngr.close()
  names = [c.name for c in data.load_centers(config.data)]
  assert len(names) == 4
  overrides += ' data.centers=(' + ','.join(map(repr, names)) + ',)'  # the server has no images
  deployed, simulated = tmp_path / 'deployed', tmp_path / 'simulated'
  with local.Federation(tmp_path / 'fed', tls=True, auth=True) as fed:
    fed.start_superlink()
    for name in names:
      own = tmp_path / 'site_data' / name  # this site's data-root holds its own center only
      own.mkdir(parents=True)
      (own / name).symlink_to(WBC / name)
      private, public = credentials.make_node_key(fed.root, name)
      fed.register(public)
      fed.start_supernode(name, {'center': name, 'state-dir': str(tmp_path / 'sites' / name),
                                 'data-source': 'folder', 'data-root': str(own),
                                 'cache-dir': str(tmp_path / 'sites' / name / 'cache')},
                          key=private)
    out = fed.run({'config': CONFIG, 'overrides': overrides, 'workdir': str(deployed),
                   'connect-timeout': 300.0, 'round-timeout': 300.0}, timeout=900)
  assert out['status'] == 'finished:completed', out['log'][-3000:]
  train.run(wire.load_config(CONFIG, overrides), simulated)
  (step_d, dep), (step_s, sim) = _fl_state(deployed), _fl_state(simulated)
  assert step_d == step_s == 2 and len(dep) == len(sim) > 0
  for a, b in zip(sim, dep):  # the same bits, not merely close
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _rows(deployed) == _rows(simulated) and len(_rows(deployed)) == 2 * 4
  res_d, res_s = (json.loads((w / 'results.json').read_text()) for w in (deployed, simulated))
  for key in ('centers', 'before', 'after', 'after_models', 'after_last', 'selection',
              'confusion', 'train_sizes'):
    assert res_d[key] == res_s[key], key
  log = (deployed / 'deploy.log').read_text()
  assert all(f"center '{n}'" in log or f'center {n!r}' in log for n in names), log[-2000:]
