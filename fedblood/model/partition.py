"""Regex partitioning of a parameter tree into trainable and frozen parts.

The study freezes VGG16's first three convolution blocks and fine-tunes the rest.
Rules are ``(regex, label)`` pairs matched (``re.fullmatch``) against the
'/'-joined path of every parameter; the first matching rule wins (as in
big_vision). Every parameter must be covered and every rule must match
something, so a typo in a rule is an error rather than a silently frozen or
silently trained layer.

Algorithms only ever see the trainable subtree: ``split`` once, train
``trainable``, pass ``frozen`` alongside, and ``merge`` to apply the model::

  rules = frozen_block_rules(3)            # block1..block3 frozen, the rest trained
  trainable, frozen = split(params, rules)
  logits = model.apply({'params': merge(trainable, frozen)}, x)
"""

import re
from typing import Any, Sequence

import flax.traverse_util as traverse_util
import optax

TRAIN = 'train'
FREEZE = 'freeze'
LABELS = (TRAIN, FREEZE)

Rules = Sequence[tuple[str, str]]


def frozen_block_rules(frozen_blocks: int, num_blocks: int = 5) -> tuple[tuple[str, str], ...]:
  """Rules freezing ``block1`` .. ``block{frozen_blocks}`` and training everything else."""
  if not 0 <= frozen_blocks <= num_blocks:
    raise ValueError(f'model.frozen_blocks must be in 0..{num_blocks}, got {frozen_blocks}')
  rules = []
  if frozen_blocks:
    rules.append((f'block[1-{frozen_blocks}]/.*', FREEZE))
  rules.append(('.*', TRAIN))
  return tuple(rules)


def _flat(params) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep='/')


def labels(params, rules: Rules) -> dict:
  """Returns a tree shaped like ``params`` with 'train' / 'freeze' at every leaf."""
  compiled = []
  for pattern, label in rules:
    if label not in LABELS:
      raise ValueError(f'partition rule {pattern!r} has label {label!r}; use one of {LABELS}')
    compiled.append((pattern, re.compile(pattern), label))
  used = set()
  out = {}
  for path in _flat(params):
    for pattern, regex, label in compiled:
      if regex.fullmatch(path):
        out[path] = label
        used.add(pattern)
        break
    else:
      raise ValueError(f'parameter {path!r} is covered by no partition rule {[r for r, _ in rules]}')
  unused = [pattern for pattern, _, _ in compiled if pattern not in used]
  if unused:
    raise ValueError(f'partition rules {unused} match no parameter; paths look like '
                     f'{sorted(out)[:3]}')
  return traverse_util.unflatten_dict(out, sep='/')


def split(params, rules: Rules) -> tuple[dict, dict]:
  """Splits ``params`` into ``(trainable, frozen)`` nested dicts of the labelled leaves."""
  flat_labels = _flat(labels(params, rules))
  parts = {TRAIN: {}, FREEZE: {}}
  for path, leaf in _flat(params).items():
    parts[flat_labels[path]][path] = leaf
  return (traverse_util.unflatten_dict(parts[TRAIN], sep='/'),
          traverse_util.unflatten_dict(parts[FREEZE], sep='/'))


def merge(trainable, frozen) -> dict:
  """Inverse of :func:`split`: one parameter tree with the leaves of both parts."""
  flat_train, flat_frozen = _flat(trainable), _flat(frozen)
  overlap = set(flat_train) & set(flat_frozen)
  if overlap:
    raise ValueError(f'parameters {sorted(overlap)} are both trainable and frozen')
  return traverse_util.unflatten_dict({**flat_train, **flat_frozen}, sep='/')


def masked(tx: optax.GradientTransformation, params, rules: Rules) -> optax.GradientTransformation:
  """Applies ``tx`` to the 'train' leaves and zeroes every update of the 'freeze' leaves.

  For code that keeps the whole tree (e.g. reference training with frozen blocks).
  """
  return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels(params, rules))


def count(params) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(getattr(x, 'size', 1)) for x in _flat(params).values())
