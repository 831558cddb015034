"""ImageNet VGG weights from a local file, overlaid onto freshly initialised Flax params.

Nothing is downloaded: point ``load_pretrained`` at a file you already have.

* torchvision ``state_dict`` (``.pth`` / ``.pt``), e.g. ``vgg16(weights='IMAGENET1K_V1')``:
  keys ``features.{i}.weight|bias`` and ``classifier.{0,3,6}.weight|bias``. Reading it needs
  torch (``pip install torch==2.13.0``, or the ``torch`` extra). Without torch, convert it
  once, on any machine that has torch, to a ``.npz`` of the same keys::

    sd = torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict()
    numpy.savez('vgg16.npz', **{k: v.numpy() for k, v in sd.items()})

  These weights expect ``model.input_norm='imagenet'``.
* Keras' HDF5 weights (``.h5``), e.g. ``vgg16_weights_tf_dim_ordering_tf_kernels.h5`` and its
  ``_notop`` variant: layers ``block1_conv1`` .. ``block5_conv3``, ``fc1``, ``fc2``,
  ``predictions``. Reading needs h5py (the ``keras-weights`` extra). These weights were trained
  on 'caffe' inputs (BGR, 0-255, mean subtracted): they need ``model.input_norm='caffe'``.

Usage::

  model = VGG16(num_classes=5, head='gap', input_norm='imagenet')
  params = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  params, report = load_pretrained(params, 'vgg16.pth', model=model)
  report.loaded, report.initialised   # which param paths came from the file

The convolution blocks must all be in the file (a missing, unknown or mis-shaped tensor is an
error naming the file). Head layers load only when their shapes match: ``head/fc1`` needs the fc
head on 224 px images (torchvision pools to 7x7x512 before fc1), ``head/out`` needs 1000
classes; other head layers keep their fresh initialisation, and the report says why.
"""

from pathlib import Path
import re
from typing import Any, Mapping, NamedTuple

from absl import logging
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

TORCH_INSTALL = "pip install torch==2.13.0 (or pip install 'fedblood[torch]')"
H5PY_INSTALL = "pip install h5py (or pip install 'fedblood[keras-weights]')"

# torchvision's classifier Sequential: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
TORCH_CLASSIFIER = {'0': 'fc1', '3': 'fc2', '6': 'out'}
KERAS_HEAD = {'fc1': 'fc1', 'fc2': 'fc2', 'predictions': 'out'}
INPUT_NORM = {'.pth': 'imagenet', '.pt': 'imagenet', '.npz': 'imagenet', '.h5': 'caffe',
              '.hdf5': 'caffe'}


class LoadReport(NamedTuple):
  """What :func:`load_pretrained` did.

  Attributes:
    path: the weights file.
    input_norm: the input normalisation the weights were trained with.
    loaded: param paths overwritten from the file.
    initialised: param paths that kept their fresh initialisation.
    skipped: file layers not used, each ``'layer: reason'`` (e.g. ``'head/fc1: ...'``).
  """
  path: str
  input_norm: str
  loaded: tuple[str, ...]
  initialised: tuple[str, ...]
  skipped: tuple[str, ...]


def input_norm_for(path) -> str:
  """The ``model.input_norm`` that the weights in ``path`` need (by file type)."""
  suffix = Path(path).suffix.lower()
  if suffix not in INPUT_NORM:
    raise ValueError(f'weights file {path}: unknown type {suffix!r}; expected a torchvision '
                     f'state_dict (.pth, .pt, .npz) or Keras HDF5 weights (.h5, .hdf5)')
  return INPUT_NORM[suffix]


def _numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; .numpy() needs it on the CPU, outside autograd
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _stage_names(conv_indices: list[int], source: str) -> dict[int, tuple[str, str]]:
  """Maps torchvision ``features`` indices of convolutions to ``(blockN, convM)``.

  In torchvision's VGG a conv is followed by a ReLU (next conv 2 indices on) and, at the end of a
  stage, by a max-pool too (3 indices on); this recovers the stages of VGG11/13/16/19.
  """
  names, block, conv = {}, 1, 1
  for prev, index in zip([None] + conv_indices[:-1], conv_indices):
    if prev is None:
      if index != 0:
        raise ValueError(f'{source}: features.0 is not a convolution; is this a torchvision VGG?')
    elif index - prev == 2:
      conv += 1
    elif index - prev == 3:
      block, conv = block + 1, 1
    else:
      raise ValueError(f'{source}: convolutions features.{prev} and features.{index} are neither '
                       f'in one stage nor in consecutive stages of a torchvision VGG')
    names[index] = (f'block{block}', f'conv{conv}')
  return names


