"""Using a finished (or running) workdir: evaluate on a labelled folder, predict a folder of images.

The model is rebuilt from the workdir's own ``config.json`` (not the command
line's), with the reference model from ``checkpoints/reference_model`` (which
holds the frozen blocks) and the trainable part from an FL round checkpoint.
``round=None`` takes the round Table 2 reports (``fl.select``: the best mean validation accuracy,
or the latest round), ``round=0`` the reference model itself.
"""

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from absl import logging
import ml_collections
import numpy as np

from fedblood import data
from fedblood.model import metrics, partition
from fedblood.reporting import evaluation_report
from fedblood.rundir import checkpoint
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import driver, experiment, priors as priors_lib, scale
from fedblood.study.stages import fl


class Loaded(NamedTuple):
  """Attributes:
    config: the workdir's config.
    experiment: its :class:`fedblood.study.experiment.Experiment` (the model, its partition, ...).
    params: the full parameter tree.
    round: the FL round (0 = reference model).
    name: which model, e.g. 'fl round 3 (active_mean)'.
  """
  config: Any
  experiment: experiment.Experiment
  params: Any
  round: int
  name: str

  @property
  def model(self):
    """The Flax module."""
    return self.experiment.model


def load_config(workdir) -> ml_collections.ConfigDict:
  config = workdir_lib.read_config(workdir)  # an unreadable config.json: named, with the remedy
  if config is None:
    raise FileNotFoundError(f'{workdir} has no config.json: not a fedblood workdir '
                            '(train into it first)')
  return ml_collections.ConfigDict(config)


def load_model(workdir, round_index: int | None = None) -> Loaded:
  """The model of FL round ``round_index`` (None: Table 2's, by ``fl.select``; 0: the reference)."""
  workdir = Path(workdir)
  config = load_config(workdir)
  exp = experiment.build(config)
  ref_dir = workdir_lib.checkpoints(workdir, workdir_lib.REFERENCE_MODEL)
  if not ref_dir.exists():
    raise FileNotFoundError(f'{workdir} holds no reference model yet (checkpoints/reference_model)')
  mngr = checkpoint.manager(ref_dir)
  with _named_damage(mngr, mngr.latest_step()):
    state, _ = checkpoint.restore(mngr, {'params': exp.shapes})
  mngr.close()
  reference = state['params']
  fl_dir = workdir_lib.checkpoints(workdir, workdir_lib.FL)
  mngr = checkpoint.manager(fl_dir) if fl_dir.exists() else None
  steps = list(mngr.all_steps()) if mngr else []
  if round_index == 0 or (round_index is None and not steps):
    return Loaded(config, exp, reference, 0, 'reference model')
  if round_index is None:
    for step in steps:  # the rule ranks every step: a damaged or foreign one is named first
      with _named_damage(mngr, step):
        checkpoint.check_step(mngr, step)
    round_index = driver.selected_round(mngr, config.fl.get('select', 'val'), steps[-1])
  if round_index not in steps:
    raise FileNotFoundError(f'no checkpoint of round {round_index} in {fl_dir}; '
                            f'kept rounds: {steps} '
                            '(0 = the reference model)')
  with _named_damage(mngr, round_index):
    meta = checkpoint.read_meta(mngr, round_index)
  algorithm, _, state_template, frozen = fl.fl_template(exp, config.fl, reference,
                                                        len(meta['centers']))
  with _named_damage(mngr, round_index):
    state, meta = checkpoint.restore(mngr, state_template, step=round_index)
  mngr.close()
  name = meta['eval_model']
  params = partition.merge(algorithm.eval_params(state['server'])[name], frozen)
  return Loaded(config, exp, params, round_index, f'fl round {round_index} ({name})')


