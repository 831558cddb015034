"""Tests for fedblood.model.weights: torchvision and Keras VGG16 files vs an independent torch VGG16."""

import sys

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedblood.model import models
from fedblood.model import weights

# torchvision's VGG16 'D' configuration; the torch reference below is built from it, not from us.
VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')
VGG11_CFG = (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M')
CONV_PATHS = {f'block{b}/conv{c}/{k}' for b, n in enumerate((2, 2, 3, 3, 3), 1)
              for c in range(1, n + 1) for k in ('kernel', 'bias')}
HEAD_PATHS = {f'head/{layer}/{k}' for layer in ('fc1', 'fc2', 'out') for k in ('kernel', 'bias')}


def torchvision_shapes(cfg=VGG16_CFG, classifier=True):
  """torchvision state_dict key -> shape for a plain VGG (features, then classifier)."""
  shapes, index, channels = {}, 0, 3
  for v in cfg:
    if v == 'M':
      index += 1
      continue
    shapes[f'features.{index}.weight'] = (v, channels, 3, 3)
    shapes[f'features.{index}.bias'] = (v,)
    index, channels = index + 2, v
  if classifier:
    for i, (n_in, n_out) in zip((0, 3, 6), ((channels * 49, 4096), (4096, 4096), (4096, 1000))):
      shapes[f'classifier.{i}.weight'] = (n_out, n_in)
      shapes[f'classifier.{i}.bias'] = (n_out,)
  return shapes


def random_state_dict(shapes, seed=0):
  """He-scaled weights so that activations (and logits) stay O(1) through 16 layers."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in shapes.items():
    if key.endswith('weight'):
      fan_in = int(np.prod(shape[1:]))
      gain = 1.0 if key == 'classifier.6.weight' else 2.0
      sd[key] = (rng.standard_normal(shape, np.float32) * np.sqrt(gain / fan_in)).astype(np.float32)
    else:
      sd[key] = (0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
  return sd


@pytest.fixture(scope='module')
def state_dict():
  return random_state_dict(torchvision_shapes())


def torch_vgg16(sd):
  """An independent torch.nn VGG16 with torchvision's module layout, loaded with ``sd``."""
  torch = pytest.importorskip('torch')
  nn = torch.nn
  layers, channels = [], 3
  for v in VGG16_CFG:
    if v == 'M':
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
      channels = v

  class VGG16(nn.Module):

    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(*layers)
      self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
      self.classifier = nn.Sequential(
          nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
          nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000))

    def forward(self, x):
      return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

  net = VGG16().eval()
  net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  return net


def torch_logits(net, images_nhwc):
  torch = pytest.importorskip('torch')
  with torch.no_grad():
    return net(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))).numpy()


def init_params(model, size):
  # jit drops the forward pass that init traces; rbg keys compile several times faster on CPU.
  key = jax.random.key(0, impl='rbg')
  return jax.jit(model.init)(key, jnp.zeros((1, size, size, 3)))['params']


@pytest.fixture(scope='module')
def fresh_gap():
  """Fresh params of a 5-class gap-head VGG16 (the same for any image size and input_norm)."""
  return init_params(models.VGG16(num_classes=5, head='gap'), 32)


def flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def images(batch=2, size=224, seed=1):
  return np.random.default_rng(seed).uniform(size=(batch, size, size, 3)).astype(np.float32)


def keras_layout(sd):
  """Keras VGG16 layer name -> [kernel, bias], transposed from a torchvision state_dict by hand."""
  conv_keys = sorted({int(k.split('.')[1]) for k in sd if k.startswith('features')})
  names = [f'block{b}_conv{c}' for b, n in enumerate((2, 2, 3, 3, 3), 1) for c in range(1, n + 1)]
  layers = {}
  for name, i in zip(names, conv_keys):
    layers[name] = [sd[f'features.{i}.weight'].transpose(2, 3, 1, 0), sd[f'features.{i}.bias']]
  if 'classifier.0.weight' in sd:
    # torch's fc1 reads (C, H, W)-flattened features, Keras' reads (H, W, C).
    fc1 = sd['classifier.0.weight'].reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0)
    layers['fc1'] = [fc1.reshape(-1, 4096), sd['classifier.0.bias']]
    layers['fc2'] = [sd['classifier.3.weight'].T, sd['classifier.3.bias']]
    layers['predictions'] = [sd['classifier.6.weight'].T, sd['classifier.6.bias']]
  return layers


