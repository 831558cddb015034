"""Orbax checkpoints of a run: save every step, keep the last K and the best, restore exactly.

A workdir holds one Orbax CheckpointManager per stage under ``checkpoints/``::

  checkpoints/reference/<epoch>/   reference training (full params + Adam state)
  checkpoints/local_<center>/...   local-only baselines, same layout
  checkpoints/pooled/<epoch>/      pooled centralized baseline
  checkpoints/fl/<round>/          federated rounds: server state, every center's
                                   client state (stacked on a center axis), RNG key

Each step has two items: ``state`` (a pytree of arrays, saved with
``StandardSave``) and ``meta`` (JSON: round/epoch, metrics, what the tree is,
parameter counts). What is kept is what resume needs and nothing twice: the
FL checkpoints hold only the TRAINABLE part of the model (the frozen blocks
never change, so they live once, in the reference checkpoint), and they are
pruned to the last ``keep`` plus the best by a validation metric. The RNG key
is stored for completeness, though every random stream is re-derived with
``fold_in(seed, round)``.

Writes are synchronous and Orbax commits a step atomically (a temporary
directory renamed on success), so a run killed at any instant leaves the last
committed step intact; train.py writes its logs BEFORE committing a step and
truncates them to the committed step on resume.

Integrity. Each step carries the fingerprint of the run that wrote it (``meta['fingerprint']``,
with the config itself in ``meta['config']``; :func:`fedblood.rundir.workdir.fingerprint`), given
to :func:`manager` (by default that of the workdir whose ``checkpoints/`` holds the directory, so
every stage of a run, the deployed server and inference get it without passing it). After
Orbax commits a step, :func:`save` writes ``<step>/checksums.sha256``: the SHA-256 of every
file of the step; that file is the step's last write, so a step without it was cut short.

Restores go through :func:`restore`, which checks, before reading any array:

- the checksums (a file changed, truncated, zeroed or missing since the step was committed,
  even where Orbax would read it without noticing): :class:`ChecksumError`, damage;
- the fingerprint against the manager's: :class:`FingerprintMismatchError`, naming the step
  and the fields of the two configs that differ (another run's step copied in, or a workdir
  whose config.json was replaced); a step of a manager without a fingerprint (outside a
  workdir) is not compared;
- the stored tree (paths, shapes, dtypes, read from metadata) against the template built from
  the current config: :class:`ShapeMismatchError` naming the differing leaves, e.g. a
  checkpoint of a width-1/4 VGG restored into a width-1/8 one.

The last two are refused, never repaired (:class:`NotThisRun`); damage is set aside by
:func:`restore_latest`. A step written before fingerprints and checksums existed (no checksum
file and no fingerprint: an older fedblood's workdir) is accepted with a warning: only its
tree is checked.
"""

import json
from pathlib import Path
from typing import Any
import weakref

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from fedblood.rundir import step_files
from fedblood.rundir import workdir as workdir_lib

STATE, META = 'state', 'meta'
AUTO = 'auto'
_RUNS = weakref.WeakKeyDictionary()  # manager -> the Fingerprint its steps carry, or None


class NotThisRun(ValueError):
  """A step this run must not use (refused, never set aside)."""


class ShapeMismatchError(NotThisRun):
  """The stored tree differs from the one the current config builds."""


class FingerprintMismatchError(NotThisRun):
  """The step was written by a run of another config."""


