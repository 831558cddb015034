"""Checks a whole run config before anything is written, naming the key at fault.

``check(config)`` runs every rule of :data:`RULES` whose key exists in the config and raises
``ValueError('config <key>=<value> <what is expected>')`` at the first bad field. It then builds
what the run would build, without compiling or loading an image, so that every setting a stage
would refuse is refused here, by the code that refuses it (:func:`check_built`):

* the algorithm (:func:`fedblood.algorithms.build` of ``config.fl``: FedDyn's ``alpha > 0``, its
  server without a step size, ``fl.dp``) and the names of the models it evaluates;
* the experiment (:func:`fedblood.study.experiment.build`: the model, the run's key, the parameter
  shapes by ``jax.eval_shape``), both partitions (``model`` / ``reference.frozen_blocks``) and
  the model ``model.pretrained`` weights need (:func:`fedblood.model.weights.check_model`);
* the data plan (:func:`fedblood.data.plan.plan`: centers and split sizes from the listing),
  against which the class count, the evaluation batch, ``fl.holdout``, ``fl.participation`` and
  the privacy accounting (:func:`fedblood.privacy.check`) are checked.

Fields the rules do not name (a new sub-config, sweep options) are accepted as they are:
validation covers what exists, and a new field gets its rule by adding a line to :data:`RULES`.
Allowed values come from the module that uses them (``algorithms.NAMES``, ``driver.EVAL_MODELS``,
``baselines.INITS``, ``privacy.ACCOUNTANTS``, ...), never from a copy.

``train.run`` calls it before the workdir is touched, so a rejected setting can be corrected and
the same command rerun in the same workdir.
"""

import math
import numbers
import os
from typing import Any, Callable

import jax

from fedblood import algorithms, data
from fedblood import privacy
from fedblood.algorithms import base, dp
from fedblood.backend import numerics, platform
from fedblood.core import batches, simulate
from fedblood.data import loader
from fedblood.data import plan as data_plan
from fedblood.model import metrics, models, partition
from fedblood.model import weights
from fedblood.study import budgets as budgets_lib, driver, experiment
from fedblood.study.stages import baselines
from fedblood.study.stages import fl as fl_stage


def _number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def seed(x):
  return None if _int(x) and 0 <= x < 2**63 else 'must be an integer in [0, 2^63)'


def positive_int(x):
  return None if _int(x) and x >= 1 else 'must be an integer >= 1'


def nonnegative_int(x):
  return None if _int(x) and x >= 0 else 'must be an integer >= 0'


def positive(x):
  return None if _number(x) and x > 0 else 'must be a finite number > 0'


def nonnegative(x):
  return None if _number(x) and x >= 0 else 'must be a finite number >= 0'


def fraction(x):
  return None if _number(x) and 0 < x <= 1 else 'must be in (0, 1]'


def probability(x):
  return None if _number(x) and 0 < x < 1 else 'must be in (0, 1)'


def below_one(x):
  return None if _number(x) and 0 <= x < 1 else 'must be in [0, 1)'


def one_of(*choices) -> Callable[[Any], str | None]:
  return lambda x: None if x in choices else f'must be one of {choices}'


def frozen_blocks(x):
  return None if _int(x) and 0 <= x <= 5 else 'must be an integer in 0..5 (VGG has 5 blocks)'


def existing_path(x):
  if not isinstance(x, str):
    return 'must be a path (a string)'
  return None if not x or os.path.exists(os.path.expanduser(x)) else 'no such file or folder'


def model_name(x):
  cls = getattr(models, x, None) if isinstance(x, str) else None
  ok = cls is models.VGG or getattr(cls, 'func', None) is models.VGG
  return None if ok else 'is not a model in fedblood.model.models (VGG, VGG11, VGG16, VGG19)'


def _recipe(section: str) -> dict:
  """The rules of a centralized training recipe (configs/common.py ``recipe``)."""
  return {f'{section}.epochs': positive_int, f'{section}.batch_size': positive_int,
          f'{section}.lr': positive, f'{section}.warmup_epochs': nonnegative,
          f'{section}.final_lr_fraction': nonnegative, f'{section}.weight_decay': nonnegative,
          f'{section}.max_grad_norm': nonnegative, f'{section}.patience': nonnegative_int,
          f'{section}.monitor': one_of(*metrics.HEADLINE), f'{section}.stop_below_lr': fraction}


