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

from typing import NamedTuple

from absl import logging
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

# The readers (fedblood.model.weights_formats) are part of this module's API.
from fedblood.model.weights_formats import input_norm_for, read_weights
from fedblood.model.weights_formats import keras_h5_to_flax  # pylint: disable=unused-import
from fedblood.model.weights_formats import torch_state_dict_to_flax  # pylint: disable=unused-import


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


def check_model(model, path) -> str:
  """Refuses a model the weights in ``path`` cannot start (reads no weight); their input_norm.

  Raises:
    ValueError: an unknown file type, ``model.width`` other than 1.0, or a ``model.input_norm``
      other than the one the weights were trained with.
  """
  if model.width != 1.0:
    raise ValueError(f'{path}: ImageNet weights need model.width=1.0, got {model.width}')
  norm = input_norm_for(path)
  if model.input_norm != norm:
    raise ValueError(f"{path}: these weights expect model.input_norm={norm!r}, the model has "
                     f"{model.input_norm!r}; set model.input_norm={norm!r}")
  return norm


def load_pretrained(params, path, *, model) -> tuple[dict, LoadReport]:
  """Overlays the ImageNet weights in ``path`` onto fresh ``params`` of ``model``.

  Args:
    params: ``model.init(...)['params']`` (float32), or their shapes if the file holds all.
    path: torchvision ``.pth`` / ``.pt`` / ``.npz`` or Keras ``.h5`` weights.
    model: the :class:`fedblood.model.models.VGG` the params belong to; its ``width`` must be
      1.0 and its ``input_norm`` must be what the weights were trained with (``input_norm_for(path)``).

  Returns:
    ``(params, report)``: the new params, and a :class:`LoadReport` listing which params came
    from the file and which kept their initialisation (also logged).
  """
  norm = check_model(model, path)
  params, report = overlay(params, read_weights(path), source=str(path))
  report = report._replace(input_norm=norm)
  logging.info('Loaded %d params from %s (input_norm=%s); kept initialised: %s',
               len(report.loaded), path, norm, list(report.initialised) or 'none')
  for line in report.skipped:
    logging.info('Kept initialised, not loaded from %s: %s', path, line)
  return params, report