def torch_state_dict_to_flax(state_dict: Mapping[str, Any], source: str = 'state_dict') -> dict:
  """Converts a torchvision VGG ``state_dict`` to a Flax param tree of numpy arrays.

  Conv kernels go from OIHW to HWIO; dense kernels are transposed to (in, out). torchvision
  flattens the last feature map in (C, H, W) order and our NHWC model in (H, W, C), so the rows of
  fc1 are permuted accordingly.

  Args:
    state_dict: name -> tensor (torch tensors or numpy arrays), torchvision keys.
    source: what to name in error messages (the file).

  Returns:
    ``{'block1': {'conv1': {'kernel', 'bias'}, ...}, ..., 'head': {'fc1', 'fc2', 'out'}}`` with
    whichever head layers the state_dict has.
  """
  layers = _torch_layers(state_dict, source)
  conv_indices = sorted(int(i) for part, i in layers if part == 'features')
  if not conv_indices:
    raise ValueError(f'{source}: no features.<i>.weight convolutions; is this a torchvision VGG?')
  tree: dict[str, dict] = {}
  for index, (block, conv) in _stage_names(conv_indices, source).items():
    layer = layers[('features', str(index))]
    if layer['weight'].ndim != 4:
      raise ValueError(f'{source}: features.{index}.weight has shape {layer["weight"].shape}, '
                       f'expected a 4-d conv kernel (out, in, h, w)')
    tree.setdefault(block, {})[conv] = {'kernel': layer['weight'].transpose(2, 3, 1, 0),
                                        'bias': layer['bias']}
  channels = layers[('features', str(conv_indices[-1]))]['weight'].shape[0]

  for (part, index), layer in layers.items():
    if part != 'classifier':
      continue
    if index not in TORCH_CLASSIFIER:
      raise ValueError(f'{source}: unknown tensor classifier.{index}; torchvision VGG has '
                       f'linear layers classifier.{{0,3,6}}')
    name = TORCH_CLASSIFIER[index]
    kernel = (_fc1_kernel(layer['weight'], channels, source) if name == 'fc1'
              else layer['weight'].T)
    tree.setdefault('head', {})[name] = {'kernel': kernel, 'bias': layer['bias']}
  return tree


def _torch_layers(state_dict, source: str) -> dict[tuple[str, str], dict[str, np.ndarray]]:
  """Groups ``features.3.weight``-style keys as ``{('features', '3'): {'weight', 'bias'}}``."""
  if any(key.endswith('running_mean') for key in state_dict):
    raise ValueError(f'{source}: batch-norm VGGs (vgg16_bn) are not supported; use plain vgg16')
  pattern = re.compile(r'(features|classifier)\.(\d+)\.(weight|bias)')
  layers: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    match = pattern.fullmatch(key)
    if not match:
      raise ValueError(f'{source}: unknown tensor {key!r}; expected torchvision VGG keys '
                       f'features.<i>.weight|bias and classifier.<i>.weight|bias')
    part, index, kind = match.groups()
    layers.setdefault((part, index), {})[kind] = _numpy(value)
  for (part, index), layer in layers.items():
    if set(layer) != {'weight', 'bias'}:
      raise ValueError(f'{source}: {part}.{index} has {sorted(layer)}, needs weight and bias')
  return layers


def _fc1_kernel(weight: np.ndarray, channels: int, source: str) -> np.ndarray:
  """torchvision's fc1 weight (out, C*H*W) as our (H*W*C, out) kernel."""
  out_units, in_units = weight.shape
  grid = int(round((in_units / channels) ** 0.5))
  if grid * grid * channels != in_units:
    raise ValueError(f'{source}: classifier.0.weight has {in_units} inputs, not a square grid '
                     f'of {channels} channels')
  kernel = weight.reshape(out_units, channels, grid, grid).transpose(2, 3, 1, 0)
  return kernel.reshape(grid * grid * channels, out_units)