@contextlib.contextmanager
def _named_damage(mngr, step):
  """A damaged checkpoint step becomes one line naming its file (nothing is moved or deleted)."""
  try:
    yield
  except (checkpoint.NotThisRun, FileNotFoundError, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (Orbax/TensorStore/JSON damage)
    raise ValueError(f'{checkpoint.damage(mngr, step, e)}. Pass --round with an intact round '
                     '(see --mode inspect), or rerun training in this workdir: it sets the '
                     'step aside and redoes it.') from None


def _probs(loaded: Loaded, images) -> np.ndarray:
  return loaded.experiment.predict(*loaded.experiment.split(loaded.params), images)


def _check_crop(crop) -> float | str | None:
  """A given ``--crop`` (a fraction or 'auto'), checked before any work (None: :func:`_crop`)."""
  if crop is None or crop == scale.AUTO:
    return crop
  if isinstance(crop, str):
    try:
      crop = float(crop)
    except ValueError:
      raise ValueError(f"--crop={crop!r} must be a fraction in (0, 1] or '{scale.AUTO}'") from None
  return data.check_crop(crop, '--crop')


def _known(cfg, name: str) -> bool:
  """Whether the run knows a center called ``name`` (its data.crop, data.centers or data.root)."""
  root = cfg.get('root') or ''
  in_root = cfg.get('source') == 'folder' and bool(root) and os.path.isdir(os.path.join(root, name))
  return name in data.crops(cfg) or name in tuple(cfg.get('centers') or ()) or in_root


def _crop(loaded: Loaded, path, crop, root, files) -> dict:
  """The crop ``files`` (under ``root``) are read at, and where it comes from.

  ``crop`` if given; else, for a center of the run named like ``path``, its ``data.crop`` (1 when
  not set); a folder the run does not know chooses its own (:mod:`fedblood.study.scale`), as
  ``crop='auto'`` does.
  Returns ``{'value', 'from', 'information'}`` ('from': '--crop', 'data.crop' or 'auto';
  'information': each tried crop's score, auto only).
  """
  cfg = loaded.config.data
  name = Path(path).resolve().name
  if crop is None and _known(cfg, name):
    return {'value': data.crop_of(cfg, name), 'from': 'data.crop', 'information': None}
  if crop not in (None, scale.AUTO):
    return {'value': crop, 'from': '--crop', 'information': None}
  read = lambda picked, c: data.read_files(root, [files[i] for i in picked], cfg.image_size,
                                           cfg.resize, c)
  value, scores = scale.auto_crop(lambda images: _probs(loaded, images), read, len(files))
  return {'value': value, 'from': scale.AUTO,
          'information': {str(c): v for c, v in scores.items()}}


def read_folder(loaded: Loaded, eval_dir, crop=None):
  """(uint8 images, labels, crop) of a labelled ``<class>/<images>`` folder, read at the crop
  :func:`_crop` gives (``crop``: a checked fraction, 'auto' or None); errors name the folder."""
  cfg = loaded.config.data
  root = str(eval_dir)
  try:
    listing = data.list_folder(root)  # a folder without images of a known class is refused here
    crop_info = _crop(loaded, eval_dir, crop, root, listing.files)
    images = data.read_files(root, listing.files, cfg.image_size, cfg.resize, crop_info['value'])
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f'--eval_dir {eval_dir}: {e}. It must hold class folders named after '
                     f'{metrics.CLASSES} (or their usual synonyms), each with images.') from e
  return images, np.asarray(listing.labels), crop_info


