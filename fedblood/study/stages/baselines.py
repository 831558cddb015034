"""The baselines: local-only training per center, and pooled (centralized) training."""

from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np

from fedblood import data, names
from fedblood.model import partition
from fedblood.rundir import runlog
from fedblood.rundir import workdir as workdir_lib
from fedblood.study import centralized
from fedblood.study.experiment import STAGE, Experiment

INITS = ('reference', 'scratch', 'both')   # baselines.init: where each baseline starts from
BALANCES = ('none', 'centers')             # baselines.balance: how pooled epochs draw centers
POOLED_VALS = ('pooled', 'center_mean')    # baselines.pooled_val: the pooled fit's monitor
# The fields of a centralized recipe that a fit reads (configs/common.py ``recipe``).
RECIPE_KEYS = ('epochs', 'batch_size', 'lr', 'warmup_epochs', 'final_lr_fraction', 'weight_decay',
               'max_grad_norm', 'patience', 'monitor', 'stop_below_lr')


def _concat(splits) -> data.Split:
  return data.Split(*[np.concatenate([getattr(s, f) for s in splits]) for f in data.Split._fields])


class _Stage(NamedTuple):
  """What every baseline fit of a run shares (see :func:`baselines_stage`'s arguments)."""
  exp: Experiment
  scratch_frozen_blocks: int
  reference_params: Any
  centers: list
  workdir: Path
  log: Callable
  holdout: tuple
  reference_recipe: Any  # config.reference when the reference was trained here, else None


def baselines_stage(exp: Experiment, cfg, reference_params, centers, workdir: Path, log, *,
                    scratch_frozen_blocks: int, holdout=(), fl_params=None,
                    reference_recipe=None) -> dict:
  """Local-only training per center and pooled training: ``{name: {center: metrics}}``.

  With ``baselines.personalize``, each center that joined then fine-tunes the federated model
  (``fl_params``, full params of the round Table 2 reports) and the pooled model (from scratch
  when trained, else from the reference) on its own data: ``personalized_fl`` and
  ``personalized_pooled`` (:func:`_personalize`).

  Args:
    exp: the run's experiment.
    cfg: ``config.baselines``. ``init='both'`` trains each baseline from the reference and
      from scratch, named ``<baseline>_reference`` / ``<baseline>_scratch``; one init keeps
      the plain names.
    reference_params: the reference model.
    centers: every center, the reference first.
    workdir: the run's workdir.
    log: ``log(row)`` for the epoch rows.
    scratch_frozen_blocks: ``reference.frozen_blocks``, the blocks that stay frozen from scratch
      (as they did while the reference trained).
    holdout: ``fl.holdout``: centers that stay out of the pooled training set (they never
      joined).
    fl_params: the federated model (needed with ``baselines.personalize``).
    reference_recipe: ``config.reference`` when this run trained the reference model (None when
      it was restored). Local-only from scratch at the reference center with that same recipe
      would retrain the reference model with another key: the reference model stands for it.
  """
  if cfg.init not in INITS:
    raise ValueError(f'baselines.init must be one of {INITS}, got {cfg.init!r}')
  stage = _Stage(exp, scratch_frozen_blocks, reference_params, centers, workdir, log,
                 tuple(holdout), reference_recipe)
  if cfg.init != 'both':
    out, pooled = _baselines_from(stage, cfg, cfg.init, '')
  else:
    both, pooled_by_init = {}, {}
    for init, prefix in (('scratch', 'scratch_'), ('reference', '')):
      per_init, pooled_by_init[init] = _baselines_from(stage, cfg, init, prefix)
      for name, per in per_init.items():
        both[f'{name}_{init}'] = per
    order = [f'{b}_{i}' for b in ('local_only', 'pooled') for i in ('scratch', 'reference')]
    out = {name: both[name] for name in order if name in both}
    pooled = pooled_by_init['scratch']
  if cfg.get('personalize', False):
    if fl_params is None or pooled is None:
      raise ValueError('baselines.personalize needs the federated model and baselines.pooled')
    out.update(_personalize(stage, cfg, {'fl': fl_params, 'pooled': pooled}))
  return out


