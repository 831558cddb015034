"""Tests for fedblood.model.models: exact param counts, shapes, dtypes and input errors."""

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedblood.model import models
from fedblood.model import partition

VGG16_CONVS = (2, 2, 3, 3, 3)
# rbg: XLA:CPU compiles a VGG init with threefry keys several times slower.
KEY = jax.random.key(0, impl='rbg')


def shapes(model, size=224, batch=1):
  """Param shapes without computing anything (jax.eval_shape)."""
  return jax.eval_shape(model.init, KEY, jnp.zeros((batch, size, size, 3)))['params']


def out_shape(model, size, batch=2):
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda p, x: model.apply({'params': p}, x), shapes(model, size), x)


@pytest.mark.parametrize('num_classes, head, width, size, expected', [
    (1000, 'fc', 1.0, 224, 138_357_544),   # torchvision / Keras VGG16
    (5, 'fc', 1.0, 224, 134_281_029),
    (5, 'fc', 1.0, 64, 39_909_189),        # fc1 sees 2x2x512 instead of 7x7x512
    (5, 'gap', 1.0, 224, 14_717_253),
    (5, 'gap', 1.0, 64, 14_717_253),       # the gap head does not depend on the image size
    (5, 'gap', 0.25, 64, 921_429),
])
def test_exact_param_counts(num_classes, head, width, size, expected):
  model = models.VGG16(num_classes=num_classes, head=head, width=width)
  params = shapes(model, size)
  assert partition.count(params) == expected
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_param_paths_and_shapes_read_like_the_paper():
  flat = traverse_util.flatten_dict(shapes(models.VGG16(num_classes=5, head='fc')), sep='/')
  convs = {f'block{b}/conv{c}/{k}' for b, n in enumerate(VGG16_CONVS, 1) for c in range(1, n + 1)
           for k in ('kernel', 'bias')}
  head = {f'head/{layer}/{k}' for layer in ('fc1', 'fc2', 'out') for k in ('kernel', 'bias')}
  assert set(flat) == convs | head
  assert flat['block1/conv1/kernel'].shape == (3, 3, 3, 64)
  assert flat['block5/conv3/kernel'].shape == (3, 3, 512, 512)
  assert flat['head/fc1/kernel'].shape == (7 * 7 * 512, 4096)
  assert flat['head/out/kernel'].shape == (4096, 5)


def test_scaled_channels():
  assert [models.scaled(c, 0.25) for c in models.STAGE_CHANNELS] == [16, 32, 64, 128, 128]
  assert models.scaled(64, 0.001) == 1


@pytest.mark.parametrize('head', ['fc', 'gap'])
@pytest.mark.parametrize('size', [64, 96, 224])
def test_output_shapes(head, size):
  out = out_shape(models.VGG16(num_classes=5, head=head), size)
  assert out.shape == (2, 5) and out.dtype == jnp.float32


@pytest.mark.parametrize('head', ['fc', 'gap'])
def test_forward_of_a_narrow_net(head):
  model = models.VGG16(num_classes=5, head=head, width=1 / 16)
  x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  params = model.init(KEY, x)['params']
  logits = model.apply({'params': params}, x)
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
  np.testing.assert_array_equal(logits, model.apply({'params': params}, x))
  dropped = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.key(2)})
  # Dropout lives in the fc head only.
  assert np.array_equal(dropped, logits) == (head == 'gap')


@pytest.mark.parametrize('shape, match', [
    ((1, 100, 100, 3), r'image size \(100, 100\) must be a multiple of 32'),
    ((1, 64, 48, 3), r'image size \(64, 48\) must be a multiple of 32'),
    ((1, 64, 64, 1), r'NHWC RGB images, got shape \(1, 64, 64, 1\)'),
    ((64, 64, 3), r'NHWC RGB images, got shape \(64, 64, 3\)'),
])
def test_bad_input_shapes(shape, match):
  with pytest.raises(ValueError, match=match):
    models.VGG16(width=1 / 16).init(KEY, jnp.zeros(shape))


def test_bad_head_and_input_norm():
  with pytest.raises(ValueError, match=r"model\.head must be 'fc' or 'gap', got 'mlp'"):
    models.VGG16(head='mlp', width=1 / 16).init(KEY, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"model\.input_norm must be .*got 'bgr'"):
    models.VGG16(input_norm='bgr', width=1 / 16).init(KEY, jnp.zeros((1, 32, 32, 3)))


