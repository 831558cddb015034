"""Tiny fake image trees in the layouts of the real data sets (helpers of tests/test_data_*.py)."""

import os
import struct
import zlib

import numpy as np
from PIL import Image

# Expected 5-class counts of every fake named set below (basophil .. neutrophil).
NAMED_COUNTS = {
    'pbc': (3, 4, 3, 3, 5),      # neutrophil = 3 SNE + 2 BNE
    'raabin': (3, 3, 4, 3, 5),   # Train + TestA
    'lisc': (3, 3, 3, 4, 3),
    'jtsc': (1, 3, 4, 3, 6),
    'bccd': (2, 3, 3, 3, 4),
}


def write_image(path, seed=0, size=(14, 12), fmt=None, mode='RGB'):
  """A small random image; ``fmt`` from the extension unless given."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng([seed, len(path)])
  arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(arr).convert(mode).save(path, format=fmt)
  return arr


def write_png16_rgb(path, arr16):
  """A 48-bit (16 bits per channel) RGB PNG, which pillow can read but not write."""
  h, w, _ = arr16.shape
  raw = b''.join(b'\x00' + arr16[y].astype('>u2').tobytes() for y in range(h))

  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  png = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0))
         + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))
  with open(path, 'wb') as f:
    f.write(png)


def make_class_tree(root, folders, ext='.jpg', prefix=''):
  """``folders``: {folder name: count}; writes root/<folder>/<prefix><i><ext>."""
  for k, (folder, count) in enumerate(folders.items()):
    for i in range(count):
      write_image(os.path.join(root, folder, f'{prefix}{k}_{i:03d}{ext}'), seed=k * 100 + i)


def make_named(manual, name):
  """Writes a tiny tree with the layout of the named set ``name`` under ``manual``."""
  if name == 'pbc':
    root = os.path.join(manual, 'PBC_dataset_normal_DIB')
    make_class_tree(root, {'basophil': 3, 'eosinophil': 4, 'lymphocyte': 3, 'monocyte': 3,
                           'ig': 2, 'erythroblast': 2, 'platelet': 1})
    make_class_tree(root, {'neutrophil': 3}, prefix='SNE_')
    for i in range(2):
      write_image(os.path.join(root, 'neutrophil', f'BNE_{i}.jpg'), seed=900 + i)
  elif name == 'raabin':
    root = os.path.join(manual, 'Raabin-WBC')
    make_class_tree(os.path.join(root, 'Train'), {'Basophil': 2, 'Eosinophil': 2,
                                                  'Lymphocyte': 3, 'Monocyte': 2, 'Neutrophil': 3})
    make_class_tree(os.path.join(root, 'TestA'), {'Basophil': 1, 'Eosinophil': 1,
                                                  'Lymphocyte': 1, 'Monocyte': 1, 'Neutrophil': 2})
  elif name == 'lisc':
    root = os.path.join(manual, 'LISC Database', 'Main Dataset')
    make_class_tree(root, {'Baso': 3, 'eosi': 3, 'lymp': 3, 'mono': 4, 'neut': 3, 'mixt': 2},
                    ext='.bmp')
  elif name == 'jtsc':
    root = os.path.join(manual, 'segmentation_WBC')
    # csv class numbers: 1 neutrophil, 2 lymphocyte, 3 monocyte, 4 eosinophil, 5 basophil.
    numbers = [1] * 6 + [2] * 4 + [3] * 3 + [4] * 3 + [5]
    rows = ['image ID,class label']
    for i, number in enumerate(numbers, start=1):
      write_image(os.path.join(root, 'Dataset 1', f'{i:03d}.bmp'), seed=i)
      write_image(os.path.join(root, 'Dataset 1', f'{i:03d}.png'), seed=1000 + i)  # a "mask"
      rows.append(f'{i},{number}')
    with open(os.path.join(root, 'Class Labels of Dataset 1.csv'), 'w') as f:
      f.write('\n'.join(rows) + '\n')
  elif name == 'bccd':
    root = os.path.join(manual, 'BCCD', 'BCCD_cropped')
    make_class_tree(root, {'Basophil': 2, 'Eosinophil': 3, 'Lymphocyte': 3, 'Monocyte': 3,
                           'Neutrophil': 4})
  else:
    raise ValueError(name)
