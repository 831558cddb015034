"""fedblood's process settings, applied when fedblood is imported (no JAX import here).

XLA flags added to ``XLA_FLAGS``, and glibc malloc's thresholds (:func:`tune_malloc`), each
measured (docs/performance.md, decisions 3 and 9) and each left alone where the user sets it.

Kept apart from :mod:`fedblood.backend.platform` so that importing ``fedblood`` does not import
JAX: a process that only relays messages (the deployed site's ClientApp,
:mod:`fedblood.deploy.client_app`) starts in a fraction of the time.
"""

import ctypes
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


# glibc malloc thresholds fedblood sets (mallopt), on Linux with glibc only. XLA:CPU allocates a
# program's buffers with malloc: glibc's defaults mmap a block over its dynamic threshold (at most
# 32 MiB) and give freed memory at the top of the heap back to the kernel, so a training step that
# differentiates VGG16's first blocks (a few MiB of activations per buffer) maps, zero-fills and
# unmaps them on every call: 8,000 page faults a step, 16 % of its CPU time in the kernel. With
# the thresholds fixed above a step's buffers the heap keeps them: the step of the reference fit
# is 1.2x faster (bench/bench_malloc.py). Numbers are unchanged: only where buffers live moves.
# Cost: up to M_TRIM_THRESHOLD of freed heap stays with the process.
MALLOC_OPTIONS: tuple = (('M_MMAP_THRESHOLD', -3, 64 << 20), ('M_TRIM_THRESHOLD', -1, 256 << 20))
MALLOC_ENV = 'FEDBLOOD_MALLOC'  # '0': importing fedblood leaves malloc as it is
# The user's own malloc settings (glibc reads them at start): any of them and fedblood sets none.
USER_MALLOC_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_')
_TUNABLES = ('glibc.malloc.mmap_threshold', 'glibc.malloc.trim_threshold')
_MALLOC_APPLIED: dict = {}


def _glibc():
  """This process's C library when it is glibc (it has ``mallopt``), else None."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    return libc if hasattr(libc, 'mallopt') else None
  except (OSError, AttributeError):
    return None


def tune_malloc(environ=None) -> dict:
  """Sets :data:`MALLOC_OPTIONS` with glibc's ``mallopt``; elsewhere (macOS, musl) does nothing.

  ``FEDBLOOD_MALLOC=0`` in the environment sets none, and so does any malloc threshold the user
  set (``MALLOC_MMAP_THRESHOLD_`` and the like, or ``GLIBC_TUNABLES``' malloc thresholds).
  ``environ`` (default ``os.environ``) is only where those are read: what is set is this
  process's malloc either way.

  Returns:
    ``{option: value}`` of what was set.
  """
  environ = os.environ if environ is None else environ
  tunables = environ.get('GLIBC_TUNABLES', '')
  if (environ.get(MALLOC_ENV) == '0' or any(k in environ for k in USER_MALLOC_ENV)
      or any(t in tunables for t in _TUNABLES)):
    return {}
  libc = _glibc()
  if libc is None:
    return {}
  done = {name: value for name, param, value in MALLOC_OPTIONS if libc.mallopt(param, value) == 1}
  if environ is os.environ:
    _MALLOC_APPLIED.update(done)
  return done


def applied_malloc() -> dict:
  """The malloc thresholds :func:`tune_malloc` set in this process."""
  return dict(_MALLOC_APPLIED)
