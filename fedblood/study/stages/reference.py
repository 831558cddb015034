"""Stage (a): the reference model, trained at the reference center or restored; saved once.

It lives in ``checkpoints/reference_model`` (full params: the frozen blocks are stored here
only), which later stages, a resumed run and :mod:`fedblood.study.inference` restore.
"""

from pathlib import Path

import jax
import jax.numpy as jnp

from fedblood.model import partition
from fedblood.rundir import checkpoint, runlog
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import centralized
from fedblood.study.experiment import STAGE, Experiment


def reference_stage(exp: Experiment, cfg, center, workdir: Path, log) -> tuple[dict, dict]:
  """Trains (or restores) the reference model; saves it once to ``checkpoints/reference_model``.

  Args:
    exp: the run's experiment.
    cfg: ``config.reference`` (the recipe, ``frozen_blocks``, optionally ``restore``).
    center: the reference center (its train and val splits).
    workdir: the run's workdir.
    log: ``log(row)`` for the epoch rows (None: no training may happen, e.g. a deployed server).

  Returns:
    ``(params, info)``: the full parameter tree and what trained it.
  """
  mngr = checkpoint.manager(workdir_lib.checkpoints(workdir, workdir_lib.REFERENCE_MODEL), keep=1)
  restored = checkpoint.restore_latest(mngr, {'params': exp.shapes})
  if restored is not None:
    mngr.close()
    return restored[0]['params'], restored[1]['info']
  if cfg.get('restore'):
    params, source = load_reference(cfg.restore, exp)
    info = {'center': center.name, 'restored_from': source}
  else:
    result = centralized.fit(
        'reference', exp, exp.init(), partition.frozen_block_rules(cfg.frozen_blocks),
        center.train, center.val, cfg, jax.random.fold_in(exp.key, STAGE['reference']),
        workdir_lib.checkpoints(workdir, 'reference'),
        log=lambda row: log({**row, 'center': center.name}),
        on_resume=lambda epoch: runlog.truncate(workdir, 'reference', epoch))
    params = result.params
    info = {'center': center.name, 'best_epoch': result.epoch, 'epochs_run': result.epochs_run,
            'val': result.val}
  checkpoint.save(mngr, info.get('best_epoch', 0), {'params': params}, {
      'kind': 'reference model', 'info': info, 'metrics': {
          f'val_{k}': v for k, v in (info.get('val') or {}).items() if k != 'n'},
      'params': exp.summary(params)})
  mngr.close()
  return params, info


def load_reference(path, exp: Experiment) -> tuple[dict, str]:
  """A full reference model from a workdir, a checkpoint directory, or a weights file.

  Args:
    path: a fedblood workdir (its ``checkpoints/reference_model``), an Orbax
      checkpoint directory of ``{'params': ...}``, or a weights file that
      :func:`fedblood.model.weights.load_pretrained` reads and that covers every parameter.
    exp: the experiment whose parameter tree (``exp.shapes``) the model must have.
  """
  path = Path(path)
  candidates = [workdir_lib.checkpoints(path, workdir_lib.REFERENCE_MODEL), path]
  for directory in candidates:
    if directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir()):
      mngr = checkpoint.manager(directory)
      state, _ = checkpoint.restore(mngr, {'params': exp.shapes})
      mngr.close()
      return state['params'], str(directory)
  if path.is_file():
    from fedblood.model import weights  # pylint: disable=g-import-not-at-top
    fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), exp.shapes)
    params, load = weights.load_pretrained(fresh, path, model=exp.model)
    if load.initialised:
      raise ValueError(f'reference.restore={str(path)!r} does not hold a full model of this '
                       f'config: {load.initialised} would stay freshly initialised')
    return params, str(path)
  raise FileNotFoundError(f'reference.restore={str(path)!r} is neither a fedblood workdir, a '
                          'checkpoint directory, nor a weights file')
