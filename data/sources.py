"""Random-access data sources (digits, npz, image folder, TFDS ArrayRecord), one record format.

Every source yields {'image': uint8 (H, W, 3), 'label': int32, 'skipped': int32}. A record that
cannot be read is replaced by the next readable one and 'skipped' is 1 for such a stand-in (once
per replaced example, however many bad records the search passed), so one bad file in a million
never stops a run; the trainer decides how many replaced examples are too many.
"""
import glob
import importlib.util
import os
import threading

from absl import logging
import numpy as np

from data import images
from data import npz

MAX_CONSECUTIVE_FAILURES = 100
IMAGE_EXTENSIONS = frozenset(
    {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.pbm'})
DIGITS_TRAIN_SIZE = 1437  # Of load_digits()'s 1797 examples, the first 1437 train, the rest test.


class DataError(ValueError):
  """The data config or the data on disk is unusable; the message says what to fix."""


def check_source(cfg, split: str) -> int:
  """Validates the source of `split` cheaply (no image decoding); returns its number of examples."""
  return len(make_source(cfg, split))


def make_source(cfg, split: str) -> 'Source':
  """The source named by `cfg.name` ('digits', 'npz', 'folder' or a TFDS name) for `split`."""
  if '://' in (cfg.get('data_dir') or ''):
    # ArrayRecord (riegeli), PIL and np.load read local files; a bucket is read through a mount.
    raise DataError(f'config.data.data_dir={cfg.data_dir!r} is a URI: training data is read from '
                    'local paths. Mount the bucket with gcsfuse (read-only, with a file cache) and '
                    'pass the mount, e.g. --config.data.data_dir=/mnt/gcs/tfds '
                    '(docs/tpu-pod.md#data)')
  if cfg.name == 'digits':
    return _digits(split)
  if cfg.name == 'npz':
    return _npz(cfg.data_dir, split)
  if cfg.name == 'folder':
    return _folder(cfg.data_dir, split)
  return _tfds(cfg.name, cfg.data_dir, split)


class Source:
  """grain random-access source (__len__, __getitem__) that skips unreadable records."""

  def __len__(self) -> int:
    raise NotImplementedError

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    """(image, label) of record `index`; raises if the record is unreadable."""
    raise NotImplementedError

  def _describe(self, index: int) -> str:
    return f'{type(self).__name__} record {index}'

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    error = None
    for skipped in range(min(MAX_CONSECUTIVE_FAILURES, n)):
      i = (int(index) + skipped) % n
      try:
        image, label = self._read(i)
      except Exception as e:  # pylint: disable=broad-except  (PIL raises many types on bad data)
        logging.warning('Skipping unreadable %s: %s: %s', self._describe(i), type(e).__name__, e)
        error = e
        continue
      return {'image': _rgb(image), 'label': np.int32(label), 'skipped': np.int32(skipped > 0)}
    raise DataError(f'{skipped + 1} consecutive unreadable records from {self._describe(index)} on '
                    f'(last error: {error!r}); check or remove the broken files') from error


class ArraySource(Source):
  """Images and labels already in memory."""

  def __init__(self, images_: np.ndarray, labels: np.ndarray):
    self._images, self._labels = images_, labels

  def __len__(self) -> int:
    return len(self._labels)

  def _read(self, index):
    return self._images[index], self._labels[index]


class NpzSource(Source):
  """Arrays of one or more .npz files, opened on first read in each process (grain workers too),
  so pickling the source to a worker never copies the data; uncompressed files are memory-mapped."""

  def __init__(self, files: list[str], sizes: list[int], prefix: str):
    self._files, self._prefix = files, prefix
    self._starts = np.cumsum([0] + sizes)
    self._arrays, self._lock = None, threading.Lock()

  def __getstate__(self):
    return {**self.__dict__, '_arrays': None, '_lock': None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _describe(self, index):
    return f'record {index} of {self._files}'

  def _read(self, index):
    if self._arrays is None:
      with self._lock:  # grain reads with several threads; load each file once.
        if self._arrays is None:
          self._arrays = [(npz.load(f, self._prefix + 'images'),
                           npz.load(f, self._prefix + 'labels')) for f in self._files]
    k = int(np.searchsorted(self._starts, index, side='right')) - 1
    x, y = self._arrays[k]
    j = index - self._starts[k]
    return np.asarray(x[j]), y[j]


class FolderSource(Source):
  """<root>/<class_name>/**/<image file>, decoded with PIL in __getitem__ (so in grain workers)."""

  def __init__(self, root: str, paths: np.ndarray, labels: np.ndarray, classes: list[str]):
    # Paths are kept as one bytes array: compact and cheap to pickle to workers at ImageNet scale.
    self.root, self.classes = root, classes
    self._paths, self._labels = paths, labels

  def __len__(self) -> int:
    return len(self._labels)

  def _describe(self, index):
    return f'image file {self._path(index)}'

  def _path(self, index: int) -> str:
    return os.path.join(self.root, os.fsdecode(self._paths[index]))

  def _read(self, index):
    return images.decode(self._path(index)), self._labels[index]


class TfdsSource(Source):
  """A TFDS ArrayRecord data source (tfds decodes the images; no TensorFlow involved)."""

  def __init__(self, name: str, split: str, source):
    self._name, self._split, self._source = name, split, source

  def __len__(self) -> int:
    return len(self._source)

  def _describe(self, index):
    return f'record {index} of TFDS {self._name}[{self._split}]'

  def _read(self, index):
    example = self._source[index]
    return example['image'], example['label']


def _rgb(image: np.ndarray) -> np.ndarray:
  """Greyscale (H, W) or (H, W, 1) to (H, W, 3)."""
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _digits_file() -> str:
  """The digits CSV inside scikit-learn's wheel, found without importing scikit-learn (2.4 s of
  every run's start on the embedded default)."""
  spec = importlib.util.find_spec('sklearn')
  path = spec and os.path.join(os.path.dirname(spec.origin), 'datasets', 'data', 'digits.csv.gz')
  if not path or not os.path.isfile(path):
    raise DataError('The embedded digits dataset comes with scikit-learn, which is not installed '
                    'here: pip install -r requirements.txt')
  return path


def _digits(split: str) -> Source:
  if split not in ('train', 'test'):
    raise DataError(f"digits has splits 'train' and 'test', not {split!r}: fix "
                    'config.data.train_split / eval_split')
  values = np.loadtxt(_digits_file(), delimiter=',')   # 1797 rows: 64 pixels in 0..16, label
  images = values[:, :-1].reshape(-1, 8, 8)
  x = np.repeat(np.rint(images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=-1)
  y = values[:, -1].astype(np.int32)
  part = slice(None, DIGITS_TRAIN_SIZE) if split == 'train' else slice(DIGITS_TRAIN_SIZE, None)
  return ArraySource(x[part], y[part])


def _npz(data_dir: str, split: str) -> Source:
  """`data_dir` is a directory and `split` a glob of files in it, or `data_dir` is one .npz file
  whose `<split>_images`/`<split>_labels` arrays (else `images`/`labels`) are used."""
  if os.path.isfile(data_dir):
    files = [data_dir]
    prefix = f'{split}_' if f'{split}_images' in _npz_keys(data_dir) else ''
  elif os.path.isdir(data_dir):
    files = sorted(glob.glob(os.path.join(data_dir, split)))
    prefix = ''
    if not files:
      raise DataError(f'No file in {data_dir} (config.data.data_dir) matches the split pattern '
                      f'{split!r} (config.data.train_split / eval_split); expected e.g. '
                      "'train_*.npz' or 'test.npz'")
  else:
    raise DataError(f'npz data_dir {data_dir!r} (config.data.data_dir) does not exist; set it to a '
                    'directory of .npz files or to one .npz file')
  sizes = [_check_npz(f, prefix) for f in files]
  if sum(sizes) == 0:
    raise DataError(f'npz split {split!r} in {data_dir} (config.data.data_dir) has no examples')
  return NpzSource(files, sizes, prefix)


def _npz_keys(path: str) -> list[str]:
  try:
    return npz.keys(path)
  except Exception as e:  # pylint: disable=broad-except  (zipfile raises several types)
    raise DataError(f'{path} is not a readable .npz file ({e}); write it with np.savez') from e


def _check_npz(path: str, prefix: str) -> int:
  """Checks keys, shapes and dtypes from the arrays' headers; returns the number of examples."""
  want = (prefix + 'images', prefix + 'labels')
  have = _npz_keys(path)
  if missing := [k for k in want if k not in have]:
    raise DataError(f'{path} lacks the array(s) {missing} (it has {have}); an npz source needs '
                    f'`{want[0]}` uint8 (N, H, W, 3) or (N, H, W) and `{want[1]}` int (N,), e.g. '
                    f'np.savez(path, {want[0]}=x, {want[1]}=y)')
  (xs, xt), (ys, yt) = npz.header(path, want[0]), npz.header(path, want[1])
  if xt != np.uint8 or len(xs) not in (3, 4) or (len(xs) == 4 and xs[-1] not in (1, 3)):
    raise DataError(f'{path}: `{want[0]}` is {xt} {xs}, expected uint8 (N, H, W, 3) or (N, H, W); '
                    'convert the images to uint8 RGB or greyscale')
  if yt.kind not in 'iu' or ys != xs[:1]:
    raise DataError(f'{path}: `{want[1]}` is {yt} {ys}, expected integers of shape ({xs[0]},) to '
                    f'match `{want[0]}` {xs}')
  return xs[0]


def _folder(data_dir: str, split: str) -> Source:
  root = os.path.join(data_dir, split) if split else data_dir
  if not os.path.isdir(root):
    raise DataError(f'Image folder {root} does not exist (config.data.data_dir={data_dir!r}, split '
                    f'{split!r}); expected <data_dir>/<split>/<class_name>/<image files>')
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  paths, labels = [], []
  for label, name in enumerate(classes):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
      dirnames.sort()
      for f in sorted(filenames):
        if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
          paths.append(os.fsencode(os.path.relpath(os.path.join(dirpath, f), root)))
          labels.append(label)
  if not paths:
    raise DataError(f'Image folder {root} (config.data.data_dir={data_dir!r}, split {split!r}) has '
                    f'no image files in class subdirectories ({len(classes)} found); expected '
                    f'<class_name>/<file> with one of the extensions {sorted(IMAGE_EXTENSIONS)}')
  return FolderSource(root, np.array(paths), np.array(labels, np.int32), classes)


def _tfds(name: str, data_dir: str, split: str) -> Source:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  how = (f'Prepare it as ArrayRecord (no TensorFlow is needed to read it), e.g. place the manual '
         f'download and run `tfds build {name} --data_dir={data_dir or "TFDS_DATA_DIR"} '
         '--file_format=array_record`, then pass --config.data.data_dir=TFDS_DATA_DIR; '
         f'or convert a TFRecord copy with `tfds convert_format --out_file_format=array_record`')
  if not data_dir:
    raise DataError(f'config.data.data_dir is not set: TFDS dataset {name!r} needs the directory '
                    f'that holds its ArrayRecord build. {how}')
  if not os.path.isdir(data_dir):  # a URI was refused in make_source
    raise DataError(f'TFDS data_dir {data_dir!r} (config.data.data_dir) does not exist. {how}')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f'TFDS dataset {name!r} (config.data.name) is neither a known TFDS name nor '
                    f'prepared in {data_dir} (config.data.data_dir). {how}') from e
  # Checked here because tfds.data_source would try to download and build it (and then fail
  # with a misleading file-format error).
  if not builder.is_prepared():
    raise DataError(f'TFDS dataset {name!r} (config.data.name) is not prepared in {data_dir} '
                    f'(config.data.data_dir; looked in {builder.data_path}). {how}')
  if {'image', 'label'} - set(builder.info.features.keys()):
    raise DataError(f'TFDS dataset {name!r} has features {list(builder.info.features.keys())}; '
                    "this pipeline needs 'image' and 'label'")
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise DataError(f'TFDS dataset {name!r} in {data_dir} is stored as '
                    f'{builder.info.file_format.value}, which has no random access. {how}') from e
  except ValueError as e:
    raise DataError(f'TFDS split {split!r} (config.data.train_split / eval_split) is not valid for '
                    f'{name!r}: {e}; available: {list(builder.info.splits)}') from e
  if not len(source):
    raise DataError(f'TFDS split {split!r} of {name!r} is empty')
  return TfdsSource(name, split, source)