def write_keras_h5(path, layers, style='keras2', wrap=False):
  """Writes Keras' legacy HDF5 weights layout.

  Root (or 'model_weights' of a whole-model save) has attrs layer_names, backend, keras_version;
  one group per layer (weightless layers too) with attr weight_names, whose entries are dataset
  paths inside the group: 'block1_conv1/kernel:0' in Keras 2, 'block1_conv1_W_1:0' in the
  Keras 1 files that keras.applications downloads.
  """
  order = ['input_1']
  for b, n in enumerate((2, 2, 3, 3, 3), 1):
    order += [f'block{b}_conv{c}' for c in range(1, n + 1)] + [f'block{b}_pool']
  if 'fc1' in layers:
    order += ['flatten', 'fc1', 'fc2', 'predictions']
  h5py = pytest.importorskip('h5py')  # the `keras-weights` extra: its tests skip without it
  with h5py.File(path, 'w') as f:
    root = f.create_group('model_weights') if wrap else f
    root.attrs['layer_names'] = np.array([n.encode() for n in order])
    root.attrs['backend'] = b'tensorflow'
    root.attrs['keras_version'] = b'2.2.4' if style == 'keras2' else b'1.2.2'
    for name in order:
      group = root.create_group(name)
      names = []
      for value, kind in zip(layers.get(name, []), ('kernel', 'bias')):
        keras1 = {'kernel': 'W', 'bias': 'b'}[kind]
        wname = f'{name}/{kind}:0' if style == 'keras2' else f'{name}_{keras1}_1:0'
        group.create_dataset(wname, data=value)
        names.append(wname.encode())
      group.attrs['weight_names'] = np.array(names, dtype='S')


def max_abs_error(ours, ref):
  err = float(np.max(np.abs(np.asarray(ours) - ref)))
  print(f'max |logit error| {err:.3g}, max |logit| {float(np.max(np.abs(ref))):.3g}')
  return err


def param_shapes(model, size):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']


