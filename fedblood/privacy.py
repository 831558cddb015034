"""Privacy accounting of a run's ``fl.dp`` with Google's dp-accounting (optional extra ``dp``).

What is accounted (mechanisms in :mod:`fedblood.algorithms.dp`), neighbouring datasets
differing by adding or removing one record (dp-accounting's ``ADD_OR_REMOVE_ONE``):

* ``mode='example'``: per center k, the record is one of its training images. Each local step
  is a Poisson-sampled Gaussian mechanism (rate ``q_k = B / n_k``, noise multiplier sigma);
  a round is ``local_epochs * ceil(n_k / B)`` of them (``fl.local_steps`` when that is > 0),
  rounds the center sits out add none.
  ``epsilon_k`` after ``s`` steps is that of
  ``SelfComposedDpEvent(PoissonSampledDpEvent(q_k, GaussianDpEvent(sigma)), s)`` at
  ``delta``. ``n_k`` is public.
* ``mode='client'``: the record is a whole center. Each round is one Gaussian mechanism on
  the clipped updates' sum (every center takes part: no sampling amplification), so after
  ``r`` rounds ``SelfComposedDpEvent(GaussianDpEvent(sigma), r)``, the same for all centers.

Not covered by either: the training loss / accuracy each center reports per round, and the
evaluation on validation and test splits (monitoring of the simulation; a deployment would
not release them). ``fl.dp.target_epsilon > 0`` calibrates sigma before training: the smallest
sigma that keeps every center's epsilon over all ``fl.rounds`` within the target.
"""

import contextlib
import functools
import logging
import math
from typing import NamedTuple, Sequence

ACCOUNTANTS = ('rdp', 'pld')


def _dp_accounting():
  try:
    import dp_accounting  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("fl.dp needs Google's dp-accounting: pip install 'fedblood[dp]'") from e
  return dp_accounting


class Plan(NamedTuple):
  """A run's privacy parameters.

  Attributes:
    mode: 'example' or 'client'.
    noise_multiplier: sigma (calibrated when ``fl.dp.target_epsilon`` is set).
    clip: the per-example gradient (example) or per-center update (client) L2 bound.
    delta: the delta every epsilon is reported at.
    accountant: 'rdp' or 'pld'.
    centers: center names.
    rates: per center, the Poisson sampling rate ``q_k`` (1.0 in client mode).
    steps_per_round: per center, mechanisms composed per round it takes part in.
    calibrated: whether ``noise_multiplier`` came from ``target_epsilon``.
  """
  mode: str
  noise_multiplier: float
  clip: float
  delta: float
  accountant: str
  centers: tuple
  rates: tuple
  steps_per_round: tuple
  calibrated: bool


def event(mode: str, rate: float, noise_multiplier: float, steps: int):
  """The dp-accounting event of ``steps`` mechanisms of ``mode`` (see the module docstring)."""
  dpa = _dp_accounting()
  if steps == 0:
    return dpa.NoOpDpEvent()
  gaussian = dpa.GaussianDpEvent(noise_multiplier)
  one = gaussian if mode == 'client' else dpa.PoissonSampledDpEvent(rate, gaussian)
  return dpa.SelfComposedDpEvent(one, int(steps))


class _Unconverged(logging.Filter):
  """Drops (and counts) dp-accounting's warning for an RDP order it leaves out.

  For low fractional orders (alpha near 1) at small sigma, the RDP accountant's series for the
  sampled Gaussian does not converge; dp-accounting then logs one warning per order and
  computes epsilon from the other orders, a valid bound. The epsilon is the accountant's own,
  unchanged: only the warnings, dozens per call, stay out of the user's log.
  """

  def __init__(self):
    super().__init__()
    self.orders = 0

  def filter(self, record) -> bool:
    text = record.getMessage()
    if 'failed to converge' in text and 'Excluding this order' in text:
      self.orders += 1
      return False
    return True


@contextlib.contextmanager
def _quiet_unconverged_orders():
  logger, dropped = logging.getLogger('absl'), _Unconverged()
  logger.addFilter(dropped)
  try:
    yield
  finally:
    logger.removeFilter(dropped)
    if dropped.orders:
      logger.debug('dp-accounting left out %d RDP order(s) whose series did not converge; '
                   'epsilon is its minimum over the other orders', dropped.orders)


