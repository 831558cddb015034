"""A second numerics path for a run: same maths, different float rounding (``config.numerics``).

A recipe that holds only on one machine's rounding is not robust. Two switches rerun a study on
another path, to check that its spread stays inside the seed spread::

  # matmuls and convolutions at another precision (jax_default_matmul_precision)
  python launch.py --config configs/wbc.py --workdir W2 --config.numerics.matmul_precision=highest
  # without fedblood's XLA:CPU flag (YNN 'dot' fusion; fedblood.backend.flags.XLA_FLAGS)
  FEDBLOOD_XLA_FLAGS=0 python launch.py --config configs/wbc.py --workdir W3 \
      --config.numerics.xla_flags=False

XLA reads its flags once, when JAX starts a backend, so a config value alone cannot take them
away from a running process: ``numerics.xla_flags=False`` checks that the process started
without them (``FEDBLOOD_XLA_FLAGS=0``) and refuses to run otherwise, so config.json never
claims a path the run did not take. ``train.run`` applies the precision around the whole run
(:func:`applied`) and restores JAX's setting afterwards.
"""

import contextlib
import os

import jax

from fedblood.backend import flags

# Names jax_default_matmul_precision accepts ('' leaves JAX's default).
PRECISIONS = ('', 'default', 'high', 'highest', 'bfloat16', 'tensorfloat32', 'float32',
              'bfloat16_3x')


def active_flags(environ=None) -> list:
  """fedblood's XLA flags (:data:`fedblood.backend.flags.XLA_FLAGS`) set in ``XLA_FLAGS`` now."""
  environ = os.environ if environ is None else environ
  present = environ.get('XLA_FLAGS', '').split()
  return [f for f in flags.XLA_FLAGS if f in present]


def check(numerics, environ=None) -> None:
  """Refuses ``numerics.xla_flags=False`` in a process that runs with fedblood's XLA flags.

  ``numerics``: ``config.numerics`` (None or empty: the default path).
  """
  if not numerics or numerics.get('xla_flags', True):
    return
  flags = active_flags(environ)
  if flags:
    raise ValueError(
        f'config numerics.xla_flags=False, but this process runs with {flags} in XLA_FLAGS '
        '(XLA reads them when JAX starts). Start it with FEDBLOOD_XLA_FLAGS=0 in the environment '
        '(and without those flags in XLA_FLAGS), e.g. FEDBLOOD_XLA_FLAGS=0 python launch.py ...')


def applied(numerics):
  """Context of ``config.numerics``: ``jax.default_matmul_precision`` when one is set."""
  precision = (numerics or {}).get('matmul_precision', '')
  return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def describe(numerics) -> dict:
  """The numerics path of ``config.numerics`` (for results.json), or {} on the default path."""
  numerics = numerics or {}
  if not numerics.get('matmul_precision') and numerics.get('xla_flags', True):
    return {}
  return {'matmul_precision': numerics.get('matmul_precision') or 'default',
          'xla_flags': active_flags()}
