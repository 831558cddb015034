"""Report tables, figures and the sweep summary from hand-made results."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from fedblood.reporting import report, sweep_summary
from report_samples import CENTERS, sample_history, sample_results


def test_center_table_rows_and_means():
  res = sample_results()
  table = report.center_table(res['before'], CENTERS, 'ref').splitlines()
  assert table[0] == '| Center | n | Accuracy | Bal. acc. | Precision | Recall | Specificity | F1 |'
  assert table[2].startswith('| ref (reference) | 8 | 100.0 | 100.0 |')
  # ext_a predicts neutrophil for all: accuracy 2/8, recall macro (0+0+0+0+1)/5 = 20%.
  assert table[3].startswith('| ext_a | 8 | 25.0 | 20.0 |')
  # ext_b: only classes 1 and 4 present: recall (1/2 + 1)/2 = 75%, accuracy 3/4.
  assert table[4].startswith('| ext_b | 4 | 75.0 | 75.0 |')
  assert table[5].startswith('| *mean, external centers* | 12 | 50.0 | 47.5 |')
  assert table[6].startswith('| *mean, all centers* | 20 | 66.7 |')


def test_comparison_table_side_by_side():
  table = report.comparison_table(sample_results()).splitlines()
  assert table[0] == ('| Center | Reference model (Table 1) | FL (Table 2) | Local-only | '
                      'Pooled (centralized) |')
  assert table[3] == '| ext_a | 25.0 | 87.5 | 25.0 | 87.5 |'
  assert table[-1] == '| *mean, external* | 50.0 | 93.8 | 50.0 | 93.8 |'


def test_the_last_round_stands_beside_a_selected_table_2():
  res = sample_results()
  res['after_last'] = res['before']  # the last round fell back to the reference's scores
  res['selection'] = {'rule': 'val', 'round': 1, 'last_round': 2}
  table = report.comparison_table(res).splitlines()
  assert table[0].split(' | ')[2:4] == ['FL (Table 2)', 'FL, last round (2)']
  assert table[3] == '| ext_a | 25.0 | 87.5 | 25.0 | 25.0 | 87.5 |'
  assert report.selection_line(res['selection']) == (
      "- Table 2 reports round 1 of 2, the best mean validation accuracy over the training "
      "centers (`fl.select='val'`, as the baselines pick their epoch); the last round is beside "
      'it in the comparison')
  res['selection']['round'] = 2  # the best round is the last: no second column
  assert 'last round' not in report.comparison_table(res)
  assert sweep_summary.headline(res)['last_acc_external'] == pytest.approx(0.5)


def test_write_report_figures_and_markdown(tmp_path):
  res = sample_results()
  (tmp_path / 'results.json').write_text(json.dumps(res))
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    for row in sample_history():
      f.write(json.dumps(row) + '\n')
  path = report.write_report(tmp_path)
  text = path.read_text()
  assert '## Table 1: reference model on every center (before FL)' in text
  assert '## Table 2: after federated fine-tuning' in text
  assert '![accuracy per round](figures/accuracy_per_round.png)' in text
  assert '![ext_b after FL](figures/confusion_after_ext_b.png)' in text
  for name in ['accuracy_per_round.png'] + [f'confusion_{s}_{c}.png' for s in ('before', 'after')
                                            for c in CENTERS]:
    with Image.open(tmp_path / 'figures' / name) as im:
      assert im.format == 'PNG' and im.size[0] > 300
  # The figure is not blank: the lines and the dashed reference level draw coloured pixels.
  pixels = np.asarray(Image.open(tmp_path / 'figures' / 'accuracy_per_round.png').convert('RGB'))
  assert (np.abs(pixels.astype(int) - 255).sum(-1) > 100).mean() > 0.01


def test_headline_and_sweep_summary(tmp_path):
  res = sample_results()
  h = sweep_summary.headline(res)
  assert h['before_acc_external'] == pytest.approx(0.5)
  assert h['after_acc_external'] == pytest.approx((0.875 + 1.0) / 2)
  assert h['after_acc_reference'] == 1.0
  assert h['pooled_acc_external'] == pytest.approx(0.9375)
  points = [{'name': 'fl.alpha=0.1', 'overrides': {'fl.alpha': 0.1}, 'results': res},
            {'name': 'fl.alpha=0.01', 'overrides': {'fl.alpha': 0.01}, 'results': None}]
  md, csv_path = sweep_summary.write_sweep_summary(points, tmp_path)
  rows = list(csv.reader(csv_path.open()))
  assert rows[0][:3] == ['name', 'fl.alpha', 'before_acc_external']
  assert rows[1][:3] == ['fl.alpha=0.1', '0.1', '0.500000']
  assert rows[2][:2] == ['fl.alpha=0.01', '0.01'] and set(rows[2][2:]) == {''}
  text = md.read_text()
  assert '| fl.alpha=0.1 | 0.1 | 50.0 |' in text
  assert '| fl.alpha=0.01 (not finished) | 0.01 |' in text
