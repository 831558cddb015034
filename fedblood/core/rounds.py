"""One config -> compiled round builder, cached on a key derived from the config.

:func:`spec` reads exactly the fields of ``config.fl`` (and the model's loss) that the
compiled round depends on into a :class:`RoundSpec`; :func:`compiled` builds from the spec
ALONE, so the spec is the cache key by construction: a field the round reads is a field of the
spec, and a field it does not read (``fl.rounds``, ``fl.eval_model``, ``fl.participation``,
``fl.holdout``, ``fl.dp.delta``, ``checkpoint.*``...) cannot change the key::

  round_spec = rounds.spec(exp.loss, config.fl, dp_plan)
  algorithm, round_fn = rounds.compiled(round_spec)                 # simulate.build's Round
  algorithm, sweep_fn = rounds.compiled(round_spec, 'sweep')        # vectorized seeds
  algorithm, client = rounds.compiled(round_spec, 'client')         # a deployed site's step
  algorithm, server_step = rounds.compiled(round_spec, 'server')    # the deployed server's
"""

import functools
from typing import Any, NamedTuple

import jax

from fedblood import algorithms
from fedblood.algorithms import dp as dp_lib
from fedblood.core import batches, simulate, vectorized

FORMS = ('round', 'sweep', 'client', 'server')


class DpSpec(NamedTuple):
  """``fl.dp`` as the round reads it (``delta``, ``accountant``: accounting only)."""
  mode: str
  clip: float
  noise_multiplier: float   # calibrated by fedblood.privacy.plan when target_epsilon > 0
  microbatch: int | None
  seed: int | None


class RoundSpec(NamedTuple):
  """Every setting the compiled round depends on; ``None``: absent from the config."""
  loss: Any                 # fedblood.study.experiment.Loss: the model and augmentation, a value
  algorithm: str
  lr: float | None
  lr_decay: float | None
  alpha: float | None
  mu: float | None
  weight_decay: float | None
  max_grad_norm: float | None
  server_lr: float | None
  server_momentum: float | None
  weighting: str | None
  local_momentum: float | None
  batch_size: int
  local_epochs: int
  execution: str
  dp: DpSpec | None         # None: no fl.dp, or fl.dp.mode='off'
  logit_adjust: float = 0.0  # fl.logit_adjust: tau of the local loss (the examples' log_prior)
  swa_start: int = 0        # fl.swa_start: the server averages its models from that round (0: off)
  local_steps: int = 0      # fl.local_steps: every center's steps a round (0: local_epochs passes)


_ALGORITHM_KEYS = ('lr', 'lr_decay', 'alpha', 'mu', 'weight_decay', 'max_grad_norm', 'server_lr',
                   'server_momentum', 'weighting', 'local_momentum')


def spec(loss, fl, dp_plan=None) -> RoundSpec:
  """The :class:`RoundSpec` of ``config.fl``; ``dp_plan`` (:func:`fedblood.privacy.plan`)
  sets the calibrated noise multiplier."""
  for key in ('batch_size', 'local_epochs'):
    if key not in fl:
      raise ValueError(f'fl.{key} is missing from the config')
  dp = fl['dp'] if 'dp' in fl else None
  dp_spec = None
  if dp is not None and dp['mode'] != 'off':
    noise = dp['noise_multiplier'] if dp_plan is None else dp_plan.noise_multiplier
    dp_spec = DpSpec(dp['mode'], dp['clip'], noise, dp.get('microbatch'), dp.get('seed'))
  return RoundSpec(loss=loss, algorithm=fl['algorithm'],
                   **{k: fl[k] if k in fl else None for k in _ALGORITHM_KEYS},
                   batch_size=fl['batch_size'], local_epochs=fl['local_epochs'],
                   execution=fl['execution'] if 'execution' in fl else 'auto', dp=dp_spec,
                   logit_adjust=float(fl['logit_adjust']) if 'logit_adjust' in fl else 0.0,
                   swa_start=fl['swa_start'] if 'swa_start' in fl else 0,
                   local_steps=batches.steps_of(fl))


def local_loss(round_spec: RoundSpec):
  """The centers' training loss: the spec's ``loss`` (an :class:`fedblood.study.experiment.Loss`
  when ``logit_adjust`` is on) with its logit adjustment."""
  if not round_spec.logit_adjust:
    return round_spec.loss
  return round_spec.loss._replace(logit_adjust=round_spec.logit_adjust)


def prior_classes(fl, num_classes: int) -> int:
  """``num_classes`` when ``fl.logit_adjust`` is on, else 0: what
  :func:`fedblood.core.simulate.pad_centers` takes so that the examples carry ``log_prior``."""
  return num_classes if ('logit_adjust' in fl and fl['logit_adjust']) else 0


def fl_settings(round_spec: RoundSpec) -> dict:
  """The spec as the ``config.fl`` mapping the builders read (absent fields left out)."""
  settings = {k: v for k, v in round_spec._asdict().items()
              if k not in ('loss', 'dp', 'logit_adjust') and v is not None}
  if round_spec.dp is not None:
    settings['dp'] = {k: v for k, v in round_spec.dp._asdict().items() if v is not None}
  return settings


def algorithm_of(round_spec: RoundSpec):
  """The :class:`fedblood.algorithms.FedAlgorithm` of the spec (nothing compiled)."""
  return algorithms.build(fl_settings(round_spec))


@functools.lru_cache(maxsize=8)
def compiled(round_spec: RoundSpec, form: str = 'round') -> tuple[Any, Any]:
  """``(algorithm, fn)`` of the spec; cached on ``(spec, form)``.

  ``form``: ``'round'``: :func:`fedblood.core.simulate.build`'s Round; ``'sweep'``:
  :func:`fedblood.core.vectorized.build_sweep_round`'s; ``'client'``: a deployed site's jitted
  ``(server_state, client_state, weight, frozen, examples, size, rng, round_index) -> update``
  on ``examples`` of one center (leaves ``[1, Nmax, ...]``); ``'server'``: the simulation's own
  jitted server step (``execution='loop'``), ``(server_state, client_states, outs, sizes,
  active) -> (server_state, client_states, metrics)``.
  """
  if form not in FORMS:
    raise ValueError(f'form must be one of {FORMS}, got {form!r}')
  fl, loss = fl_settings(round_spec), local_loss(round_spec)
  if form == 'round':
    return simulate.build(fl, loss)
  algorithm = algorithms.build(fl)
  sizes = dict(batch_size=fl['batch_size'], local_epochs=fl['local_epochs'],
               local_steps=fl['local_steps'])
  if form == 'sweep':
    return algorithm, vectorized.build_sweep_round(algorithm, loss, execution=fl['execution'],
                                                   **sizes)
  if form == 'server':
    return algorithm, simulate.build_round(algorithm, loss, execution='loop', **sizes).server_step
  client = simulate.client_fn(algorithm, loss, **sizes, dp=dp_lib.from_config(fl))

  @jax.jit
  def step(server_state, client_state, weight, frozen, examples, size, rng_key, round_index):
    return client(server_state, client_state, weight, frozen, examples, 0, size, rng_key,
                  round_index)

  return algorithm, step
