"""``--mode inspect``: every checkpoint of a workdir listed, without loading arrays; the
parameter counts a step's meta stores for it (:func:`param_summary`); a step's arrays as
stored (:func:`stored_state`)."""

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedblood.rundir import checkpoint
from fedblood.rundir import workdir as workdir_lib


def param_summary(trainable, frozen, model: str = '') -> dict:
  """Counts stored in a step's meta so that ``inspect`` can show them without arrays."""
  def leaves(tree):
    return len(jax.tree.leaves(tree))
  def scalars(tree):
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))
  return {'model': model, 'trainable': scalars(trainable), 'trainable_leaves': leaves(trainable),
          'frozen': scalars(frozen), 'frozen_leaves': leaves(frozen)}


def summarize_tree(shapes: dict) -> dict[str, dict]:
  """Leaf and scalar counts per top-level subtree of a ``stored_shapes`` dict."""
  out = {}
  for path, (shape, _) in shapes.items():
    top = path.split('/')[0]
    entry = out.setdefault(top, {'leaves': 0, 'scalars': 0})
    entry['leaves'] += 1
    entry['scalars'] += int(np.prod(shape, dtype=np.int64))
  return out


def _best_step(metas: dict[int, dict]) -> int | None:
  # meta['best_metric'] names the ranking metric (higher is better) the run used.
  ranked = [(m['metrics'][m['best_metric']], step) for step, m in metas.items()
            if m.get('best_metric') and m.get('metrics', {}).get(m['best_metric']) is not None]
  # Ties go to the earliest step, as a "first reached" rule would pick.
  return max(ranked, key=lambda t: (t[0], -t[1]))[1] if ranked else None


def inspect(workdir) -> str:
  """A human-readable listing of every checkpoint of a workdir, without loading arrays.

  For each stage directory: the kept steps with their metrics, which one is
  best, and the parameter summary stored in the latest step's meta
  (trainable / frozen counts) plus the stored tree's sizes per subtree.
  """
  root = workdir_lib.checkpoints(workdir)
  if not root.is_dir():
    raise FileNotFoundError(f'{workdir} holds no checkpoints/ directory '
                            '(is it a fedblood workdir?)')
  lines = [f'checkpoints in {root}']
  for stage_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    if stage_dir.name.endswith('.corrupt'):
      lines.append(f'\n[{stage_dir.name}] set aside (unrestorable): '
                   f'{sorted(p.name for p in stage_dir.iterdir())}')
      continue
    # No preservation policy and no save: opening the manager deletes nothing.
    mngr = ocp.CheckpointManager(stage_dir.absolute(), item_handlers=checkpoint.handlers(),
                                 options=ocp.CheckpointManagerOptions(create=False))
    steps = list(mngr.all_steps())
    if not steps:
      lines.append(f'\n[{stage_dir.name}] no committed step')
      continue
    lines.append(f'\n[{stage_dir.name}] steps {steps}')
    metas, damaged = {}, {}
    for step in steps:
      try:
        metas[step] = checkpoint.read_meta(mngr, step)
      except Exception as e:  # pylint: disable=broad-except  (a damaged step is listed as such)
        damaged[step] = checkpoint.damage(mngr, step, e)
    best = _best_step(metas)
    for step in steps:
      if step in damaged:
        lines.append(f'  step {step}: DAMAGED, {damaged[step]}')
        continue
      meta = metas[step]
      shown = ', '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                        for k, v in meta.get('metrics', {}).items())
      mark = ' (best)' if step == best else ''
      lines.append(f'  {meta.get("kind", "step")} {step}{mark}: {shown}')
    latest = max(metas, default=None)
    params = metas[latest].get('params') if metas else None
    if params:
      lines.append(f'  model: {params.get("model", "?")}; trainable {params["trainable"]:,} '
                   f'scalars in {params["trainable_leaves"]} leaves, frozen {params["frozen"]:,} '
                   f'in {params["frozen_leaves"]} leaves')
    try:
      sizes = summarize_tree(checkpoint.stored_shapes(mngr, latest)) if metas else {}
    except Exception as e:  # pylint: disable=broad-except
      lines.append(f'  stored state: DAMAGED, {checkpoint.damage(mngr, latest, e)}')
    else:
      if sizes:
        lines.append('  stored state: ' + ', '.join(
            f'{k} {v["scalars"]:,} scalars / {v["leaves"]} leaves' for k, v in sizes.items()))
    mngr.close()
  return '\n'.join(lines)


def stored_state(directory, step: int | None = None) -> tuple[int, Any]:
  """``(step, arrays)`` of a checkpoint (the latest by default) as stored: no template, so
  two runs' states can be compared leaf by leaf (what the deployed-equals-simulated checks
  do). ``directory``: e.g. ``<workdir>/checkpoints/fl``."""
  mngr = checkpoint.manager(directory)
  try:
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    mngr.close()
  return step, out['state']
