"""Every file a run reads or writes goes through here, so a workdir, `init_from` or
`teacher.weights` may be a local path or a Cloud Storage URI (gs://bucket/path).

Built on etils.epath: local paths use `os`, gs:// uses gcsfs (fsspec), no TensorFlow. Orbax reads
and writes checkpoints through tensorstore's own gcs driver; both honour the emulator endpoints
(STORAGE_EMULATOR_HOST for gcsfs, TENSORSTORE_GCS_HTTP_URL for tensorstore).
"""
import io
import os

from etils import epath
import fsspec

# tensorstore writes objects gcsfs never sees: a cached listing would hide new checkpoints
fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)


def is_remote(path: str) -> bool:
  """Whether `path` is a URI (gs://...) rather than a local path."""
  return '://' in str(path)


def absolute(path: str) -> str:
  """`path` made absolute (Orbax needs it); a URI already is."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def listdir(path: str) -> list[str]:
  """The names in directory `path` (on Cloud Storage: the next level of its prefix)."""
  return sorted(p.name for p in epath.Path(path).iterdir())


def files_under(path: str) -> list[str]:
  """Every file below directory `path`, sorted, relative to it ('state/manifest.ocdbt', ...)."""
  # walk() yields Cloud Storage roots without their gs:// scheme: compare scheme-less paths
  bare = lambda p: str(p).split('://', 1)[-1]
  top = bare(epath.Path(path))
  return sorted(os.path.relpath(os.path.join(bare(root), name), top)
                for root, _, names in epath.Path(path).walk() for name in names)


def makedirs(path: str) -> None:
  """Creates `path` and its parents (a no-op on Cloud Storage, which has no directories)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_bytes(path: str, data: bytes) -> None:
  """Writes `path` whole and atomically: readers see the old or the new file, never a part (an
  object upload is atomic; a local file is written beside and renamed)."""
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def open_binary(path: str) -> io.BufferedIOBase:
  """`path` opened for reading bytes (a stream; Cloud Storage objects are fetched in blocks)."""
  return epath.Path(path).open('rb')


def rename(path: str, target: str) -> None:
  """Moves file or directory `path` to `target`. On Cloud Storage it copies, then deletes: a
  prefix cannot move at once, and gcsfs's per-object moveTo call is not served by every GCS API
  (the emulator answers 400 and gcsfs logs a traceback before it falls back to the same)."""
  if not is_remote(path):
    os.rename(path, target)
    return
  fs = fsspec.filesystem('gs')
  fs.copy(path, target, recursive=fs.isdir(path))
  fs.rm(path, recursive=True)


class AppendFile:
  """A file that grows by `write`s, durable at each `flush`: a local file in append mode, or a
  Cloud Storage object (which cannot be appended to) rewritten whole from memory at each flush.
  `initial` is written first (the part of an earlier file a resumed run keeps)."""

  def __init__(self, path: str, initial: bytes = b''):
    self.path = path
    self._remote = is_remote(path)
    if self._remote:
      self._data = bytearray(initial)
      self._dirty = True
    else:
      write_bytes(path, initial)
      self._file = open(path, 'ab')

  def write(self, data: bytes) -> None:
    if self._remote:
      self._data += data
      self._dirty = True
    else:
      self._file.write(data)

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()
    elif self._dirty:
      epath.Path(self.path).write_bytes(bytes(self._data))
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._file.close()

