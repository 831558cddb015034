"""Checks a whole run config before anything is written, naming the key at fault.

``check(config)`` runs every rule of :data:`RULES` whose key exists in the config and raises
``ValueError('<key>=<value>: <what is expected>')`` at the first bad field; it then checks the
data section (source, image size, splits, root folder, centers, reference) without loading any
image. Fields the rules do not name (a new sub-config such as ``fl.dp``, sweep options) are
accepted as they are: validation covers what exists, and a new field gets its rule by adding a
line to :data:`RULES` (or a function to :data:`SECTION_CHECKS` for rules spanning fields).

``train.run`` calls it before the workdir is touched, so a rejected setting can be corrected and
the same command rerun in the same workdir.
"""

import math
import numbers
import os
from typing import Any, Callable

from fedblood import algorithms, metrics, models, numerics, platform, simulate


def _number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


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
  return None if ok else 'is not a model in fedblood.models (VGG, VGG11, VGG16, VGG19)'


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
    'seed': nonnegative_int,
    'model.name': model_name,
    'model.num_classes': positive_int,
    'model.head': one_of('fc', 'gap'),
    'model.width': positive,
    'model.dropout': below_one,
    'model.input_norm': one_of('imagenet', 'caffe', 'per_image', 'none'),
    'model.conv_init': one_of(*models.CONV_INITS),
    'model.dtype': one_of(*platform.DTYPES),
    'model.frozen_blocks': frozen_blocks,
    'model.pretrained': existing_path,
    **_recipe('reference'),
    'reference.frozen_blocks': frozen_blocks,
    'reference.restore': existing_path,
    'fl.algorithm': one_of(*algorithms.NAMES),
    'fl.rounds': positive_int,
    'fl.local_epochs': positive_int,
    'fl.batch_size': positive_int,
    'fl.lr': positive,
    'fl.alpha': nonnegative,
    'fl.mu': nonnegative,
    'fl.weight_decay': nonnegative,
    'fl.max_grad_norm': nonnegative,
    'fl.server_lr': positive,
    'fl.server_momentum': below_one,
    'fl.participation': fraction,
    'fl.execution': one_of(*simulate.EXECUTIONS),
    'fl.eval_model': one_of('server', 'active_mean'),
    'fl.holdout': center_names,
    **_recipe('baselines'),
    'baselines.init': one_of('reference', 'scratch', 'both'),
    'baselines.balance': one_of('none', 'centers'),
    'baselines.pooled_val': one_of('pooled', 'center_mean'),
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


def _check_data(config):
  from fedblood.data import loader  # pylint: disable=g-import-not-at-top  (TFDS: import late)
  loader.check_config(config.data)


def _check_dp(config):
  if 'fl' in config:
    algorithms.dp.check_config(config.fl)  # fl.dp.* (mode, clip, noise, microbatch, algorithm)


# Checks that span several fields or need more than one value: functions of the whole config.
SECTION_CHECKS: list[Callable[[Any], None]] = [_check_data, _check_dp, numerics.check]


def check(config) -> None:
  """Raises ValueError naming the first config key whose value is out of type or range."""
  for key, rule in RULES.items():
    value = _get(config, key)
    if value is _ABSENT:
      continue
    problem = rule(value)
    if problem:
      raise ValueError(f'config {key}={value!r} {problem}')
  for section_check in SECTION_CHECKS:
    section_check(config)