def evaluate_folder(workdir, eval_dir, round_index: int | None = None, output=None,
                    crop: float | str | None = None, priors: str = 'train') -> dict:
  """Metrics of a checkpoint on a ``<class>/<images>`` folder; writes them as JSON, and as a
  report (``<name>.md``: per-class table, confusion matrix; ``<name>_confusion.png``).

  Args:
    workdir: the run's workdir.
    eval_dir: a folder of class folders (may be a center never seen in training).
    round_index: FL round (None = Table 2's round, 0 = reference model).
    output: JSON path (default ``<workdir>/evaluation/<folder>_round<R>.json``).
    crop: the folder's central crop fraction (see ``data.crop``), or 'auto' (chosen on the
      folder's own images: :mod:`fedblood.study.scale`); None: for a center of the run, its
      ``data.crop``, for any other folder 'auto'.
    priors: 'train' (the model as trained) or 'em' (the folder's class priors re-estimated on
      its images, labels unused, and the predictions corrected: :mod:`fedblood.study.priors`).

  Returns:
    ``{'model', 'round', 'eval_dir', 'metrics', 'priors', 'crop', 'output', 'report'}`` (metrics
    as :func:`fedblood.model.metrics.classify`; priors: None, or the training and estimated
    shares; crop: the crop read at and where it came from, as :func:`_crop`).
  """
  crop = _check_crop(crop)
  priors_lib.check(priors)  # before any work
  loaded = load_model(workdir, round_index)
  images, labels, crop_info = read_folder(loaded, eval_dir, crop)
  probs, prior_info = priors_lib.adjust(_probs(loaded, images), loaded.config, loaded.round,
                                        priors)
  result = {'model': loaded.name, 'round': loaded.round, 'eval_dir': str(Path(eval_dir).resolve()),
            'metrics': metrics.classify(labels, probs.argmax(-1)), 'priors': prior_info,
            'crop': crop_info}
  if output is None:
    name = f'{Path(eval_dir).resolve().name}_round{loaded.round}.json'
    output = workdir_lib.path(workdir, workdir_lib.EVALUATION) / name
  output = Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(result, indent=1))
  result['output'] = str(output)
  result['report'] = str(evaluation_report.write(result, output))
  return result


def format_metrics(result: dict) -> str:
  """The evaluation as a short text table (overall, then per class)."""
  m = result['metrics']
  crop = result.get('crop')
  read = f', read at the central {crop["value"]:g} ({crop["from"]})' if crop else ''
  lines = [f'{result["model"]} on {result["eval_dir"]} ({m["n"]} images{read})',
           '  ' + '  '.join(f'{k} {100 * m[k]:.1f}' if m[k] is not None else f'{k} -'
                            for k in metrics.HEADLINE),
           f'  {"class":<12} {"n":>5} {"prec":>6} {"recall":>6} {"spec":>6} {"f1":>6}']
  fmt = lambda v: f'{100 * v:6.1f}' if v is not None else f'{"-":>6}'
  for name, pc in m['per_class'].items():
    lines.append(f'  {name:<12} {pc["support"]:>5} {fmt(pc["precision"])} {fmt(pc["recall"])} '
                 f'{fmt(pc["specificity"])} {fmt(pc["f1"])}')
  return '\n'.join(lines)


def predict_folder(workdir, input_path, output, round_index: int | None = None,
                   crop: float | str | None = None, priors: str = 'train') -> int:
  """Classifies every image under ``input_path`` into a CSV: file, predicted class, probabilities.

  Returns the number of images classified. Files without an image extension are
  skipped with a warning; a file with an image extension that cannot be decoded
  is an error naming it (nothing is written then). ``crop`` and ``priors`` as in
  :func:`evaluate_folder` (with 'em' the probabilities written are the corrected ones).
  """
  priors_lib.check(priors)  # before any work
  output = Path(output)
  if output.is_dir():
    raise ValueError(f'--output {output} is a directory; give the path of the CSV file to write, '
                     f'e.g. {output / "predictions.csv"}')
  crop = _check_crop(crop)
  loaded = load_model(workdir, round_index)
  cfg = loaded.config.data
  try:
    root, files = data.list_images(str(input_path))
    crop_info = _crop(loaded, input_path, crop, root, files)
    images = data.read_files(root, files, cfg.image_size, cfg.resize, crop_info['value'])
  except ValueError as e:
    raise ValueError(f'--input {input_path}: {e}') from e
  if crop_info['from'] == scale.AUTO:
    logging.info('--input %s: read at the central crop %s, chosen on its images (%s)', input_path,
                 crop_info['value'], ', '.join(f'{c}: {v:.3f}'
                                               for c, v in crop_info['information'].items()))
  probs, _ = priors_lib.adjust(_probs(loaded, images), loaded.config, loaded.round, priors)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_name(output.name + '.tmp')
  try:
    with open(tmp, 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['file', 'predicted', *[f'p_{c}' for c in metrics.CLASSES]])
      for name, p in zip(files, probs):
        writer.writerow([name, metrics.CLASSES[int(p.argmax())], *[f'{x:.6f}' for x in p]])
    tmp.replace(output)
  finally:
    tmp.unlink(missing_ok=True)
  return len(files)
