"""fedblood's XLA flags, added to ``XLA_FLAGS`` when fedblood is imported (no JAX import here).

Kept apart from :mod:`fedblood.backend.platform` so that importing ``fedblood`` does not import
JAX: a process that only relays messages (the deployed site's ClientApp,
:mod:`fedblood.deploy.client_app`) starts in a fraction of the time.
"""

import os

# XLA flags fedblood adds on every backend, each only when the user's XLA_FLAGS does not set
# that flag (importing fedblood applies them: fedblood/__init__.py). YNN's 'dot' fusion instead
# of XLA:CPU's default YNN convolutions: faster FL rounds and VGG16 steps, never slower where
# measured (bench/bench_round.py --xla_options; the numbers are in docs/performance.md).
# A CPU-compiler flag: GPU and TPU programs are unaffected.
XLA_FLAGS: tuple = ('--xla_cpu_experimental_ynn_fusion_type=dot',)

_APPLIED: list = []
OFF_ENV = 'FEDBLOOD_XLA_FLAGS'  # '0': importing fedblood adds no XLA flag


def apply_xla_flags(flags=None, environ=None) -> list:
  """Adds ``flags`` (default :data:`XLA_FLAGS`) to ``XLA_FLAGS``, never overriding the user's.

  XLA reads ``XLA_FLAGS`` once, when JAX first initialises a backend: call this before any
  JAX computation. A flag whose name the user already set is left alone.

  ``FEDBLOOD_XLA_FLAGS=0`` in the environment adds none (a second numerics path, see
  :mod:`fedblood.backend.numerics`).

  Returns:
    The flags added.
  """
  flags = XLA_FLAGS if flags is None else flags
  environ = os.environ if environ is None else environ
  if environ.get(OFF_ENV) == '0':
    return []
  current = environ.get('XLA_FLAGS', '')
  present = {f.split('=')[0] for f in current.split()}
  added = [f for f in flags if f.split('=')[0] not in present]
  if added:
    environ['XLA_FLAGS'] = ' '.join([current] * bool(current) + added)
    if environ is os.environ:
      _APPLIED.extend(added)
  return added


def applied_flags() -> list:
  """The flags :func:`apply_xla_flags` added to this process's ``XLA_FLAGS``."""
  return list(_APPLIED)
