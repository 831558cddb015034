"""Where the images of a center are and which class each one is.

A center is listed into ``(relative file, label)`` pairs by one of these layouts:

* ``folder``: ``<center>/<class>/<images>``, the layout of ../shared/data/wbc and of most
  hand-sorted lab exports. Class-folder names are matched to :data:`CLASSES` case-insensitively
  with the usual synonyms (``NEUTROPHIL``, ``neut``, ``SNE``, ``BNE`` -> neutrophil, ``Baso`` ->
  basophil, ...); folders of other cell types (``ig``, ``erythroblast``, ``platelet``, LISC's
  ``mixt``, ...) are skipped with one log line; any other folder name is an error (a misspelt
  class would otherwise silently vanish from training).
* the named public sets in :data:`NAMED_SETS` (``pbc``, ``raabin``, ``lisc``, ``jtsc``, ``bccd``),
  each downloaded by hand into a "manual" folder, with instructions that say exactly what to get
  and where to put it.

Files whose extension is not an image extension (README, Thumbs.db, hidden files, masks stored
as .txt/.mat ...) are skipped with one warning per folder naming them. Decoding problems are
found later, when the images are read (:mod:`fedblood.data.images`).
"""

import csv
import hashlib
import os
import re
from typing import NamedTuple

from absl import logging
import numpy as np

from fedblood.labels import CLASSES

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.tif', '.tiff', '.webp')

# Normalised folder name (lower case, letters only) -> class. Exact names first; then the prefixes
# below catch plurals and spellings such as 'Neutrophils', 'Lymphocytes', 'Baso', 'eosi'.
_EXACT = {
    'ba': 'basophil', 'bas': 'basophil', 'baso': 'basophil', 'baoso': 'basophil',
    'eo': 'eosinophil', 'eos': 'eosinophil', 'eosi': 'eosinophil',
    'ly': 'lymphocyte', 'lym': 'lymphocyte', 'lymp': 'lymphocyte', 'lympho': 'lymphocyte',
    'mo': 'monocyte', 'mon': 'monocyte', 'mono': 'monocyte',
    'ne': 'neutrophil', 'neu': 'neutrophil', 'neut': 'neutrophil', 'sne': 'neutrophil',
    'bne': 'neutrophil', 'seg': 'neutrophil', 'band': 'neutrophil', 'ngs': 'neutrophil',
    'ngb': 'neutrophil',
}
_PREFIXES = (('baso', 'basophil'), ('eosi', 'eosinophil'), ('lymph', 'lymphocyte'),
             ('mono', 'monocyte'), ('neut', 'neutrophil'), ('segmented', 'neutrophil'))
# Other cells found in blood-smear sets: skipped, never mapped onto a leukocyte class. Checked
# before the prefixes, so that 'lymphoblast' or 'monoblast' do not become lymphocyte / monocyte.
_OTHER_EXACT = ('ig', 'erb', 'plt', 'mmy', 'my', 'pmy', 'rbc', 'ery', 'mixt', 'mix', 'vly', 'sm')
_OTHER_PREFIXES = ('immature', 'erythro', 'platelet', 'thrombo', 'metamyel', 'myelo', 'promyel',
                   'blast', 'lymphoblast', 'monoblast', 'mixed', 'smudge', 'artifact', 'artefact',
                   'reactive', 'atypical', 'variant', 'giant', 'unknown', 'other')

OTHER_CELL_TYPES = object()  # sentinel returned by class_of() for folders to skip


def _normalise(name: str) -> str:
  return re.sub('[^a-z]', '', name.lower())


def class_of(folder_name: str):
  """Maps a class-folder name to a class index, :data:`OTHER_CELL_TYPES`, or None if unknown."""
  name = _normalise(folder_name)
  if name in _EXACT:
    return CLASSES.index(_EXACT[name])
  if name in _OTHER_EXACT or name.startswith(_OTHER_PREFIXES):
    return OTHER_CELL_TYPES
  for prefix, cls in _PREFIXES:
    if name.startswith(prefix):
      return CLASSES.index(cls)
  return None


def is_image_file(name: str) -> bool:
  return not name.startswith('.') and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def image_files(folder: str) -> list[str]:
  """Sorted image file names directly in ``folder``; other files skipped with one warning."""
  names = sorted(e.name for e in os.scandir(folder) if e.is_file())
  images = [n for n in names if is_image_file(n)]
  skipped = [n for n in names if not is_image_file(n)]
  if skipped:
    logging.warning('Skipping %d non-image file(s) in %s: %s', len(skipped), folder,
                    ', '.join(skipped[:5]) + (' ...' if len(skipped) > 5 else ''))
  return images


