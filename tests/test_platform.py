"""Tests for fedblood.backend.platform and flags: the compute dtype per backend, XLA flags and malloc settings that never override."""

import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from fedblood.backend import flags, platform, xla_cpu
from fedblood.model import models

FLAG = '--xla_cpu_experimental_ynn_fusion_type=dot'


@pytest.mark.parametrize('name,backend,want', [
    ('auto', 'cpu', jnp.float32),
    ('auto', 'gpu', jnp.bfloat16),
    ('auto', 'cuda', jnp.bfloat16),
    ('auto', 'tpu', jnp.bfloat16),
    ('float32', 'gpu', jnp.float32),
    ('bfloat16', 'cpu', jnp.bfloat16),
])
def test_compute_dtype(name, backend, want):
  assert platform.compute_dtype(name, backend) == jnp.dtype(want)


def test_compute_dtype_rejects_unknown_names():
  with pytest.raises(ValueError, match="model.dtype.*'float64'"):
    platform.compute_dtype('float64', 'cpu')


def test_models_build_resolves_auto_on_this_backend():
  cfg = ml_collections.ConfigDict(dict(name='VGG16', num_classes=5, head='gap', width=0.25,
                                       dtype='auto'))
  want = jnp.bfloat16 if jax.default_backend() in ('gpu', 'tpu') else jnp.float32
  assert models.build(cfg).dtype == jnp.dtype(want)


def test_apply_xla_flags_adds_missing_flags_after_the_users():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  assert flags.apply_xla_flags([FLAG], env) == [FLAG]
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=2 {FLAG}'
  empty = {}
  assert flags.apply_xla_flags([FLAG], empty) == [FLAG] and empty == {'XLA_FLAGS': FLAG}


def test_apply_xla_flags_never_overrides_the_users_value():
  env = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=eltwise'}
  assert flags.apply_xla_flags([FLAG], env) == []
  assert env == {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=eltwise'}


def test_default_flags_are_added_to_an_empty_environment():
  env = {}
  assert flags.apply_xla_flags(environ=env) == list(flags.XLA_FLAGS)
  assert env == {'XLA_FLAGS': ' '.join(flags.XLA_FLAGS)}


@pytest.mark.parametrize('user_flags', [None, '--xla_cpu_experimental_ynn_fusion_type=eltwise'])
def test_importing_fedblood_applies_the_flags_but_keeps_the_users(user_flags):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if user_flags is not None:
    env['XLA_FLAGS'] = user_flags
  code = 'import os, fedblood; print(os.environ.get("XLA_FLAGS"))'
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True).stdout.strip()
  assert out == (user_flags if user_flags is not None else ' '.join(flags.XLA_FLAGS) or 'None')


# Page faults of 10 malloc / fill / free cycles of 40 MiB after one warm-up cycle, in a fresh
# process that imports fedblood (argv[1] == '1') or not.
_FAULTS = """
import ctypes, resource, sys
if sys.argv[1] == '1':
  import fedblood
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 40 << 20
def cycle():
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(p)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(import_fedblood: bool, **env) -> int:
  environ = {k: v for k, v in os.environ.items()
             if k != 'GLIBC_TUNABLES' and not k.startswith(('MALLOC_', flags.MALLOC_ENV))}
  out = subprocess.run([sys.executable, '-c', _FAULTS, '1' if import_fedblood else '0'],
                       env={**environ, **env}, capture_output=True, text=True, check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(flags._glibc() is None, reason='malloc tuning is for glibc only')
def test_importing_fedblood_keeps_large_freed_blocks_instead_of_refaulting_them():
  pages = (40 << 20) // resource.getpagesize()
  # glibc's defaults map a 40 MiB block afresh every cycle (over the 32 MiB dynamic maximum).
  assert _faults(False) >= 9 * pages
  assert _faults(True, **{flags.MALLOC_ENV: '0'}) >= 9 * pages
  assert _faults(True, MALLOC_TRIM_THRESHOLD_='131072') >= 9 * pages  # the user's own setting
  # Tuned: the heap keeps the block, the 10 cycles touch memory already mapped.
  assert _faults(True) < pages


def test_tune_malloc_leaves_the_users_settings_alone():
  for env in ({flags.MALLOC_ENV: '0'}, {'MALLOC_MMAP_THRESHOLD_': '1'},
              {'GLIBC_TUNABLES': 'glibc.malloc.trim_threshold=1'}):
    assert flags.tune_malloc(env) == {}
  expected = {name: value for name, _, value in flags.MALLOC_OPTIONS}
  assert flags.tune_malloc({}) == (expected if flags._glibc() is not None else {})


def test_gradient_rewrite_per_backend():
  assert platform.gradient_rewrite('cpu') is xla_cpu.fast_gradients
  for backend in ('gpu', 'cuda', 'tpu'):
    assert platform.gradient_rewrite(backend) is platform.no_rewrite
  grad_fn = jax.grad(lambda x: x ** 2)
  assert platform.no_rewrite(grad_fn) is grad_fn
