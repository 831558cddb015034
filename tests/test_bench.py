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

import bench_augment  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_dp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_eval  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_layers  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_malloc  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_step  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import bench_val  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from fedblood.backend import flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
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


@pytest.mark.parametrize('stride,padding,rhs_dilation', [
    ((1, 1), 'SAME', (1, 1)), ((2, 2), 'SAME', (1, 1)), ((1, 1), ((2, 1), (0, 3)), (2, 1)),
    ((2, 1), 'VALID', (1, 2))])
def test_model_flops_counts_convolutions_and_their_gradients_as_xla_cpu_does(
    stride, padding, rhs_dilation):
  # The MFU numerator: equal to XLA:CPU's cost analysis for a program of convolutions alone
  # (forward, input gradient, weight gradient), whose transposed convolutions are padded.
  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=rhs_dilation,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def forward_and_gradients(x, w, ct):
    y, vjp = jax.vjp(conv, x, w)
    return y, vjp(ct)

  x, w = jnp.ones((2, 11, 10, 3)), jnp.ones((3, 3, 3, 8))
  ct = jnp.ones(jax.eval_shape(conv, x, w).shape)
  for fn, args in ((conv, (x, w)), (forward_and_gradients, (x, w, ct))):
    xla = jax.jit(fn).lower(*args).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert bench_step.model_flops(fn, *args) == xla['flops']
  # Two multiply-adds of the forward's count go to the two gradients: 3x in all.
  assert bench_step.model_flops(forward_and_gradients, x, w, ct) == 3 * bench_step.model_flops(
      conv, x, w)


def test_model_flops_counts_matrix_products_inside_scans_per_iteration():
  a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 4))
  assert bench_step.model_flops(jnp.matmul, a, b) == 2 * 3 * 5 * 7 * 4

  def scanned(a, b):
    return jax.lax.scan(lambda c, _: (c @ b[0] @ b[0].T, None), a[0], None, length=6)[0]

  assert bench_step.model_flops(scanned, a, b) == 6 * 2 * (2 * 5 * 7 * 4)


def test_model_flops_of_the_vgg16_step_is_its_convolutions_at_224_px():
  # fc head, blocks 1-3 frozen, 224 px: 51.3 GFLOP per image (XLA:CPU's cost analysis of the
  # compiled step, elementwise work included: 51.5). Traced only, nothing is compiled.
  from fedblood.algorithms import base  # pylint: disable=g-import-not-at-top
  from fedblood.backend import platform  # pylint: disable=g-import-not-at-top
  from fedblood.model import classifier, partition  # pylint: disable=g-import-not-at-top
  model = models.VGG16(num_classes=5, head='fc', width=1.0, dtype=jnp.bfloat16)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  trainable, frozen = partition.split(params, partition.frozen_block_rules(3))
  grad_fn = base.gradient(classifier.classifier_loss(model), platform.no_rewrite)
  batch = {'image': jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8),
           'label': jax.ShapeDtypeStruct((2,), jnp.int32),
           'mask': jax.ShapeDtypeStruct((2,), jnp.float32)}
  per_image = bench_step.model_flops(grad_fn, trainable, frozen, batch, jax.random.key(0)) / 2
  assert per_image / 1e9 == pytest.approx(51.3068, abs=1e-4)


def test_bench_dp_times_configs_wbc_model_and_runs_end_to_end_on_a_tiny_net(capsys):
  from configs import wbc  # pylint: disable=g-import-not-at-top
  want = wbc.get_config().model
  got = bench_dp.model_of(bench_dp.parse_args([]))
  fields = ('num_classes', 'head', 'width', 'input_norm', 'conv_init')
  assert want.name == 'VGG16' and isinstance(got, models.VGG) and got.stages == (2, 2, 3, 3, 3)
  assert {f: getattr(got, f) for f in fields} == {f: want[f] for f in fields}
  assert got.dtype == jnp.float32  # --dtype acts: the compute dtype of the timed model
  assert bench_dp.model_of(bench_dp.parse_args(['--dtype', 'bfloat16'])).dtype == jnp.bfloat16

  bench_dp.main(['--width', '0.0625', '--image_size', '32', '--batch', '4', '--microbatches',
                 '4,2', '--steps', '1', '--repeats', '1'])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(result['ratio_to_plain']) == {'plain', 'dp[mb=4]', 'dp[mb=2]'}
  assert result['ratio_to_plain']['plain'] == 1.0 and result['args']['dtype'] == 'float32'