def walk_images(path: str) -> list[str]:
  """Every image file under ``path``, recursively, as sorted relative paths (see image_files)."""
  found = []
  for dirpath, dirnames, _ in os.walk(path):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    rel = os.path.relpath(dirpath, path)
    found += [os.path.normpath(os.path.join(rel, f)) for f in image_files(dirpath)]
  return sorted(found)


class Listing(NamedTuple):
  """The images of one center: paths relative to ``root``, and labels (int32)."""
  root: str
  files: tuple
  labels: np.ndarray


def scan_class_folders(root: str, prefix: str = '') -> tuple[list[str], list[int]]:
  """Lists ``root/<class>/<images>`` into relative paths (under ``prefix``) and labels."""
  files, labels, others = [], [], []
  entries = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
  loose = [n for n in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, n))]
  if loose:
    logging.warning('Ignoring %d file(s) outside class folders in %s: %s', len(loose), root,
                    ', '.join(loose[:5]) + (' ...' if len(loose) > 5 else ''))
  for name in entries:
    label = class_of(name)
    if label is OTHER_CELL_TYPES:
      others.append(name)
      continue
    if label is None:
      raise ValueError(
          f'Unknown class folder {os.path.join(root, name)!r}: expected one of {CLASSES} (or a '
          "synonym such as 'neut', 'SNE', 'Baso', 'eosi', 'lymp', 'mono'), or another cell type "
          "to skip ('ig', 'erythroblast', 'platelet', ...). Rename or remove the folder.")
    for f in image_files(os.path.join(root, name)):
      files.append(os.path.join(prefix, name, f))
      labels.append(label)
  if others:
    logging.info('Skipping folders of other cell types in %s: %s', root, ', '.join(others))
  return files, labels


def _list_csv_labelled(root: str, images: str, labels_csv: str, names: tuple) -> tuple:
  """Lists a flat folder of images whose labels are in a csv of (image id, class number)."""
  path = os.path.join(root, labels_csv)
  by_id = {}
  with open(path, newline='') as f:
    for row in csv.reader(f):
      if row and row[0].strip().isdigit():
        by_id[int(row[0])] = int(row[1])
  files, labels = [], []
  for name in image_files(os.path.join(root, images)):
    stem, ext = os.path.splitext(name)
    if ext.lower() != '.bmp' or not stem.isdigit():
      continue  # the segmentation masks (.png) sit next to the images
    if int(stem) not in by_id:
      raise ValueError(f'{os.path.join(root, images, name)!r} has no label in {path!r}')
    number = by_id[int(stem)]
    if not 1 <= number <= len(names):
      raise ValueError(f'Label {number} of image {stem} in {path!r} is not in 1..{len(names)}')
    files.append(os.path.join(images, name))
    labels.append(CLASSES.index(names[number - 1]))
  return files, labels


class NamedSet(NamedTuple):
  """A public data set downloaded by hand. ``folder`` is relative to the manual folder."""
  folder: str
  parts: tuple        # sub-folders of ``folder`` that each hold <class>/<images>
  instructions: str
  citation: str
  labels_csv: str = ''  # for sets labelled by a csv instead of class folders