def manager(directory, keep: int = 3, best_metric: str | None = None,
            best_mode: str = 'max', fingerprint=AUTO) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last ``keep`` steps plus the best one.

  Args:
    directory: where the steps live (created if missing).
    keep: number of most recent steps kept.
    best_metric: key of the ``metrics`` dict passed to :func:`save` that ranks
      steps; None keeps only the last ``keep``.
    best_mode: 'max' or 'min'.
    fingerprint: the :class:`fedblood.rundir.workdir.Fingerprint` that :func:`save` stores in each
      step and :func:`restore` requires; ``AUTO``: that of the workdir holding ``directory``
      (:func:`fedblood.rundir.workdir.enclosing_fingerprint`); None: neither stored nor checked.
  """
  if keep < 1:
    raise ValueError(f'checkpoint keep must be >= 1, got {keep}')
  policies = [checkpoint_managers.LatestN(n=keep)]
  if best_metric is not None:
    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    policies.append(checkpoint_managers.BestN(
        get_metric_fn=lambda m: m[best_metric], reverse=best_mode == 'min', n=1,
        keep_checkpoints_without_metrics=False))
  # best_fn makes Orbax write each step's metrics into the step (a ``metrics`` item), so the
  # ranking survives a restart; without it they live in memory only and a resumed run would
  # prune the best step as one "without metrics".
  best = {} if best_metric is None else dict(best_fn=lambda m: m[best_metric], best_mode=best_mode)
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False, create=True,
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies), **best)
  if fingerprint == AUTO:
    fingerprint = workdir_lib.enclosing_fingerprint(directory)
  mngr = _open(Path(directory).absolute(), options, handlers())
  _RUNS[mngr] = fingerprint
  return mngr


def handlers() -> dict:
  """The item handlers of a step: ``state`` (arrays) and ``meta`` (JSON)."""
  # Explicit handlers let a manager read item metadata before any save or restore call.
  return {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}


def _to_saveable(tree):
  # Orbax stores arrays; typed PRNG keys are stored as their raw uint32 data.
  def leaf(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    return np.asarray(x) if np.isscalar(x) or isinstance(x, np.generic) else x
  return jax.tree.map(leaf, tree)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict,
         metrics: dict | None = None) -> None:
  """Saves ``state`` (arrays) and ``meta`` (JSON) as ``step``; returns once committed.

  ``meta`` gets the manager's fingerprint; the step's checksums are written last.
  """
  fingerprint = _RUNS.get(mngr)
  if fingerprint is not None:
    meta = {**meta, 'fingerprint': fingerprint.digest, 'config': fingerprint.config}
  meta = json.loads(json.dumps(meta))  # fail early on anything JSON cannot hold
  mngr.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(_to_saveable(state)), META: ocp.args.JsonSave(meta)}),
            metrics=metrics, force=True)
  mngr.wait_until_finished()
  step_files.write_checksums(Path(mngr.directory) / str(step))


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = '/'.join(str(getattr(p, 'key', getattr(p, 'idx', getattr(p, 'name', p)))) for p in path)
    flat[key] = (tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype)))
  return flat


def stored_shapes(mngr: ocp.CheckpointManager, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """'/'-joined path -> (shape, dtype) of the stored state, read from metadata only."""
  tree = mngr.item_metadata(step)[STATE]
  tree = getattr(tree, 'tree', tree)
  return _flat_shapes(tree)


def _fmt(shape_dtype) -> str:
  return 'absent' if shape_dtype is None else f'{shape_dtype[1]}{list(shape_dtype[0])}'


def check_compatible(stored: dict, expected: dict, where: str) -> None:
  """Raises ShapeMismatchError naming the leaves whose path, shape or dtype differ."""
  if stored == expected:
    return
  lines = []
  for path in sorted(set(stored) | set(expected)):
    got, want = stored.get(path), expected.get(path)
    if got != want:
      lines.append(f'  {path}: checkpoint {_fmt(got)}, this config {_fmt(want)}')
  shown = '\n'.join(lines[:12]) + (f'\n  ... and {len(lines) - 12} more' if len(lines) > 12 else '')
  raise ShapeMismatchError(
      f'checkpoint {where} was written by a different model or run shape '
      f'({len(lines)} differing leaves):\n{shown}\n'
      'Use a fresh --workdir, or the config the checkpoint was made with.')


def restore(mngr: ocp.CheckpointManager, template, step: int | None = None) -> tuple[Any, dict]:
  """Restores ``(state, meta)`` of ``step`` (default latest) into the structure of ``template``.

  Args:
    mngr: the manager.
    template: a pytree of arrays (or ShapeDtypeStructs) shaped like the saved
      state, built from the current config.
    step: which step; None for the latest.

  Raises:
    FileNotFoundError: no such step.
    ChecksumError: a file of the step changed since it was committed.
    FingerprintMismatchError: the step was written by a run of another config.
    ShapeMismatchError: the stored tree differs from ``template``.
  """
  steps = mngr.all_steps()
  if step is None:
    step = mngr.latest_step()
  if step is None or step not in steps:
    raise FileNotFoundError(f'no checkpoint step {step} in {mngr.directory} (have {list(steps)})')
  check_step(mngr, step)
  template = _to_saveable(template)
  check_compatible(stored_shapes(mngr, step), _flat_shapes(template), f'{mngr.directory}/{step}')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  out = mngr.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}))
  # Orbax returns arrays committed to a device; fresh arrays are uncommitted. Jitted
  # functions compile once per kind, so hand back the kind a fresh run would have.
  state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), out[STATE])
  return state, out[META]


def check_step(mngr: ocp.CheckpointManager, step: int) -> None:
  """Checks a step's checksums and fingerprint (see the module docstring); reads no array."""
  step_dir = Path(mngr.directory) / str(step)
  checked = step_files.verify_checksums(step_dir)
  meta = read_meta(mngr, step)
  if 'fingerprint' in meta and not checked:
    raise step_files.ChecksumError(f'{step_dir / step_files.CHECKSUMS} is missing: the step was '
                                   'cut short while it was committed')
  if not checked:
    logging.warning('checkpoint step %d of %s has no checksums and no run fingerprint (an older '
                    "fedblood's): only its tree is checked", step, mngr.directory)
    return
  want = _RUNS.get(mngr)
  if want is None or meta.get('fingerprint') == want.digest:
    return
  if 'fingerprint' not in meta:
    raise FingerprintMismatchError(
        f'checkpoint step {step} of {mngr.directory} carries no run fingerprint (it was written '
        'outside a workdir and copied in), refusing to use it as this run\'s. Use a fresh '
        '--workdir, or set reference.restore to it.')
  diff = workdir_lib.config_diff(meta.get('config') or {}, want.config,
                                 ('in the checkpoint', 'in this run'))
  raise FingerprintMismatchError(
      f'checkpoint step {step} of {mngr.directory} was written by a run of another config '
      f'(fingerprint {meta["fingerprint"][:12]}, this run {want.digest[:12]}: '
      f'{workdir_lib.path(Path(mngr.directory).parent.parent, workdir_lib.CONFIG)}), refusing '
      'to use it. Differing fields:\n  ' + '\n  '.join(diff or ['(no config stored)'])
      + '\nMove the step out of this workdir, or use the workdir it came from.')


