"""Each center's local batches, drawn inside the jitted round from its padded examples.

* Each epoch, center k visits its ``n_k`` examples in a fresh random order, in
  ``ceil(n_k / batch_size)`` batches; the last batch is partial: ``batch['mask']``
  (float32[B], 1 for real examples) tells the loss which rows count. So center k
  runs exactly ``local_epochs * ceil(n_k / batch_size)`` steps (:func:`local_steps`).
* With ``fl.local_steps = S > 0`` every center runs exactly ``S`` steps instead, its batches
  drawn the same way, epoch after epoch (a center of ``ceil(n_k / B) < S`` batches starts a
  fresh order where its last pass ends; one of more stops part-way through its first pass).
* With DP-SGD, each step's batch is a Poisson sample (:func:`make_poisson_fn`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from fedblood.algorithms import dp as dp_lib


def ceil_div(a, b):
  return (a + b - 1) // b


def epoch_orders(rng, size, nmax: int, epochs: int):
  """``[epochs, nmax]`` visiting orders: a permutation of ``0..size-1``, then the padding rows."""
  # One sort of uniform keys, with the padding rows' keys above every real one.
  keys = jax.random.uniform(rng, (epochs, nmax))
  keys = jnp.where(jnp.arange(nmax) < size, keys, 2.0)
  return jnp.argsort(keys, axis=-1).astype(jnp.int32)


def make_batch_fn(examples, center, size, rng, batch_size: int, local_epochs: int,
                  local_steps: int = 0):
  """``step -> batch`` of center ``center`` of ``examples`` (leaves ``[C, Nmax, ...]``).

  ``local_steps`` > 0: the round runs that many steps whatever the center's size; a pass takes
  at least one step, so ``local_steps`` orders cover them (``local_epochs`` is then unused).
  """
  nmax = jax.tree.leaves(examples)[0].shape[1]
  steps_per_epoch = jnp.maximum(ceil_div(size, batch_size), 1)
  epochs = local_steps if local_steps else local_epochs
  if batch_size >= nmax:  # full-batch steps: visiting order is irrelevant, skip the sorts
    orders = jnp.broadcast_to(jnp.arange(nmax, dtype=jnp.int32), (epochs, nmax))
  else:
    orders = epoch_orders(rng, size, nmax, epochs)

  def batch_fn(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs - 1)
    pos = (step % steps_per_epoch) * batch_size + jnp.arange(batch_size)
    idx = orders[epoch, jnp.minimum(pos, nmax - 1)]
    batch = {name: x[center, idx] for name, x in examples.items()}
    batch['mask'] = (pos < size).astype(jnp.float32)
    return batch

  return batch_fn


def make_poisson_fn(examples, center, size, rng, batch_size: int, microbatch: int):
  """DP-SGD's ``step -> dp.PoissonSample`` of center ``center`` (Poisson rate ``B / n_k``).

  Each step every real row is sampled independently with probability ``batch_size / size``
  (drawn from ``fold_in(rng, step)``); the sampled rows' indices come first in a fixed-shape
  array, so the sample's size is data, not shape. Rows are gathered per chunk.
  """
  nmax = jax.tree.leaves(examples)[0].shape[1]
  rate = batch_size / jnp.maximum(size, 1).astype(jnp.float32)
  padded = ceil_div(nmax, microbatch) * microbatch

  def batch_fn(step):
    real = jnp.arange(nmax) < size
    chosen = real & (jax.random.uniform(jax.random.fold_in(rng, step), (nmax,)) < rate)
    count = jnp.sum(chosen, dtype=jnp.int32)
    order = jnp.nonzero(chosen, size=padded, fill_value=0)[0].astype(jnp.int32)

    def fetch(j):
      pos = j * microbatch + jnp.arange(microbatch)
      idx = jax.lax.dynamic_slice(order, (j * microbatch,), (microbatch,))
      batch = {name: x[center, idx] for name, x in examples.items()}
      batch['mask'] = (pos < count).astype(jnp.float32)
      return batch

    return dp_lib.PoissonSample(count, fetch)

  return batch_fn


def num_steps(size, batch_size: int, local_epochs: int, fixed: int = 0):
  """A center of ``size`` examples' local steps a round (``size`` an int or traced):
  ``local_epochs * ceil(size / batch_size)``, or ``fixed`` when it is > 0 (``fl.local_steps``;
  none for an empty center)."""
  return fixed * (size > 0) if fixed else local_epochs * ceil_div(size, batch_size)


def local_steps(sizes, batch_size: int, local_epochs: int, fixed: int = 0) -> list:
  """Each center's :func:`num_steps`, as ints."""
  return [int(num_steps(int(n), batch_size, local_epochs, fixed))
          for n in np.asarray(sizes).tolist()]


def steps_of(fl_cfg) -> int:
  """``fl.local_steps`` (0 where the config predates it: ``fl.local_epochs`` passes)."""
  return int(fl_cfg['local_steps']) if 'local_steps' in fl_cfg else 0


def steps_conflict(local_epochs, local_steps) -> str | None:
  """Why ``fl.local_steps`` cannot run beside ``fl.local_epochs`` (None when it can): fixed steps
  set a center's work a round by themselves. The one statement of the rule, which
  :func:`check_steps` and ``fedblood.study.validate`` both raise."""
  if local_steps and local_epochs != 1:
    return ("fl.local_steps fixes every center's steps a round by itself; set "
            'fl.local_epochs=1, or fl.local_steps=0 (fl.local_epochs passes)')
  return None


def check_steps(batch_size, local_epochs, local_steps) -> None:
  """Raises ValueError naming the ``fl`` keys of a local-step setting the round cannot run."""
  if batch_size < 1 or local_epochs < 1:
    raise ValueError(f'fl.batch_size and fl.local_epochs must be >= 1, got {batch_size}, '
                     f'{local_epochs}')
  if local_steps < 0:
    raise ValueError(f'fl.local_steps must be >= 0 (0: fl.local_epochs passes), got {local_steps}')
  conflict = steps_conflict(local_epochs, local_steps)
  if conflict:
    raise ValueError(f'fl.local_steps={local_steps} with fl.local_epochs={local_epochs}: '
                     f'{conflict}')