@pytest.mark.slow
def test_torchvision_pth_matches_torch_vgg16(state_dict, tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'vgg16.pth'
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
  model = models.VGG16(num_classes=1000, head='fc', input_norm='imagenet')
  # The file holds every param, so shapes are enough (and skip initialising 138M params).
  params, report = weights.load_pretrained(param_shapes(model, 224), path, model=model)
  assert set(report.loaded) == CONV_PATHS | HEAD_PATHS
  assert report.initialised == () and report.skipped == ()
  assert report.input_norm == 'imagenet' and report.path == str(path)

  x = images()
  normed = (x - np.float32(models.IMAGENET_MEAN)) / np.float32(models.IMAGENET_STD)
  ref = torch_logits(torch_vgg16(state_dict), normed)
  ours = jax.jit(model.apply)({'params': params}, x)
  assert ours.shape == ref.shape == (2, 1000)
  assert max_abs_error(ours, ref) < 1e-4


@pytest.mark.slow
def test_keras_h5_matches_torch_vgg16_on_caffe_inputs(state_dict, tmp_path):
  path = tmp_path / 'vgg16_weights_tf_dim_ordering_tf_kernels.h5'
  write_keras_h5(path, keras_layout(state_dict))
  assert weights.input_norm_for(path) == 'caffe'
  model = models.VGG16(num_classes=1000, head='fc', input_norm='caffe')
  params, report = weights.load_pretrained(param_shapes(model, 224), path, model=model)
  assert set(report.loaded) == CONV_PATHS | HEAD_PATHS and report.initialised == ()
  assert report.input_norm == 'caffe'

  x = images()
  caffe = x[..., ::-1] * np.float32(255) - np.float32(models.CAFFE_MEAN_BGR)
  ref = torch_logits(torch_vgg16(state_dict), caffe.astype(np.float32))
  ours = jax.jit(model.apply)({'params': params}, x)
  assert max_abs_error(ours, ref) < 1e-4 * float(np.max(np.abs(ref)))


@pytest.mark.slow
def test_five_class_fc_head_at_64px_loads_conv_blocks_and_fc2_from_npz(state_dict, tmp_path):
  path = tmp_path / 'vgg16.npz'
  np.savez(path, **state_dict)
  model = models.VGG16(num_classes=5, head='fc')  # 64 px: fc1 sees 2x2x512, not 7x7x512
  fresh = init_params(model, 64)
  params, report = weights.load_pretrained(fresh, path, model=model)
  fc2 = {'head/fc2/kernel', 'head/fc2/bias'}
  assert set(report.loaded) == CONV_PATHS | fc2
  assert set(report.initialised) == HEAD_PATHS - fc2
  assert len(report.skipped) == 2
  assert report.skipped[0].startswith('head/fc1: kernel shape (25088, 4096) in the file, '
                                      '(2048, 4096) in the model') and '224 px' in report.skipped[0]
  assert report.skipped[1].startswith('head/out: ') and 'num_classes=5' in report.skipped[1]
  np.testing.assert_array_equal(params['head']['fc2']['kernel'],
                                state_dict['classifier.3.weight'].T)
  np.testing.assert_array_equal(params['block5']['conv3']['kernel'],
                                state_dict['features.28.weight'].transpose(2, 3, 1, 0))
  for key in HEAD_PATHS - fc2:
    np.testing.assert_array_equal(flat(params)[key], flat(fresh)[key])


def features_state_dict(cfg=VGG16_CFG):
  return random_state_dict(torchvision_shapes(cfg, classifier=False))


def test_five_class_gap_head_loads_only_the_conv_blocks(tmp_path, fresh_gap):
  sd = features_state_dict()  # a '_notop' file
  path = tmp_path / 'vgg16_notop.npz'
  np.savez(path, **sd)
  model, fresh = models.VGG16(num_classes=5, head='gap'), fresh_gap
  params, report = weights.load_pretrained(fresh, path, model=model)
  assert set(report.loaded) == CONV_PATHS and report.skipped == ()
  assert report.initialised == ('head/out/bias', 'head/out/kernel')
  np.testing.assert_array_equal(params['head']['out']['kernel'], fresh['head']['out']['kernel'])
  conv_indices = sorted(int(k.split('.')[1]) for k in sd if k.endswith('weight'))
  conv_names = [f'block{b}/conv{c}' for b, n in enumerate((2, 2, 3, 3, 3), 1)
                for c in range(1, n + 1)]
  for index, name in zip(conv_indices, conv_names):
    np.testing.assert_array_equal(flat(params)[f'{name}/kernel'],
                                  sd[f'features.{index}.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat(params)[f'{name}/bias'], sd[f'features.{index}.bias'])


def test_head_layers_load_whole_or_not_at_all(fresh_gap):
  """File head layers the model cannot take are skipped with a reason, never half-loaded."""
  model = models.VGG16(num_classes=5, head='gap')
  shapes = param_shapes(model, 32)
  tree = {k: {c: {'kernel': np.zeros(v['kernel'].shape, np.float32),
                  'bias': np.zeros(v['bias'].shape, np.float32)} for c, v in layer.items()}
          for k, layer in shapes.items() if k != 'head'}
  # np.zeros is not touched unless copied: these full-size head tensors cost nothing here.
  tree['head'] = {'fc1': {'kernel': np.zeros((25088, 4096), np.float32),
                          'bias': np.zeros(4096, np.float32)},
                  'fc2': {'kernel': np.zeros((4096, 4096), np.float32),
                          'bias': np.zeros(4096, np.float32)},
                  'out': {'kernel': np.zeros((4096, 5), np.float32),
                          'bias': np.zeros(5, np.float32)}}
  fresh = fresh_gap
  params, report = weights.overlay(fresh, tree, source='vgg16.npz')
  assert set(report.loaded) == CONV_PATHS
  assert report.skipped == (
      'head/fc1: the model (gap head) has no head/fc1/kernel',
      'head/fc2: the model (gap head) has no head/fc2/kernel',
      'head/out: kernel shape (4096, 5) in the file, (512, 5) in the model')
  # out's bias fits (5,) but its kernel does not: the bias stays initialised too.
  np.testing.assert_array_equal(params['head']['out']['bias'], fresh['head']['out']['bias'])
  with pytest.raises(ValueError, match=r"vgg16\.npz does not hold \['head/out/bias', "
                                       r"'head/out/kernel'\] and params has only their shapes"):
    weights.overlay(shapes, tree, source='vgg16.npz')


def test_fc1_rows_follow_nhwc_flatten_order():
  # One conv with 2 channels on a 2x2 grid: torch input index c*4 + h*2 + w, ours (h*2 + w)*2 + c.
  sd = {'features.0.weight': np.zeros((2, 3, 3, 3), np.float32),
        'features.0.bias': np.zeros(2, np.float32),
        'classifier.0.weight': np.arange(3 * 8, dtype=np.float32).reshape(3, 8),
        'classifier.0.bias': np.zeros(3, np.float32)}
  kernel = weights.torch_state_dict_to_flax(sd)['head']['fc1']['kernel']
  for h, w, c, o in np.ndindex(2, 2, 2, 3):
    assert kernel[(h * 2 + w) * 2 + c, o] == sd['classifier.0.weight'][o, c * 4 + h * 2 + w]


def test_vgg11_state_dict_loads_into_vgg11_and_not_vgg16():
  sd = {k: np.zeros(s, np.float32) for k, s in torchvision_shapes(VGG11_CFG, False).items()}
  tree = weights.torch_state_dict_to_flax(sd)
  assert sorted(tree) == [f'block{b}' for b in range(1, 6)]
  assert sorted(tree['block5']) == ['conv1', 'conv2']
  vgg11 = models.VGG11(num_classes=5, head='gap')
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(vgg11, 32))
  _, report = weights.overlay(zeros, tree, source='vgg11.npz')
  assert len(report.loaded) == 16 and report.initialised == ('head/out/bias', 'head/out/kernel')
  shapes = param_shapes(models.VGG16(num_classes=5, head='gap'), 32)
  with pytest.raises(ValueError, match=r'vgg11\.npz does not fit.*block1/conv2/bias'):
    weights.overlay(shapes, tree, source='vgg11.npz')


def test_keras_notop_keras1_names_and_whole_model_file(tmp_path, fresh_gap):
  features = features_state_dict()
  expected = weights.torch_state_dict_to_flax(features)
  for style, wrap in (('keras1', False), ('keras2', True)):
    path = tmp_path / f'{style}_{wrap}_notop.h5'
    write_keras_h5(path, keras_layout(features), style=style, wrap=wrap)
    tree = weights.keras_h5_to_flax(path)
    assert set(flat(tree)) == CONV_PATHS
    for key, value in flat(expected).items():
      np.testing.assert_array_equal(flat(tree)[key], value)
  model = models.VGG16(num_classes=5, head='gap', input_norm='caffe')
  _, report = weights.load_pretrained(fresh_gap, path, model=model)
  assert set(report.loaded) == CONV_PATHS
  assert report.initialised == ('head/out/bias', 'head/out/kernel')


def features_npz(tmp_path, name='features.npz', edit=None):
  sd = {k: np.zeros(s, np.float32) for k, s in torchvision_shapes(classifier=False).items()}
  if edit:
    edit(sd)
  path = tmp_path / name
  np.savez(path, **sd)
  return path


@pytest.fixture(scope='module')
def gap_params():
  model = models.VGG16(num_classes=5, head='gap')
  return model, param_shapes(model, 32)


@pytest.mark.parametrize('edit, match', [
    (lambda sd: sd.pop('features.28.weight'), r'features\.28 has \[.bias.\]'),
    (lambda sd: (sd.pop('features.28.weight'), sd.pop('features.28.bias')),
     r'params \[.block5/conv3/bias., .block5/conv3/kernel.\] are not in the file'),
    (lambda sd: sd.update({'features.30.weight': np.zeros((512, 512, 3, 3), np.float32),
                           'features.30.bias': np.zeros(512, np.float32)}),
     r'tensors \[.block5/conv4/bias., .block5/conv4/kernel.\] have no model param'),
    (lambda sd: sd.update({'features.0.weight': np.zeros((64, 1, 3, 3), np.float32)}),
     r'block1/conv1/kernel has shape \(3, 3, 1, 64\), the model needs \(3, 3, 3, 64\)'),
    (lambda sd: sd.update({'classifier.9.weight': np.zeros((1, 1), np.float32),
                           'classifier.9.bias': np.zeros(1, np.float32)}),
     r'unknown tensor classifier\.9'),
    (lambda sd: sd.update({'fc.weight': np.zeros(1, np.float32)}), r"unknown tensor 'fc\.weight'"),
    (lambda sd: sd.update({'features.1.running_mean': np.zeros(64, np.float32)}), 'batch-norm'),
])
def test_bad_tensors_are_errors_naming_the_file(tmp_path, gap_params, edit, match):
  model, params = gap_params
  path = features_npz(tmp_path, edit=edit)
  with pytest.raises(ValueError, match=match) as info:
    weights.load_pretrained(params, path, model=model)
  assert str(path) in str(info.value)


def test_model_config_errors(tmp_path, gap_params):
  model, params = gap_params
  npz = features_npz(tmp_path)
  with pytest.raises(ValueError, match=r'model\.width=1\.0, got 0\.5'):
    weights.load_pretrained(params, npz, model=models.VGG16(width=0.5))
  h5 = tmp_path / 'vgg16.h5'
  with pytest.raises(ValueError, match=r"expect model\.input_norm='caffe'.*has 'imagenet'"):
    weights.load_pretrained(params, h5, model=model)
  with pytest.raises(ValueError, match=r"model\.input_norm='imagenet'.*has 'caffe'"):
    weights.load_pretrained(params, npz, model=models.VGG16(input_norm='caffe'))
  with pytest.raises(ValueError, match=r"vgg16\.bin: unknown type '\.bin'"):
    weights.load_pretrained(params, tmp_path / 'vgg16.bin', model=model)
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    weights.load_pretrained(params, tmp_path / 'missing.npz', model=model)
  with pytest.raises(ValueError, match=r"\['params'\]"):
    weights.load_pretrained({'params': params}, npz, model=model)


def test_missing_torch_or_h5py_says_how_to_install(tmp_path, monkeypatch, gap_params):
  model, params = gap_params
  pth, h5 = tmp_path / 'vgg16.pth', tmp_path / 'vgg16.h5'
  pth.touch()
  h5.touch()
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` raise ImportError
  monkeypatch.setitem(sys.modules, 'h5py', None)
  with pytest.raises(ImportError, match=r'vgg16\.pth needs torch: pip install torch==2\.13\.0'):
    weights.load_pretrained(params, pth, model=model)
  with pytest.raises(ImportError, match=r'vgg16\.h5 needs h5py: pip install h5py'):
    weights.load_pretrained(params, h5, model=models.VGG16(num_classes=5, head='gap',
                                                           input_norm='caffe'))


def test_h5_that_is_not_keras_weights(tmp_path):
  path = tmp_path / 'other.h5'
  h5py = pytest.importorskip('h5py')
  with h5py.File(path, 'w') as f:
    f.create_dataset('x', data=np.zeros(3))
  with pytest.raises(ValueError, match=r'other\.h5: no layer_names'):
    weights.keras_h5_to_flax(path)