def _accountant(name: str):
  dpa = _dp_accounting()
  return dpa.rdp.RdpAccountant() if name == 'rdp' else dpa.pld.PLDAccountant()


@functools.lru_cache(maxsize=4096)
def _epsilon(mode, rate, noise_multiplier, steps, delta, accountant) -> float:
  return composed_epsilon(((mode, rate, noise_multiplier, steps),), delta, accountant)


def composed_epsilon(mechanisms: Sequence[tuple], delta: float, accountant: str = 'rdp') -> float:
  """dp-accounting's epsilon at ``delta`` of ``mechanisms`` composed, each ``(mode, rate,
  noise_multiplier, steps)`` as :func:`event` takes them (0 for none, inf for a noiseless one)."""
  mechanisms = [m for m in mechanisms if int(m[3]) > 0]
  if not mechanisms:
    return 0.0
  if any(m[2] == 0 for m in mechanisms):
    return math.inf
  acc = _accountant(accountant)
  with _quiet_unconverged_orders():
    for mode, rate, noise_multiplier, steps in mechanisms:
      acc.compose(event(mode, rate, noise_multiplier, steps))
    return float(acc.get_epsilon(delta))


def epsilons(plan: Plan, steps_taken: Sequence[int]) -> list:
  """Each center's epsilon at ``plan.delta`` after it has taken ``steps_taken[k]`` mechanisms."""
  return [_epsilon(plan.mode, rate, plan.noise_multiplier, int(s), plan.delta, plan.accountant)
          for rate, s in zip(plan.rates, steps_taken)]


def calibrate(mode, rates, total_steps, target_epsilon, delta, accountant) -> float:
  """The smallest sigma (to dp-accounting's tolerance) with every center's epsilon <= target."""
  dpa = _dp_accounting()
  sigmas = []
  with _quiet_unconverged_orders():
    for rate, steps in zip(rates, total_steps):
      sigmas.append(dpa.calibrate_dp_mechanism(
          lambda: _accountant(accountant),
          lambda sigma, rate=rate, steps=steps: event(mode, rate, sigma, steps),
          target_epsilon, delta, bracket_interval=dpa.LowerEndpointAndGuess(1e-3, 1.0)))
  return float(max(sigmas))


def _section(fl_cfg):
  """``fl.dp`` when DP is on, else None."""
  cfg = fl_cfg.get('dp') if hasattr(fl_cfg, 'get') else None
  return None if cfg is None or cfg['mode'] == 'off' else cfg


def enabled(fl_cfg) -> bool:
  """Whether ``config.fl`` trains with DP (``fl.dp.mode`` set and not 'off')."""
  return _section(fl_cfg) is not None


def check(fl_cfg, sizes: dict) -> None:
  """Refuses an ``fl.dp`` the accounting cannot cover, before anything runs.

  Args:
    fl_cfg: ``config.fl``.
    sizes: ``{center: n_train}`` of the centers that train.

  Raises:
    ValueError: naming the key (and center) at fault.
    ImportError: DP is on and the ``dp`` extra (dp-accounting) is not installed.
  """
  cfg = _section(fl_cfg)
  if cfg is None:
    return
  from fedblood.algorithms import dp  # pylint: disable=g-import-not-at-top
  dp.check_config(fl_cfg)
  accountant = cfg.get('accountant', 'rdp')
  if accountant not in ACCOUNTANTS:
    raise ValueError(f'fl.dp.accountant must be one of {ACCOUNTANTS}, got {accountant!r}')
  _check_rates(cfg['mode'], int(fl_cfg['batch_size']), float(cfg['delta']), sizes)
  target = float(cfg.get('target_epsilon', 0.0) or 0.0)
  if not target >= 0:
    raise ValueError(f'fl.dp.target_epsilon must be >= 0 (0: use fl.dp.noise_multiplier), got '
                     f'{target}')
  _dp_accounting()