def restore_latest(mngr: ocp.CheckpointManager, template) -> tuple[Any, dict] | None:
  """:func:`restore` of the newest step that can be restored; None if no step is left.

  A step that fails to restore for any reason but :class:`NotThisRun` (a truncated array file,
  corrupt metadata, a checksum that does not match) is logged in one line naming the step and
  file, moved aside to ``<directory>.corrupt/`` (never deleted) and the next older step is
  tried.
  """
  while (step := mngr.latest_step()) is not None:
    try:
      return restore(mngr, template, step)
    except (NotThisRun, MemoryError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (Orbax/TensorStore/JSON damage)
      set_aside(mngr, step, e)
  return None


def damage(mngr: ocp.CheckpointManager, step: int, error: Exception) -> str:
  """One line on an unrestorable step: ``checkpoint step N of DIR cannot be restored (FILE...)``."""
  return step_files.describe(Path(mngr.directory), step, error)


def set_aside(mngr: ocp.CheckpointManager, step: int, error: Exception) -> None:
  """Moves an unrestorable step to ``<directory>.corrupt/<step>``, logs one line, reloads."""
  line = step_files.move_aside(Path(mngr.directory), step, error)
  mngr.reload()
  older = mngr.latest_step()
  logging.warning('%s; resuming from %s', line,
                  f'step {older}' if older is not None else 'the start of this stage')


def _open(directory: Path, options, item_handlers) -> ocp.CheckpointManager:
  """A manager; steps whose JSON files do not parse (Orbax reads metrics on opening) set aside."""
  try:
    return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers)
  except Exception as e:  # pylint: disable=broad-except
    steps = [int(p.name) for p in directory.glob('*') if p.name.isdigit()]
    bad = [step for step in steps
           if step_files.damaged_file(directory / str(step), e).endswith(step_files.JSON_FILES)]
    if not bad:
      raise
    for step in bad:
      logging.warning('%s', step_files.move_aside(directory, step, e))
  return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON ``meta`` item of a step (no arrays read)."""
  return mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
