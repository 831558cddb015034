"""Tests for fedblood.backend.platform: the compute dtype per backend and XLA flags that never override."""

import os
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


def test_gradient_rewrite_per_backend():
  assert platform.gradient_rewrite('cpu') is xla_cpu.fast_gradients
  for backend in ('gpu', 'cuda', 'tpu'):
    assert platform.gradient_rewrite(backend) is platform.no_rewrite
  grad_fn = jax.grad(lambda x: x ** 2)
  assert platform.no_rewrite(grad_fn) is grad_fn