def test_normalize_conventions():
  pixel = jnp.array([[[[1.0, 0.5, 0.0]]]])
  np.testing.assert_allclose(models.normalize(pixel, 'imagenet')[0, 0, 0],
                             [(1 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0 - 0.406) / 0.225],
                             rtol=1e-6)
  # caffe: BGR order, 0-255, mean subtracted, no std.
  np.testing.assert_allclose(models.normalize(pixel, 'caffe')[0, 0, 0],
                             [0 - 103.939, 127.5 - 116.779, 255 - 123.68], rtol=1e-6)
  np.testing.assert_array_equal(models.normalize(pixel, 'none'), pixel)


def test_bfloat16_computes_in_bf16_with_float32_params():
  model = models.VGG16(num_classes=5, head='fc', width=1 / 16, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 32, 32, 3))
  params = model.init(KEY, x)['params']
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, x))(params)
  heavy = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ('conv_general_dilated', 'dot_general')]
  assert len(heavy) == 13 + 3
  assert all(v.aval.dtype == jnp.bfloat16 for e in heavy for v in e.invars)
  logits = model.apply({'params': params}, x)
  assert logits.dtype == jnp.float32


def test_build_from_config():
  cfg = ml_collections.ConfigDict(dict(name='VGG16', num_classes=5, head='gap', width=0.25))
  model = models.build(cfg)
  assert isinstance(model, models.VGG) and model.stages == VGG16_CONVS
  assert (model.num_classes, model.head, model.width) == (5, 'gap', 0.25)
  assert (model.dropout, model.input_norm, model.dtype) == (0.5, 'imagenet', jnp.float32)
  cfg.update(dict(name='VGG11', input_norm='caffe', dtype='bfloat16', dropout=0.3))
  model = models.build(cfg)
  assert model.stages == (1, 1, 2, 2, 2)
  assert (model.dropout, model.input_norm, model.dtype) == (0.3, 'caffe', jnp.bfloat16)
  with pytest.raises(ValueError, match=r"model\.name 'VGG17' is not a model"):
    models.build(ml_collections.ConfigDict(dict(name='VGG17', num_classes=5, head='gap',
                                                width=1.0)))


def test_test_time_averaging_is_invariant_to_the_8_symmetries_and_acts():
  plain = models.VGG11(num_classes=5, head='gap', width=0.125, input_norm='per_image')
  tta = models.VGG11(num_classes=5, head='gap', width=0.125, input_norm='per_image', tta=True)
  images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
  params = plain.init(jax.random.key(0), images)  # the same parameters serve both
  assert jax.tree.structure(params) == jax.tree.structure(tta.init(jax.random.key(0), images))
  out = tta.apply(params, images)
  for view in models.symmetries(images):  # each flip / quarter turn: the same prediction
    np.testing.assert_allclose(tta.apply(params, view), out, atol=1e-5)
  views = [plain.apply(params, v) for v in models.symmetries(images)]
  expected = jnp.log(jnp.mean(jnp.stack([jax.nn.softmax(v) for v in views]), axis=0))
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert float(jnp.max(jnp.abs(jax.nn.softmax(out) - jax.nn.softmax(views[0])))) > 1e-3
  # Training is unchanged: train=True is the plain network.
  np.testing.assert_array_equal(tta.apply(params, images, train=True),
                                plain.apply(params, images, train=True))
  with pytest.raises(ValueError, match='model.tta needs square images'):
    tta.apply(params, jnp.zeros((1, 32, 64, 3)))


@pytest.mark.parametrize('tta', [False, True])
def test_the_network_in_two_parts_is_the_network(tta):
  # apply(stop=k) gives block k's features, apply(start=k) runs the rest on them: FL's
  # evaluation computes the frozen blocks' features once (fedblood.study.experiment.prepare).
  model = models.VGG11(num_classes=5, head='fc', width=0.125, input_norm='per_image', tta=tta)
  images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
  params = model.init(jax.random.key(0), images)
  whole = model.apply(params, images)
  np.testing.assert_array_equal(model.apply(params, images, start=0), whole)
  for k in range(1, 6):
    features = model.apply(params, images, stop=k)
    views = 8 if tta else 1  # under tta the 8 views ride on the batch axis
    channels = models.scaled(models.STAGE_CHANNELS[k - 1], 0.125)
    assert features.shape == (3 * views, 32 // 2**k, 32 // 2**k, channels)
    np.testing.assert_allclose(model.apply(params, features, start=k), whole, atol=1e-5)
  for start, stop in [(-1, 5), (3, 2), (0, 6), (0, 0)]:
    with pytest.raises(ValueError, match=f'blocks {start}..{stop} are not within 0..5'):
      model.apply(params, images, start=start, stop=stop)
