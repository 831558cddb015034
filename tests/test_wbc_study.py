"""The wbc study's smoke variant end to end on the real centers (skipped when they are absent).

One run of ``configs/wbc.py:smoke`` (32 px, VGG16 at width 1/8, 2 reference epochs, 2 FedDyn
rounds, 1-epoch baselines) on ../shared/data/wbc, with its TFDS cache in the test's tmp dir;
the tests read its outputs. About a minute on 2 CPU cores.
"""

import json
import math
import os
from pathlib import Path

import pytest

from configs import wbc
from fedblood import data
from fedblood.study import inference, train

WBC = Path(os.environ.get('FEDBLOOD_WBC_ROOT')
           or Path(__file__).resolve().parents[1].parent / 'shared/data/wbc')
CENTERS = ['pbc_barcelona', 'bccd', 'jtsc_jiangxi_tecom', 'lisc_tehran']  # reference first
METRICS = ('accuracy', 'balanced_accuracy', 'precision', 'recall', 'specificity', 'f1')

pytestmark = [pytest.mark.skipif(not WBC.is_dir(), reason=f'{WBC} not found'), pytest.mark.slow]


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  """``(config, workdir, results, centers)`` of one finished smoke run."""
  config = wbc.get_config('smoke')
  config.data.root = str(WBC)
  config.data.cache_dir = str(tmp_path_factory.mktemp('tfds'))  # never beside the images
  workdir = tmp_path_factory.mktemp('wbc_smoke')
  results = train.run(config, workdir)
  return config, workdir, results, data.load_centers(config.data)


def _check_center_metrics(per_center, centers, where):
  assert sorted(per_center) == sorted(c.name for c in centers), where
  for c in centers:
    m = per_center[c.name]
    assert m['n'] == len(c.test.labels), (where, c.name)
    for key in METRICS:
      assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0, (where, c.name, key, m[key])


def test_results_cover_every_center(study):
  config, workdir, results, centers = study
  on_disk = json.loads((workdir / 'results.json').read_text())
  assert on_disk['centers'] == CENTERS == [c.name for c in centers]
  assert on_disk['reference'] == config.data.reference == 'pbc_barcelona'
  assert on_disk['algorithm'] == 'fed_dyn' and on_disk['rounds'] == config.fl.rounds == 2
  _check_center_metrics(on_disk['before'], centers, 'before')
  _check_center_metrics(on_disk['after'], centers, 'after')
  # FedDyn has two models; both are evaluated and the reported one is named.
  assert sorted(on_disk['after_models']) == ['active_mean', 'server']
  assert on_disk['after'] == on_disk['after_models'][on_disk['eval_model']]
  # configs/wbc.py trains every baseline from scratch and from the reference (baselines.init).
  assert list(on_disk['baselines']) == ['local_only_scratch', 'local_only_reference',
                                        'pooled_scratch', 'pooled_reference']
  for name, per_center in on_disk['baselines'].items():
    _check_center_metrics(per_center, centers, name)
  # The reference model IS local-only training (from the reference) at the reference center.
  assert (on_disk['baselines']['local_only_reference']['pbc_barcelona']
          == on_disk['before']['pbc_barcelona'])
  assert on_disk['train_sizes'] == {c.name: len(c.train.labels) for c in centers}
  assert results['after'] == on_disk['after']


def test_a_site_folder_is_read_with_its_own_crop(study, tmp_path):
  config, workdir, _, centers = study
  assert data.crop_of(config.data, 'lisc_tehran') == 0.5  # configs/wbc.py's scale normalisation
  lisc = centers[CENTERS.index('lisc_tehran')]
  # --mode evaluate on a center's folder reads it as training did: the same pixels as the
  # TFDS-cached split, through the site's crop, found by the folder's name.
  whole = data.load_folder(str(WBC / 'lisc_tehran'), config.data.image_size, config.data.resize,
                           data.crop_of(config.data, 'lisc_tehran'))
  index = {f: i for i, f in enumerate(whole.files)}
  for image, f in zip(lisc.test.images, lisc.test.files):
    assert (image == whole.images[index[f]]).all(), f
  found = inference.evaluate_folder(workdir, WBC / 'lisc_tehran', output=tmp_path / 'a.json')
  given = inference.evaluate_folder(workdir, WBC / 'lisc_tehran', output=tmp_path / 'b.json',
                                    crop=0.5)
  assert found['metrics'] == given['metrics']
  with pytest.raises(ValueError, match=r'^--crop=1\.5 must be a fraction in \(0, 1\]'):
    inference.evaluate_folder(workdir, WBC / 'lisc_tehran', crop=1.5)  # checked before loading


