"""Reading VGG weight files into Flax param trees: torchvision state_dicts and Keras HDF5.

See :mod:`fedblood.model.weights` for the files and how they are overlaid onto a model.
"""

from pathlib import Path
import re
from typing import Any, Mapping

import numpy as np

TORCH_INSTALL = "pip install torch==2.13.0 (or pip install 'fedblood[torch]')"
H5PY_INSTALL = "pip install h5py (or pip install 'fedblood[keras-weights]')"

# torchvision's classifier Sequential: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
TORCH_CLASSIFIER = {'0': 'fc1', '3': 'fc2', '6': 'out'}
KERAS_HEAD = {'fc1': 'fc1', 'fc2': 'fc2', 'predictions': 'out'}
# The input normalisation each file type's weights were trained with.
INPUT_NORM = {'.pth': 'imagenet', '.pt': 'imagenet', '.npz': 'imagenet', '.h5': 'caffe',
              '.hdf5': 'caffe'}


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
                      f'.npz (see fedblood.model.weights)') from e
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f'{path}: holds a {type(state_dict).__name__}, expected a state_dict')
  return torch_state_dict_to_flax(state_dict, source=str(path))
