"""Lazy access to the arrays of a .npz file: headers without loading, memory maps where possible."""
import struct
import zipfile

import numpy as np

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


def keys(path: str) -> list[str]:
  with zipfile.ZipFile(path) as zf:
    return [n[:-len('.npy')] for n in zf.namelist() if n.endswith('.npy')]


def header(path: str, key: str) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of `key`, reading only the first bytes of the (possibly compressed) member."""
  with zipfile.ZipFile(path) as zf, zf.open(key + '.npy') as f:
    shape, _, dtype = _read_header(f)
  return shape, dtype


def load(path: str, key: str) -> np.ndarray:
  """Memory-maps `key` when stored uncompressed (np.savez), else reads it (np.savez_compressed)."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(key + '.npy')
    if info.compress_type != zipfile.ZIP_STORED:
      with zf.open(info) as f:
        return np.lib.format.read_array(f)
  with open(path, 'rb') as f:
    # The member's bytes follow its 30-byte local zip header, file name and extra field, whose
    # lengths can differ from the central directory's, so read them here.
    f.seek(info.header_offset)
    name_len, extra_len = struct.unpack('<HH', f.read(30)[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    shape, fortran, dtype = _read_header(f)
    offset = f.tell()
  return np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape,
                   order='F' if fortran else 'C')


def _read_header(f):
  version = np.lib.format.read_magic(f)
  if version not in _HEADER_READERS:
    raise ValueError(f'unsupported .npy format version {version}')
  return _HEADER_READERS[version](f)