def center_names(x):
  ok = isinstance(x, (tuple, list)) and all(isinstance(n, str) and n for n in x)
  if not ok:
    return "must be a tuple of center names, e.g. ('bccd',)"
  return None if len(set(x)) == len(x) else 'names a center twice'


def boolean(x):
  return None if isinstance(x, bool) else 'must be True or False'


# key -> check(value) returning None (fine) or what the value must be. Keys absent from a config
# are skipped. New fields: add their rule here (e.g. 'fl.dp.noise_multiplier': nonnegative).
RULES: dict[str, Callable[[Any], str | None]] = {
    'seed': seed,
    'model.name': model_name,
    'model.num_classes': positive_int,
    'model.head': one_of('fc', 'gap'),
    'model.width': positive,
    'model.dropout': below_one,
    'model.input_norm': one_of('imagenet', 'caffe', 'per_image', 'none'),
    'model.conv_init': one_of(*models.CONV_INITS),
    'model.tta': boolean,
    'model.dtype': one_of(*platform.DTYPES),
    'model.frozen_blocks': frozen_blocks,
    'model.pretrained': existing_path,
    **_recipe('reference'),
    'reference.frozen_blocks': frozen_blocks,
    'reference.restore': existing_path,
    'fl.algorithm': one_of(*algorithms.NAMES),
    'fl.rounds': positive_int,
    'fl.local_epochs': positive_int,
    'fl.local_steps': nonnegative_int,
    'fl.batch_size': positive_int,
    'fl.lr': positive,
    'fl.lr_decay': fraction,
    'fl.local_momentum': below_one,
    'fl.alpha': nonnegative,
    'fl.mu': nonnegative,
    'fl.weight_decay': nonnegative,
    'fl.max_grad_norm': nonnegative,
    'fl.server_lr': positive,
    'fl.server_momentum': below_one,
    'fl.weighting': one_of(*base.WEIGHTINGS),
    'fl.participation': fraction,
    'fl.execution': one_of(*simulate.EXECUTIONS),
    'fl.eval_model': one_of(*driver.EVAL_MODELS),
    'fl.select': one_of(*driver.SELECT_RULES),
    'fl.holdout': center_names,
    'fl.init': one_of(*fl_stage.INITS),
    'fl.logit_adjust': nonnegative,
    'fl.swa_start': nonnegative_int,
    **_recipe('baselines'),
    'fl.dp.mode': one_of(*dp.MODES),
    'fl.dp.clip': positive,
    'fl.dp.noise_multiplier': nonnegative,
    'fl.dp.target_epsilon': nonnegative,
    'fl.dp.delta': probability,
    'fl.dp.accountant': one_of(*privacy.ACCOUNTANTS),
    'fl.dp.microbatch': nonnegative_int,
    'fl.dp.seed': seed,
    'baselines.personalize': boolean,
    'baselines.init': one_of(*baselines.INITS),
    'baselines.balance': one_of(*baselines.BALANCES),
    'baselines.pooled_val': one_of(*baselines.POOLED_VALS),
    **_recipe('baselines.scratch'),
    'numerics.matmul_precision': one_of(*numerics.PRECISIONS),
    'numerics.xla_flags': boolean,
    'checkpoint.every': positive_int,
    'checkpoint.keep': positive_int,
    'eval.batch_size': positive_int,
    'data.synthetic.num_centers': positive_int,
}


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return _ABSENT
    node = node[part]
  return node


_ABSENT = object()


