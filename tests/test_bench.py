"""The benchmark scripts' own logic: timing order, layer shapes, and a tiny end-to-end run.

No timing is asserted: speed lives in the benchmarks' output, not in tests.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))

import bench_layers  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_step  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from fedblood.model import models  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_interleaved_times_blocks_round_robin_after_untimed_calls():
  calls = []
  candidates = {name: (lambda name=name: calls.append(name)) for name in 'ab'}
  secs = bench_step.interleaved(candidates, 3, block=2)
  assert calls == ['a', 'b'] + ['a', 'a', 'b', 'b'] * 3  # warm-up, then turns of 2 timed calls
  assert set(secs) == {'a', 'b'} and all(s >= 0 for s in secs.values())

  calls.clear()
  bench_step.interleaved(candidates, 2, block=1, untimed_s=1e-9)
  # Each turn: at least one untimed call, then the timed one, never mixing candidates.
  turns = ''.join(calls[2:])
  assert turns.count('a') >= 4 and turns.count('b') >= 4
  assert turns.startswith('aa') and 'aba' not in turns and 'bab' not in turns


@pytest.mark.parametrize('width,size', [(0.25, 64), (1.0, 224), (0.125, 32)])
def test_layer_shapes_are_the_models_convolutions(width, size):
  model = models.VGG16(num_classes=5, head='gap', width=width)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
  want, hw = [], size
  for block in range(1, 6):
    convs = params[f'block{block}']
    for name in sorted(convs):
      _, _, c_in, c_out = convs[name]['kernel'].shape
      want.append((block, hw, c_in, c_out))
    hw //= 2
  assert bench_layers.layer_shapes(width, size) == want


def test_bench_layers_runs_end_to_end_on_a_tiny_net(capsys):
  bench_layers.main(['--width', '0.0625', '--size', '16', '--batch', '1', '--steps', '1',
                     '--no_torch'])
  lines = capsys.readouterr().out.strip().splitlines()
  result = json.loads(lines[-1])
  assert result['bench'] == 'layers' and len(result['rows']) == 13
  assert [r['c_out'] for r in result['rows']] == [4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32]
  assert all(ms > 0 for r in result['rows'] for ms in r['ms']['jax'])
  assert sum(1 for line in lines if line.startswith('| ')) == 1 + 13 + 1  # header, layers, total


def test_interleaved_rounds_advances_each_state_round_by_round():
  calls = []

  def make(name):
    def round_fn(server, clients, frozen, centers, active, key, r):
      calls.append((name, r))
      return server + 1, clients, {'round': r}
    return round_fn

  runs = {n: dict(fn=make(n), state=(jnp.zeros(()), jnp.ones(2))) for n in 'ab'}
  medians = bench_step.interleaved_rounds(runs, None, None, None, None, 3)
  assert calls == [('a', 1), ('b', 1), ('a', 2), ('b', 2), ('a', 3), ('b', 3)]
  assert set(medians) == {'a', 'b'}
  for rec in runs.values():
    assert float(rec['state'][0]) == 3 and rec['metrics'] == {'round': 3}
    assert len(rec['times']) == 3
