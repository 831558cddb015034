"""fedblood: federated learning of white-blood-cell classifiers across clinical centers."""

from fedblood.backend import flags as _flags

# XLA reads XLA_FLAGS when JAX starts its first backend: importing fedblood before any JAX
# computation is what applies fedblood's measured flags (never overriding the user's).
_flags.apply_xla_flags()
# glibc malloc keeps XLA:CPU's step buffers instead of mapping them afresh every call (decision 9
# of docs/performance.md); FEDBLOOD_MALLOC=0 leaves malloc alone.
_flags.tune_malloc()

__version__ = '0.1.0'