def check_built(config) -> None:
  """Builds the run's algorithm, experiment and data plan; raises what building them raises.

  Nothing is compiled and no image is decoded: parameter shapes come from ``jax.eval_shape``,
  the centers' split sizes from their file listing (:func:`fedblood.data.plan.plan`).
  """
  algorithm = algorithms.build(config.fl)
  exp = experiment.build(config)
  trainable, _ = exp.split(exp.shapes)
  partition.split(exp.shapes, partition.frozen_block_rules(config.reference.frozen_blocks))
  if config.model.get('pretrained'):
    weights.check_model(exp.model, config.model.pretrained)  # the file's type; no weight read
  centers = data_plan.plan(config.data)
  _check_against_data(config, centers)
  holdout = fl_stage.held_out(config.fl.get('holdout', ()), [c.name for c in centers])
  joined = [c for c in centers if c.name not in holdout]
  driver.participation(config.fl.participation, exp.key, 1, len(joined))
  evaluated = jax.eval_shape(lambda t: algorithm.eval_params(algorithm.init(t, len(joined))[0]),
                             trainable)
  driver.eval_model_name(config.fl.eval_model, evaluated)
  privacy.check(config.fl, {c.name: len(c.train.labels) for c in joined})
  budgets_lib.check(config.fl, {c.name: len(c.train.labels) for c in joined})


def _check_against_data(config, centers) -> None:
  """The model's classes against the data plan's centers; no center's train or test split empty."""
  classes = len(data.CLASSES)
  if config.model.num_classes != classes:
    raise ValueError(f'config model.num_classes={config.model.num_classes!r} must be {classes}: '
                     f'the data has the classes {data.CLASSES}')
  data.require_splits(centers)


# The sections a config needs for :func:`check_built` (a partial config gets its rules only).
_BUILT_FROM = ('seed', 'data', 'model', 'reference', 'fl', 'eval')


def check(config) -> None:
  """Raises ValueError naming the first config key whose value the run would refuse."""
  for key, rule in RULES.items():
    value = _get(config, key)
    if value is _ABSENT:
      continue
    problem = rule(value)
    if problem:
      raise ValueError(f'config {key}={value!r} {problem}')
  numerics.check(config.get('numerics'))
  if _get(config, 'baselines.personalize') is True and not config.baselines.get('pooled', True):
    raise ValueError('config baselines.personalize=True fine-tunes the pooled model at each '
                     'site too: it needs baselines.pooled=True')
  frozen = _get(config, 'model.frozen_blocks')
  if _get(config, 'fl.init') == 'scratch' and frozen not in (0, _ABSENT):
    raise ValueError(f"config fl.init='scratch' with model.frozen_blocks={frozen}: the first "
                     f'{frozen} block(s) would stay at their random initial weights through '
                     'every round; set model.frozen_blocks=0')
  swa_start, rounds = _get(config, 'fl.swa_start'), _get(config, 'fl.rounds')
  if swa_start not in (0, _ABSENT) and rounds is not _ABSENT and swa_start > rounds:
    raise ValueError(f'config fl.swa_start={swa_start!r} is after the last round (fl.rounds='
                     f'{rounds}): nothing would be averaged; set a round from 1 to {rounds}, '
                     'or 0 (off)')
  steps, epochs = _get(config, 'fl.local_steps'), _get(config, 'fl.local_epochs')
  conflict = None if _ABSENT in (steps, epochs) else batches.steps_conflict(epochs, steps)
  if conflict:
    raise ValueError(f'config fl.local_steps={steps!r} with fl.local_epochs={epochs!r}: {conflict}')
  adjust, dp_mode = _get(config, 'fl.logit_adjust'), _get(config, 'fl.dp.mode')
  # Record level only: under fl.dp.mode='client' the unit is a whole center, whose clipped and
  # noised update covers anything computed from its own labels, the prior included.
  if adjust not in (0, _ABSENT) and dp_mode == 'example':
    raise ValueError(f"config fl.logit_adjust={adjust!r} with fl.dp.mode={dp_mode!r}: the class "
                     "prior comes from every label of the center, so one image would change "
                     "every example's loss and the per-image privacy bound would not hold; set "
                     "fl.logit_adjust=0, or fl.dp.mode='off' or 'client' (a whole center as "
                     "the unit)")
  if all(key in config for key in _BUILT_FROM):
    check_built(config)
  else:
    if 'data' in config:
      loader.check_config(config.data)
    if 'fl' in config:
      dp.check_config(config.fl)