def _personalize(stage: _Stage, cfg, starts: dict) -> dict:
  """Each center that joined fine-tunes each model of ``starts`` on its own training split.

  The same way for every start: the baselines' recipe (``cfg``, without its ``scratch``
  overrides), the FL partition (``exp.rules``: blocks 1..model.frozen_blocks stay as they
  are), early-stopped on the center's validation split, as local-only from the reference is.
  Returns ``{'personalized_<start>': {center: test metrics}}``; stage names
  ``personal_<start>_<center>``.
  """
  exp = stage.exp
  out = {}
  for m, (start, params) in enumerate(starts.items()):
    out[f'personalized_{start}'] = {}
    for k, center in enumerate(stage.centers):
      if center.name in stage.holdout:
        continue
      name = f'personal_{start}_{center.name}'
      fitted = _fit(stage, name, params, exp.rules, center.train, center.val, cfg,
                    jax.random.fold_in(exp.key, STAGE['personal'] + 100 * m + k))
      out[f'personalized_{start}'][center.name] = exp.evaluate(*exp.split(fitted), center.test)
  return out


def _fit(stage: _Stage, name, start, rules, train, val, cfg, key, groups=None):
  """One resumable centralized fit of the stage, checkpointed and logged under ``name``."""
  return centralized.fit(name, stage.exp, start, rules, train, val, cfg, key,
                         workdir_lib.checkpoints(stage.workdir, names.slug(name)), log=stage.log,
                         on_resume=lambda epoch: runlog.truncate(stage.workdir, name, epoch),
                         groups=groups).params


def scratch_recipe(cfg):
  """``config.baselines`` with the fields of ``baselines.scratch`` (when it has one) over it."""
  if 'scratch' not in cfg:
    return cfg
  return ml_collections.ConfigDict({**{k: v for k, v in cfg.to_dict().items() if k != 'scratch'},
                                    **cfg.scratch.to_dict()})


def is_reference_recipe(cfg, reference_recipe) -> bool:
  """Whether a fit with recipe ``cfg`` (from scratch) is the reference model's own training."""
  return reference_recipe is not None and all(
      cfg.get(k) == reference_recipe.get(k) for k in RECIPE_KEYS)


def _baselines_from(stage: _Stage, cfg, init: str, prefix: str) -> tuple[dict, Any]:
  """The baselines from one init, and the pooled model's params (None without it); stage names
  ``local_<prefix><center>``, ``pooled_<prefix>``.

  From scratch, fields of ``baselines.scratch`` (when the config has it) override the recipe.
  """
  exp, centers = stage.exp, stage.centers
  out, pooled = {}, None
  if init == 'reference':
    start, rules = stage.reference_params, exp.rules
  else:
    cfg = scratch_recipe(cfg)
    start, rules = exp.init(), partition.frozen_block_rules(stage.scratch_frozen_blocks)

  def run_fit(name, train, val, stage_key, groups=None):
    return _fit(stage, name, start, rules, train, val, cfg, stage_key, groups)

  if cfg.local_only:
    out['local_only'] = {}
    for k, center in enumerate(centers):
      if k == 0 and (init == 'reference' or is_reference_recipe(cfg, stage.reference_recipe)):
        params = stage.reference_params  # the reference model IS local-only training there
      else:
        params = run_fit(f'local_{prefix}{center.name}', center.train, center.val,
                         jax.random.fold_in(exp.key, STAGE['local'] + k))
      out['local_only'][center.name] = exp.evaluate(*exp.split(params), center.test)
  if cfg.pooled:
    joined = [c for c in centers if c.name not in stage.holdout]
    groups = (np.concatenate([np.full(len(c.train.labels), k) for k, c in enumerate(joined)])
              if cfg.get('balance', 'none') == 'centers' else None)
    val = ([c.val for c in joined] if cfg.get('pooled_val', 'pooled') == 'center_mean'
           else _concat([c.val for c in joined]))
    pooled = run_fit('pooled' + ('_' + prefix.rstrip('_') if prefix else ''),
                     _concat([c.train for c in joined]), val,
                     jax.random.fold_in(exp.key, STAGE['pooled']), groups)
    out['pooled'] = exp.evaluate_splits(pooled, {c.name: c.test for c in centers})
  return out, pooled