def test_a_folder_the_run_does_not_know_chooses_its_crop(study, tmp_path):
  """A new site (LISC's images under another name) is read at the crop chosen on its images,
  with every candidate's score in the JSON and the report; the same crop given by hand gives
  the same numbers; --crop auto does the same for a center of the run."""
  from fedblood.study import scale
  _, workdir, _, _ = study
  site = tmp_path / 'site_x'
  for image in (WBC / 'lisc_tehran').glob('*/*'):
    (site / image.parent.name).mkdir(parents=True, exist_ok=True)
    (site / image.parent.name / image.name).symlink_to(image)
  auto = inference.evaluate_folder(workdir, site, output=tmp_path / 'auto.json')
  crop = auto['crop']
  assert crop['from'] == 'auto' and crop['value'] in scale.CROPS
  scores = {float(c): v for c, v in crop['information'].items()}
  assert list(scores) == list(scale.CROPS) and crop['value'] == scale.choose(scores)
  assert len(set(scores.values())) == len(scores)  # every candidate crop reaches the model
  assert json.loads((tmp_path / 'auto.json').read_text())['crop'] == crop
  assert 'chosen on these images' in (tmp_path / 'auto.md').read_text()
  given = inference.evaluate_folder(workdir, site, output=tmp_path / 'given.json',
                                    crop=str(crop['value']))
  assert given['crop'] == {'value': crop['value'], 'from': '--crop', 'information': None}
  assert given['metrics'] == auto['metrics']
  known = inference.evaluate_folder(workdir, WBC / 'lisc_tehran', output=tmp_path / 'k.json')
  assert known['crop'] == {'value': 0.5, 'from': 'data.crop', 'information': None}
  asked = inference.evaluate_folder(workdir, WBC / 'lisc_tehran', output=tmp_path / 'a.json',
                                    crop='auto')
  assert asked['crop'] == crop  # the same images, the same model: the same choice
  # predict chooses the same way and writes what evaluate scored.
  count = inference.predict_folder(workdir, site, tmp_path / 'p.csv')
  fixed = inference.predict_folder(workdir, site, tmp_path / 'q.csv', crop=crop['value'])
  assert count == fixed == auto['metrics']['n']
  assert (tmp_path / 'p.csv').read_text() == (tmp_path / 'q.csv').read_text()
  with pytest.raises(ValueError, match=r"^--crop='big' must be a fraction in \(0, 1\] or 'auto'"):
    inference.evaluate_folder(workdir, site, crop='big')  # checked before loading


def test_bench_auto_crop_reads_every_unseen_center_three_ways(study, tmp_path, monkeypatch,
                                                              capsys):
  """bench/auto_crop.py on the smoke run: the reference model on each other center, every image,
  read whole, at data.crop and at the crop chosen; the table and the paired rows follow."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
  import auto_crop  # pylint: disable=g-import-not-at-top
  _, workdir, _, centers = study
  out = tmp_path / 'auto.md'
  monkeypatch.setattr(sys, 'argv', ['auto_crop.py', '--study', str(workdir), '--out', str(out)])
  auto_crop.main()
  printed = capsys.readouterr().out.splitlines()
  *rows, summary = [json.loads(line) for line in printed if line.startswith('{')]
  assert [r['center'] for r in rows] == CENTERS[1:]
  for r in rows:
    hand = 0.5 if r['center'] == 'lisc_tehran' else 1.0
    assert r['whole']['crop'] == 1.0 and r['data.crop']['crop'] == hand
  assert summary['cases'] == 3
  text = out.read_text()
  sizes = {c.name: len(c.train.labels) + len(c.val.labels) + len(c.test.labels) for c in centers}
  for c in CENTERS[1:]:
    assert f'| {c} | {sizes[c]} |' in text
  assert '| reference model, against whole | ' + str(sum(sizes[c] for c in CENTERS[1:])) in text


def test_confusion_matrices_count_each_test_split(study):
  _, _, results, centers = study
  for stage in ('before', 'after'):
    for c in centers:
      confusion = results['confusion'][stage][c.name]
      assert len(confusion) == 5 and all(len(row) == 5 for row in confusion)
      # Rows are true classes: each row sums to that class's test count (0 for absent classes).
      assert [sum(row) for row in confusion] == [int((c.test.labels == k).sum())
                                                 for k in range(5)], (stage, c.name)


def test_metrics_log_has_every_round_and_center(study):
  _, workdir, _, _ = study
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  fl = [(r['round'], r['center']) for r in rows if r['stage'] == 'fl']
  assert sorted(fl) == sorted((r, c) for r in (1, 2) for c in CENTERS)
  assert all(math.isfinite(r['loss']) for r in rows)
  assert [r['epoch'] for r in rows if r['stage'] == 'reference'] == [1, 2]


def test_report_has_both_tables_and_figures(study):
  _, workdir, _, _ = study
  report = (workdir / 'report.md').read_text()
  assert '## Table 1' in report and '## Table 2' in report
  for name in CENTERS:
    assert report.count(name) >= 2, name  # a row in Table 1 and one in Table 2
  assert (workdir / 'figures' / 'accuracy_per_round.png').stat().st_size > 0
  assert (workdir / 'figures' / 'confusion_after_lisc_tehran.png').is_file()
