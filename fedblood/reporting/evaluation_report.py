"""``--mode evaluate``'s report of one labelled folder: a new center's numbers, readable.

Next to the evaluation's JSON, ``<name>.md`` holds the headline metrics, the per-class table
(support, precision, recall, specificity, F1) and the confusion matrix (rows the true class,
columns the predicted one), as report.md gives them for the run's own centers, and
``<name>_confusion.png`` the same matrix as a figure; with re-estimated priors, the training
and estimated class shares.
"""

from pathlib import Path

from fedblood.labels import CLASSES
from fedblood.reporting import report


def _crop_lines(crop) -> list[str]:
  """How the images were read: the central crop, and, when chosen on them, each crop's score."""
  if not crop:
    return []
  origin = {'data.crop': "the run's data.crop of this center", '--crop': '--crop',
            'auto': "chosen on these images (`--crop auto`: the most information between image "
                    'and predicted class, no label read)'}[crop['from']]
  lines = [f'Read at the central {crop["value"]:g} of each side: {origin}.', '']
  if crop.get('information'):
    lines += ['| crop | ' + ' | '.join(crop['information']) + ' |',
              '|---|' + '---|' * len(crop['information']),
              '| information (nats) | '
              + ' | '.join(f'{v:.3f}' for v in crop['information'].values()) + ' |', '']
  return lines


def write(result: dict, json_path) -> Path:
  """Writes ``<json stem>.md`` and ``<json stem>_confusion.png``; returns the markdown path."""
  json_path = Path(json_path)
  m = result['metrics']
  figure = json_path.with_name(f'{json_path.stem}_confusion.png')
  report.plot_confusion(m['confusion'], figure, f'{Path(result["eval_dir"]).name}: '
                        f'{result["model"]}')
  headline = ('accuracy', 'balanced_accuracy', 'precision', 'specificity', 'f1')
  lines = [f'# {result["model"]} on `{result["eval_dir"]}`', '',
           f'{m["n"]} images; metrics in %, macro over the classes present.', '',
           *_crop_lines(result.get('crop')),
           '| ' + ' | '.join(headline) + ' |', '|' + '---|' * len(headline),
           '| ' + ' | '.join(report.pct(m[k]) for k in headline) + ' |', '',
           '## Per class', '', '| class | images | precision | recall | specificity | F1 |',
           '|---|---|---|---|---|---|']
  for name, pc in m['per_class'].items():
    lines.append(f'| {name} | {pc["support"]} | {report.pct(pc["precision"])} | {report.pct(pc["recall"])} '
                 f'| {report.pct(pc["specificity"])} | {report.pct(pc["f1"])} |')
  lines += ['', '## Confusion matrix (rows: true class, columns: predicted)', '',
            '| true \\ predicted | ' + ' | '.join(CLASSES) + ' |', '|---|' + '---|' * len(CLASSES)]
  for name, row in zip(CLASSES, m['confusion']):
    lines.append(f'| {name} | ' + ' | '.join(str(v) for v in row) + ' |')
  lines += ['', f'![confusion matrix]({figure.name})', '']
  if result.get('priors'):
    p = result['priors']
    lines += [f'## Class priors re-estimated on these images (EM, {p["iterations"]} steps)', '',
              '| class | training share | estimated here |', '|---|---|---|']
    lines += [f'| {c} | {report.pct(p["train"][c])} | {report.pct(p["estimated"][c])} |' for c in CLASSES]
    lines.append('')
  path = json_path.with_suffix('.md')
  path.write_text('\n'.join(lines))
  return path