def _check_rates(mode: str, batch: int, delta: float, sizes: dict) -> None:
  if mode == 'example':
    for name, n in sizes.items():
      n = int(n)
      if batch >= n:
        raise ValueError(f'fl.dp.mode=example samples each step at rate fl.batch_size / n_k < 1; '
                         f'center {name!r} has n_k={n} <= fl.batch_size={batch}')
      if not 0 < delta < 1 / n:
        raise ValueError(f'fl.dp.delta={delta} must be in (0, 1/n_k) for every center; center '
                         f'{name!r} has n_k={n} (1/n_k = {1 / n:.2e})')
  elif not 0 < delta < 1 / len(sizes):
    raise ValueError(f'fl.dp.delta={delta} must be in (0, 1/C) with C={len(sizes)} centers')


def plan(fl_cfg, sizes: dict) -> Plan | None:
  """The run's :class:`Plan` from ``config.fl`` and ``{center: n_train}``; None if DP is off.

  Raises:
    ValueError: naming the key (and center) of a setting the accounting cannot cover
      (:func:`check`).
  """
  cfg = _section(fl_cfg)
  if cfg is None:
    return None
  check(fl_cfg, sizes)
  mode, batch = cfg['mode'], int(fl_cfg['batch_size'])
  accountant, delta = cfg.get('accountant', 'rdp'), float(cfg['delta'])
  names, counts = list(sizes), [int(n) for n in sizes.values()]
  if mode == 'example':
    rates = tuple(batch / n for n in counts)
    fixed = int(fl_cfg['local_steps']) if 'local_steps' in fl_cfg else 0  # as the round runs
    per_round = tuple(fixed or int(fl_cfg['local_epochs']) * -(-n // batch) for n in counts)
  else:
    rates, per_round = (1.0,) * len(counts), (1,) * len(counts)
  sigma, calibrated = float(cfg['noise_multiplier']), False
  target = float(cfg.get('target_epsilon', 0.0) or 0.0)
  if target > 0:
    total = [s * int(fl_cfg['rounds']) for s in per_round]
    sigma, calibrated = calibrate(mode, rates, total, target, delta, accountant), True
  return Plan(mode, sigma, float(cfg['clip']), delta, accountant, tuple(names), rates, per_round,
              calibrated)


def steps_taken(plan: Plan, actives: Sequence[Sequence[bool]]) -> list:
  """Mechanisms each center has taken after rounds with the given active masks."""
  return [sum(int(a[k]) for a in actives) * plan.steps_per_round[k]
          for k in range(len(plan.centers))]


def summary(plan: Plan, steps: Sequence[int], target_epsilon: float = 0.0) -> dict:
  """The ``privacy`` entry of results.json."""
  eps = epsilons(plan, steps)
  sampling = ('Poisson, rate fl.batch_size / n_k' if plan.mode == 'example'
              else 'none (every center every round)')
  return {
      'mode': plan.mode, 'noise_multiplier': plan.noise_multiplier, 'clip': plan.clip,
      'delta': plan.delta, 'accountant': plan.accountant, 'sampling': sampling,
      'neighbouring': 'add or remove one ' + ('example' if plan.mode == 'example' else 'center'),
      'calibrated_to_epsilon': target_epsilon if plan.calibrated else None,
      'centers': {name: {'epsilon': e, 'rate': r, 'steps': int(s)}
                  for name, e, r, s in zip(plan.centers, eps, plan.rates, steps)},
  }


def report_lines(privacy: dict) -> list:
  """Markdown lines of a results.json ``privacy`` entry for report.md (simulated or deployed:
  a deployed run's sites each report their own noise multiplier, and their noise is secret)."""
  level = 'record level (DP-SGD per center)' if privacy['mode'] == 'example' else (
      'client level (DP-FedAvg)')
  sigma = privacy.get('noise_multiplier')
  per_center = lambda c, v: (f'`{c}` {v["epsilon"]:.3g}' if sigma is not None else
                             f'`{c}` {v["epsilon"]:.3g} (noise multiplier '
                             f'{v["noise_multiplier"]:.4g}, {v["steps"]} steps)')
  head = f'noise multiplier {sigma:.4g}, ' if sigma is not None else ''
  noise = f', noise: {privacy["noise"]}' if privacy.get('noise') else ''
  return [f'- differential privacy, {level}: {head}clip {privacy["clip"]:g}, delta '
          f'{privacy["delta"]:g}, {privacy["accountant"]} accountant, sampling: '
          f'{privacy["sampling"]}{noise}; epsilon per center: '
          + ', '.join(per_center(c, v) for c, v in privacy['centers'].items())]