def _h5_names(group, name: str) -> list[str]:
  # Keras splits attributes over 64 kB into name0, name1, ... (HDF5's object header limit).
  if name in group.attrs:
    values = list(group.attrs[name])
  else:
    values, chunk = [], 0
    while f'{name}{chunk}' in group.attrs:
      values.extend(group.attrs[f'{name}{chunk}'])
      chunk += 1
  return [v.decode('utf8') if isinstance(v, bytes) else str(v) for v in values]


def keras_h5_to_flax(path) -> dict:
  """Reads Keras VGG HDF5 weights (``model.save_weights`` / keras.applications files).

  Keras kernels are already HWIO, and Keras' Flatten on channels-last maps flattens (H, W, C) as
  ours does, so no permutation is needed. Weights are read in the order of each layer's
  ``weight_names`` attribute (kernel then bias), as Keras itself does.

  Args:
    path: the ``.h5`` file.

  Returns:
    A Flax param tree of numpy arrays as in :func:`torch_state_dict_to_flax`.
  """
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'reading Keras weights {path} needs h5py: {H5PY_INSTALL}') from e
  tree: dict[str, dict] = {}
  with h5py.File(path, 'r') as f:
    root = f['model_weights'] if 'model_weights' in f else f  # a whole saved model
    layer_names = _h5_names(root, 'layer_names')
    if not layer_names:
      raise ValueError(f'{path}: no layer_names attribute; not Keras 2 HDF5 weights '
                       f'(Keras 3 .weights.h5 files are not supported)')
    for layer_name in layer_names:
      group = root[layer_name]
      weights = [np.asarray(group[name]) for name in _h5_names(group, 'weight_names')]
      if not weights:
        continue  # input, pooling, flatten
      conv = re.fullmatch(r'block(\d+)_conv(\d+)', layer_name)
      if conv:
        block, name = f'block{conv.group(1)}', f'conv{conv.group(2)}'
      elif layer_name in KERAS_HEAD:
        block, name = 'head', KERAS_HEAD[layer_name]
      else:
        raise ValueError(f'{path}: unknown layer {layer_name!r} with weights; expected '
                         f'blockN_convM, fc1, fc2, predictions')
      if len(weights) != 2:
        raise ValueError(f'{path}: layer {layer_name!r} has {len(weights)} weights, expected '
                         f'kernel and bias')
      kernel, bias = weights
      if conv and kernel.shape[:2] != (3, 3):
        raise ValueError(f'{path}: {layer_name} kernel has shape {kernel.shape}, expected '
                         f'(3, 3, in, out); channels-first (theano) kernels are not supported')
      tree.setdefault(block, {})[name] = {'kernel': kernel, 'bias': bias}
  return tree


def read_weights(path) -> dict:
  """Reads a weights file (see the module docstring) into a Flax param tree of numpy arrays."""
  path = Path(path)
  norm = input_norm_for(path)
  if not path.is_file():
    raise FileNotFoundError(f'weights file {path} does not exist')
  if norm == 'caffe':
    return keras_h5_to_flax(path)
  if path.suffix.lower() == '.npz':
    with np.load(path) as data:
      return torch_state_dict_to_flax({k: data[k] for k in data.files}, source=str(path))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'reading {path} needs torch: {TORCH_INSTALL}; or convert it once to '
                      f'.npz (see fedblood.weights)') from e
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f'{path}: holds a {type(state_dict).__name__}, expected a state_dict')
  return torch_state_dict_to_flax(state_dict, source=str(path))


