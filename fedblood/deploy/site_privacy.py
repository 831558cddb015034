"""Differential privacy at a deployed site: secret noise, the site's own accounting, its budget.

A deployed study with ``fl.dp.mode='example'`` trains each center's local update with DP-SGD at
its site, with the simulation's mechanism (:mod:`fedblood.algorithms.dp`: Poisson-sampled steps
of expected size ``fl.batch_size``, each example's gradient clipped to ``fl.dp.clip``, Gaussian
noise), and three differences from the simulation:

* **Secret noise.** The key of the site's local update (its Poisson samples, augmentation and
  noise) comes from the operating system's secure randomness (``os.urandom``), never from the
  config's seed, which the server knows. A deployed DP run is therefore not reproducible: two
  runs of one config differ, and neither equals the simulation (whose seeded noise is for
  research only, docs/privacy.md).
* **The site accounts for itself.** Each train request it answers adds ``local_epochs *
  ceil(n / B)`` (or ``fl.local_steps``) Poisson-sampled Gaussian mechanisms of rate ``B / n``
  to a ledger in its state dir (``privacy.json``), written before the reply leaves, whether or
  not the server then accepts it. The reply reports dp-accounting's epsilon at the study's
  ``fl.dp.delta`` for what the site ran in this study, and for everything its ledger holds
  (every study on these images).
* **A budget.** ``dp-epsilon-budget`` in the node config (with ``dp-delta``, default the
  study's ``fl.dp.delta``): a train request that would take the site's total epsilon above it is
  declined with the reason, and the server leaves the center out of that round. A site with a
  budget declines every study without DP.

The noise multiplier is ``fl.dp.noise_multiplier``, or, with ``fl.dp.target_epsilon``, the
smallest that keeps this site within the target over ``fl.rounds`` (calibrated on its own
``n``; the simulation takes the largest over the centers). Neighbouring datasets differ by one
training image of the site (add or remove).
"""

import functools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from fedblood import privacy
from fedblood.deploy.relay import SiteError

LEDGER = 'privacy.json'  # in the state dir: every mechanism the site ran, by study and round
BUDGET, DELTA = 'dp-epsilon-budget', 'dp-delta'  # node config keys


class Spend(NamedTuple):
  """A train request's privacy, from :func:`prepare`.

  Attributes:
    plan: the site's :class:`fedblood.privacy.Plan` (one center: this site).
    ledger: the ledger's entries with this request's added (what :func:`spend` writes).
    declined: why the site will not train (its budget), or None.
    report: the reply's ``privacy`` after this request (before it, if declined).
  """
  plan: privacy.Plan | None
  ledger: list | None
  declined: str | None
  report: dict


def secret_key() -> jax.Array:
  """A PRNG key from 64 bits of the operating system's secure randomness."""
  return jax.random.wrap_key_data(np.frombuffer(os.urandom(8), np.uint32))


def budget(node_config, n: int, study_delta: float | None) -> tuple[float | None, float | None]:
  """``(epsilon budget or None, delta)`` of the node config, checked.

  Raises:
    SiteError: naming the node config key that is not a number in range.
  """
  def number(key, default):
    if key not in node_config:
      return default
    try:
      return float(node_config[key])
    except (TypeError, ValueError):
      raise SiteError(f'node config {key}={node_config[key]!r} is not a number') from None

  epsilon, delta = number(BUDGET, None), number(DELTA, study_delta)
  if epsilon is not None and not epsilon > 0:
    raise SiteError(f'node config {BUDGET}={epsilon} must be > 0')
  if delta is not None and not 0 < delta < 1 / n:
    raise SiteError(f'node config {DELTA}={delta} must be in (0, 1/n) for this site\'s n={n} '
                    f'training images (1/n = {1 / n:.2e})')
  return epsilon, delta


def read(state_dir: Path) -> list:
  """The ledger's entries (none if the site never trained with DP)."""
  path = Path(state_dir) / LEDGER
  if not path.exists():
    return []
  try:
    return list(json.loads(path.read_text())['mechanisms'])
  except (ValueError, KeyError, TypeError) as e:
    raise SiteError(f'{path} is not this site\'s privacy ledger ({e}); it is never rewritten '
                    'from scratch: restore it, or give the site a new state-dir') from None