def test_bench_eval_times_the_fl_evaluation_end_to_end_on_a_tiny_net(capsys):
  bench_eval.main(['--tiny'])
  out = capsys.readouterr().out.strip().splitlines()
  result = json.loads(out[-1])
  assert set(result['secs']) == {'whole', 'halves', 'kept', 'round'}
  assert result['eval_images'] == 42 and result['max_abs_diff'] < 1e-5  # the same predictions
  assert sum(1 for line in out if line.startswith('| ')) == 1 + 4  # header, 4 candidates


def test_bench_val_times_a_fits_validation_four_ways_with_the_same_metrics(capsys):
  bench_val.main(['--tiny'])
  out = capsys.readouterr().out.strip().splitlines()
  result = json.loads(out[-1])
  assert result['sizes'] == {'a': 20, 'b': 9} and result['same']
  assert all(set(s) == {'chunk128', 'multiple16', 'kept', 'step16'}
             for s in result['secs'].values())
  assert sum(1 for line in out if line.startswith('| ')) == 1 + 2  # header, 2 validation sets


@pytest.mark.skipif(flags._glibc() is None, reason='malloc tuning is for glibc only')
def test_bench_malloc_alternates_child_processes_with_and_without_the_tuning(capsys):
  record = bench_malloc.main(['--tiny', '--workloads', 'eval tta'])
  (row,) = record['rows']
  assert row['workload'] == 'eval tta' and row['same_numbers']
  assert set(row['seconds']) == {'tuned', 'default'} and row['ratio'] > 0
  # Each child really ran as labelled (main() asserts the tuned child applied malloc's settings
  # and the default one did not). How many pages a call of XLA's multi-threaded program faults
  # is not asserted: it depends on which malloc arena each of its threads lands in, which the
  # machine's load decides (a CI run beside a training study measured 8,351 tuned against
  # 8,355 default where quiet runs gave a fourth); tests/test_platform.py asserts the
  # thresholds' effect where it is deterministic, one thread's malloc/free cycles.
  assert all(row['faults_per_call'][v] >= 0 for v in ('tuned', 'default'))
  assert '| eval tta |' in capsys.readouterr().out


def test_bench_malloc_children_get_no_malloc_setting_of_the_user():
  # With the user's own thresholds fedblood sets none, and both children would run untuned.
  environ = {'PATH': '/bin', 'FEDBLOOD_MALLOC': '1', 'MALLOC_MMAP_THRESHOLD_': '4096',
             'MALLOC_TOP_PAD_': '0',
             'GLIBC_TUNABLES': 'glibc.cpu.x86_rep_movsb_threshold=2048:'
                               'glibc.malloc.trim_threshold=1:glibc.malloc.mmap_threshold=9'}
  tuned, default = (bench_malloc.child_env(environ, v) for v in ('tuned', 'default'))
  assert tuned == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.cpu.x86_rep_movsb_threshold=2048'}
  assert default == {**tuned, 'FEDBLOOD_MALLOC': '0'}
  only_malloc = {'GLIBC_TUNABLES': 'glibc.malloc.mmap_threshold=9'}
  assert bench_malloc.child_env(only_malloc, 'tuned') == {}


def test_bench_malloc_says_why_it_has_nothing_to_compare_off_glibc(monkeypatch):
  monkeypatch.setattr(bench_malloc.flags, '_glibc', lambda: None)
  with pytest.raises(SystemExit, match='not glibc'):
    bench_malloc.main(['--tiny'])


def test_bench_augment_times_both_rand_conv_forms_which_agree(capsys):
  record = bench_augment.main(['--tiny'])
  assert set(record['ms']) == {'recipe', 'rand_conv', 'rand_conv grouped', 'step frozen 3'}
  assert record['max_difference'] < 1e-4 and record['image_size'] == 32
  assert '| rand_conv grouped |' in capsys.readouterr().out