def overlay(params, weights, *, source: str) -> tuple[dict, LoadReport]:
  """Copies ``weights`` (a converted tree) onto ``params`` with shape checks.

  Every convolution of ``params`` must be in ``weights`` with the same shape, and every
  convolution of ``weights`` must be in ``params``. Head layers are copied when the shapes
  match and otherwise keep their initialisation.

  Args:
    params: the fresh Flax params (``model.init(...)['params']``); ``jax.eval_shape`` shapes
      will do when the file holds every param (e.g. 1000 classes, fc head, 224 px).
    weights: from :func:`torch_state_dict_to_flax` / :func:`keras_h5_to_flax`.
    source: the file, for messages and the report.

  Returns:
    ``(params, report)``; the new params have the dtypes of the old ones.
  """
  if 'params' in params:
    raise ValueError("pass model.init(...)['params'], not the whole variables dict")
  flat_params = traverse_util.flatten_dict(params, sep='/')
  flat_weights = traverse_util.flatten_dict(weights, sep='/')
  unknown = sorted(p for p in flat_weights if not p.startswith('head/') and p not in flat_params)
  missing = sorted(p for p in flat_params if not p.startswith('head/') and p not in flat_weights)
  if unknown or missing:
    raise ValueError(f'{source} does not fit the model: tensors {unknown} have no model param, '
                     f'params {missing} are not in the file (another VGG depth?)')
  by_layer: dict[str, dict[str, np.ndarray]] = {}
  for path, value in flat_weights.items():
    layer, name = path.rsplit('/', 1)
    by_layer.setdefault(layer, {})[name] = value
  out, loaded, skipped = dict(flat_params), [], []
  for layer, tensors in by_layer.items():
    reason = _unloadable(layer, tensors, flat_params, source)
    if reason:
      skipped.append(f'{layer}: {reason}')
      continue
    for name, value in tensors.items():
      path = f'{layer}/{name}'
      out[path] = jnp.asarray(value, dtype=flat_params[path].dtype)
      loaded.append(path)
  initialised = sorted(set(flat_params) - set(loaded))
  shapes_only = [p for p in initialised if isinstance(flat_params[p], jax.ShapeDtypeStruct)]
  if shapes_only:
    raise ValueError(f'{source} does not hold {shapes_only} and params has only their shapes '
                     f'(jax.eval_shape); pass initialised params')
  report = LoadReport(str(source), '', tuple(sorted(loaded)), tuple(initialised), tuple(skipped))
  return traverse_util.unflatten_dict(out, sep='/'), report


def _unloadable(layer: str, tensors: dict, flat_params: dict, source: str) -> str | None:
  """Why a head layer of the file cannot load (None if it can); a conv that cannot is an error.

  A layer loads whole or not at all: fc1's bias fits any image size, its kernel does not.
  """
  for name, value in tensors.items():
    path = f'{layer}/{name}'
    target = flat_params.get(path)
    if target is None:
      kind = 'fc head' if 'head/fc1/kernel' in flat_params else 'gap head'
      return f'the model ({kind}) has no {path}'
    if tuple(value.shape) == tuple(target.shape):
      continue
    if not layer.startswith('head/'):
      raise ValueError(f'{source}: {path} has shape {tuple(value.shape)}, the model needs '
                       f'{tuple(target.shape)}')
    reason = f'{name} shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the model'
    if layer == 'head/fc1':
      return reason + ' (fc1 needs the fc head on 224 px images: 7x7x512 features)'
    if layer == 'head/out' and value.shape[-1] != target.shape[-1]:
      return reason + (f" ({value.shape[-1]} classes in the file, "
                       f"model.num_classes={target.shape[-1]})")
    return reason
  return None


def load_pretrained(params, path, *, model) -> tuple[dict, LoadReport]:
  """Overlays the ImageNet weights in ``path`` onto fresh ``params`` of ``model``.

  Args:
    params: ``model.init(...)['params']`` (float32), or their shapes if the file holds all.
    path: torchvision ``.pth`` / ``.pt`` / ``.npz`` or Keras ``.h5`` weights.
    model: the :class:`fedblood.models.VGG` the params belong to; its ``width`` must be 1.0 and
      its ``input_norm`` must be what the weights were trained with (``input_norm_for(path)``).

  Returns:
    ``(params, report)``: the new params, and a :class:`LoadReport` listing which params came
    from the file and which kept their initialisation (also logged).
  """
  if model.width != 1.0:
    raise ValueError(f'{path}: ImageNet weights need model.width=1.0, got {model.width}')
  norm = input_norm_for(path)
  if model.input_norm != norm:
    raise ValueError(f"{path}: these weights expect model.input_norm={norm!r}, the model has "
                     f"{model.input_norm!r}; set model.input_norm={norm!r}")
  params, report = overlay(params, read_weights(path), source=str(path))
  report = report._replace(input_norm=norm)
  logging.info('Loaded %d params from %s (input_norm=%s); kept initialised: %s',
               len(report.loaded), path, norm, list(report.initialised) or 'none')
  for line in report.skipped:
    logging.info('Kept initialised, not loaded from %s: %s', path, line)
  return params, report