NAMED_SETS = {
    'pbc': NamedSet(
        folder='PBC_dataset_normal_DIB', parts=('',),
        instructions=(
            'Download "PBC_dataset_normal_DIB.zip" from Mendeley Data, '
            'https://data.mendeley.com/datasets/snkd93bnjr/1 , and unzip it into {manual_dir} so '
            'that {manual_dir}/PBC_dataset_normal_DIB/basophil/BA_*.jpg exists. Of its 8 class '
            'folders the 5 leukocyte ones are used (ig, erythroblast and platelet are skipped).'),
        citation='Acevedo et al., Data in Brief 30:105474 (2020), CC BY 4.0.'),
    'raabin': NamedSet(
        folder='Raabin-WBC', parts=('Train', 'TestA'),
        instructions=(
            'From https://raabindata.com/free-data/ download the "Double-labeled Cropped Cells" '
            'archives Train and TestA, and extract both into {manual_dir}/Raabin-WBC so that '
            '{manual_dir}/Raabin-WBC/Train/Basophil/ and {manual_dir}/Raabin-WBC/TestA/Basophil/ '
            'exist (both parts form one center; TestB is not used).'),
        citation='Kouzehkanan et al., Sci Rep 12:1123 (2022).'),
    'lisc': NamedSet(
        folder=os.path.join('LISC Database', 'Main Dataset'), parts=('',),
        instructions=(
            'Download the LISC database from '
            'http://users.cecs.anu.edu.au/~hrezatofighi/Data/Leukocyte%20Data.htm and extract '
            'it into {manual_dir} so that "{manual_dir}/LISC Database/Main Dataset/Baso/1.bmp" '
            'exists (class folders Baso, eosi, lymp, mono, neut; "mixt" is skipped). These are '
            'the full 720x576 fields: use data.resize="center_crop" or crop the cells yourself.'),
        citation='Rezatofighi & Soltanian-Zadeh, Comput Med Imaging Graph 35:333 (2011).'),
    'jtsc': NamedSet(
        folder='segmentation_WBC', parts=('Dataset 1',),
        labels_csv='Class Labels of Dataset 1.csv',
        instructions=(
            'Clone or download https://github.com/zxaoyou/segmentation_WBC into '
            '{manual_dir}/segmentation_WBC so that '
            '"{manual_dir}/segmentation_WBC/Dataset 1/001.bmp" and '
            '"{manual_dir}/segmentation_WBC/Class Labels of Dataset 1.csv" exist (Jiangxi Tecom '
            '"Dataset 1": 300 BMP images 120x120; labels 1-5 = neutrophil, lymphocyte, monocyte, '
            'eosinophil, basophil; the .png masks are ignored).'),
        citation='Zheng et al., Micron 107:55-71 (2018), GPL-3.0.'),
    'bccd': NamedSet(
        folder=os.path.join('BCCD', 'BCCD_cropped'), parts=('',),
        instructions=(
            'Clone or download https://github.com/apple2373/BCCD into {manual_dir}/BCCD so that '
            '{manual_dir}/BCCD/BCCD_cropped/Neutrophil/ exists (white-cell crops of the BCCD '
            'smear images, labels from the Kaggle "Blood Cell Images" set).'),
        citation='BCCD (Shenggan/BCCD_Dataset, MIT); crops by apple2373/BCCD.'),
}
# JTSC's csv numbers the classes in this order (Zheng et al. 2018).
_JTSC_CLASS_ORDER = ('neutrophil', 'lymphocyte', 'monocyte', 'eosinophil', 'basophil')


def instructions(name: str, manual_dir: str) -> str:
  return NAMED_SETS[name].instructions.format(manual_dir=manual_dir)


def locate(layout: str, path: str) -> str:
  """The folder holding a center's data; a clear error if a manual download is missing.

  Args:
    layout: 'folder' (``path`` is the center folder) or a key of :data:`NAMED_SETS` (``path`` is
      the manual-download folder).
    path: see ``layout``.
  """
  if layout == 'folder':
    if not os.path.isdir(path):
      raise FileNotFoundError(f'Center folder {path!r} does not exist')
    return path
  if layout not in NAMED_SETS:
    raise ValueError(f'Unknown layout {layout!r}: expected "folder" or one of {tuple(NAMED_SETS)}')
  spec = NAMED_SETS[layout]
  root = os.path.join(path, spec.folder)
  needed = [os.path.join(root, p) for p in spec.parts]
  if spec.labels_csv:
    needed.append(os.path.join(root, spec.labels_csv))
  missing = [p for p in needed if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f'The {layout!r} data set was not found: {missing[0]!r} is missing. '
        + instructions(layout, path))
  return root


def list_center(layout: str, path: str) -> Listing:
  """Lists a center's images and labels, sorted by relative path.

  Raises:
    FileNotFoundError: the folder (or a named set's manual download) is missing.
    ValueError: an unknown class folder, or no image at all (an empty center).
  """
  root = locate(layout, path)
  if layout in NAMED_SETS and NAMED_SETS[layout].labels_csv:
    files, labels = _list_csv_labelled(root, NAMED_SETS[layout].parts[0],
                                       NAMED_SETS[layout].labels_csv, _JTSC_CLASS_ORDER)
  else:
    files, labels = [], []
    for part in (NAMED_SETS[layout].parts if layout in NAMED_SETS else ('',)):
      f, l = scan_class_folders(os.path.join(root, part), prefix=part)
      files += f
      labels += l
  if not files:
    raise ValueError(f'Center {root!r} holds no images of the classes {CLASSES} '
                     '(expected <class>/<images> inside it)')
  order = np.argsort(files, kind='stable')
  labels = np.asarray(labels, np.int32)[order]
  counts = np.bincount(labels, minlength=len(CLASSES))
  if not counts.all():
    logging.warning('Center %s has no images of class(es) %s', root,
                    ', '.join(c for c, n in zip(CLASSES, counts) if not n))
  return Listing(root, tuple(files[i] for i in order), labels)


def fingerprint(path: str) -> str:
  """A digest of every file under ``path`` (relative name, size, mtime): changes on any edit."""
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames.sort()
    for name in sorted(filenames):
      st = os.stat(os.path.join(dirpath, name))
      rel = os.path.relpath(os.path.join(dirpath, name), path)
      h.update(f'{rel}\t{st.st_size}\t{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()