def _write(state_dir: Path, entries: list) -> None:
  path = Path(state_dir) / LEDGER
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps({'mechanisms': entries}, indent=1))
  with open(tmp, 'rb') as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _mechanisms(entries) -> list:
  # Rounds of one setting compose as one self-composed mechanism of their summed steps (the
  # same epsilon), so the accounting stays as cheap however long the ledger grows.
  steps = {}
  for e in entries:
    key = (e['rate'], e['noise_multiplier'])
    steps[key] = steps.get(key, 0) + e['steps']
  return [('example', rate, sigma, s) for (rate, sigma), s in steps.items()]


def _report(entries: list, study: str, plan: privacy.Plan, site_delta: float,
            epsilon_budget: float | None) -> dict:
  ours = [e for e in entries if e['study'] == study]
  return {'epsilon': privacy.composed_epsilon(_mechanisms(ours), plan.delta, plan.accountant),
          'delta': plan.delta, 'steps': sum(e['steps'] for e in ours), 'rate': plan.rates[0],
          'noise_multiplier': plan.noise_multiplier, 'accountant': plan.accountant,
          'site_epsilon': privacy.composed_epsilon(_mechanisms(entries), site_delta,
                                                   plan.accountant),
          'site_delta': site_delta, 'budget': epsilon_budget}


def prepare(fl_cfg, name: str, n: int, state_dir: Path, study: str, round_index: int,
            node_config) -> Spend | None:
  """What training round ``round_index`` of ``study`` costs this site; None without DP or budget.

  Raises:
    SiteError: a node config key out of range, or an unreadable ledger.
  """
  on = privacy.enabled(fl_cfg)
  epsilon_budget, site_delta = budget(node_config, n, fl_cfg.dp.delta if on else None)
  if not on:
    if epsilon_budget is None:
      return None
    return Spend(None, None, f'this site trains only with differential privacy ({BUDGET}='
                 f'{epsilon_budget:g} in its node config); the study has fl.dp.mode=\'off\'', {})
  plan = _plan(json.dumps(fl_cfg.to_dict(), sort_keys=True), name, n)
  entry = {'study': study, 'round': int(round_index), 'steps': plan.steps_per_round[0],
           'rate': plan.rates[0], 'noise_multiplier': plan.noise_multiplier}
  entries = read(state_dir)
  ledger = entries + [entry]
  after = _report(ledger, study, plan, site_delta, epsilon_budget)
  if epsilon_budget is not None and not after['site_epsilon'] <= epsilon_budget:
    return Spend(plan, None, f'privacy budget: training round {round_index} would take this '
                 f'site\'s epsilon to {after["site_epsilon"]:.4g} (delta {site_delta:g}), above its '
                 f'{BUDGET}={epsilon_budget:g}',
                 _report(entries, study, plan, site_delta, epsilon_budget))
  return Spend(plan, ledger, None, after)


@functools.lru_cache(maxsize=16)
def _plan(fl_json: str, name: str, n: int) -> privacy.Plan:
  # Calibrating to fl.dp.target_epsilon takes dp-accounting a while: once per study and site.
  return privacy.plan(ml_collections.ConfigDict(json.loads(fl_json)), {name: n})


def spend(state_dir: Path, granted: Spend) -> None:
  """Adds the request's mechanisms to the ledger (before the reply that releases them leaves)."""
  _write(state_dir, granted.ledger)


def check_report(value) -> str | None:
  """Why a site's ``privacy`` reply is not one (the server's check), or None."""
  if not isinstance(value, dict):
    return 'privacy: not a mapping'
  for key in ('epsilon', 'delta', 'site_epsilon', 'noise_multiplier', 'rate'):
    v = value.get(key)
    if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
      return f'privacy: {key}={v!r} is not a number >= 0'
  if not isinstance(value.get('steps'), int) or value['steps'] < 0:
    return f'privacy: steps={value.get("steps")!r} is not a count'
  return None


def summary(fl_cfg, reports: dict) -> dict:
  """results.json's ``privacy`` of a deployed DP run: ``reports`` ``{center: the site's last
  privacy report}`` (a center whose site never reported has none)."""
  return {'mode': 'example', 'clip': float(fl_cfg.dp.clip), 'delta': float(fl_cfg.dp.delta),
          'accountant': fl_cfg.dp.get('accountant', 'rdp'),
          'sampling': 'Poisson, rate fl.batch_size / n_k',
          'neighbouring': 'add or remove one example', 'noise_multiplier': None,
          'noise': "secret: each site's os.urandom (deployed)",
          'calibrated_to_epsilon': float(fl_cfg.dp.get('target_epsilon', 0.0)) or None,
          'centers': dict(reports)}
