"""Weight files: reading (with format detection) and writing. torch is imported only for `.pth`.

A file's tensors are classified by their names, whatever the container:
  'official'  timm / official MAE names (`patch_embed.proj.weight`, ...), encoder-only or full;
  'hf'        Hugging Face ViTMAE names (`vit.embeddings...`);
  'npz'       big_vision-style `params/embedding/kernel`, ... (what timm's `load_pretrained` reads).
"""
import argparse
import io
import json
import os
import zipfile
from typing import Any

import numpy as np

from mim import paths
from mim.interop.hf import PATCH_KEYS as HF_PATCH_KEYS
from mim.interop.torch_layout import InteropError

SUPPORTED = (
    'our training workdir or one of its checkpoints/<step> directories',
    'a Hugging Face ViTMAE directory (config.json + model.safetensors)',
    '.safetensors with timm / official MAE or Hugging Face ViTMAE tensor names',
    '.pth / .pt / .bin (official MAE {"model": state_dict}, or a plain state dict)',
    '.npz with big_vision names (params/embedding/kernel, ...)',
)
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
NPZ_PREFIX = 'params/'


def not_recognized(path: str, why: str) -> InteropError:
  return InteropError(f'{path} is not a recognized weights format ({why}). Supported: '
                      + '; '.join(SUPPORTED) + '.')


def _torch():
  try:
    import torch  # only .pth files need it; it is a dev/export dependency (requirements-dev.txt)
  except ImportError:
    raise InteropError('Reading or writing .pth files needs PyTorch: pip install -r '
                       'requirements-dev.txt (or use the .safetensors file).') from None
  return torch


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors import numpy as st_numpy
  try:
    return st_numpy.load(paths.read_bytes(path))
  except SafetensorError as e:
    raise not_recognized(path, f'unreadable safetensors: {e}') from None
  except KeyError as e:  # safetensors.numpy has no bfloat16
    raise InteropError(f'{path}: tensors of dtype {e} cannot be read without torch; save them as '
                       'float32.') from None


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """The flat {name: array} of a weights file (unwrapping the official {'model': ...} dict)."""
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  if path.endswith('.npz'):
    try:
      with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as f:
        return dict(f)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
      raise not_recognized(path, f'unreadable npz: {e}') from None
  if path.endswith(TORCH_SUFFIXES):
    torch = _torch()
    try:
      # Official training checkpoints also hold the argparse Namespace of the run; allow just that
      # (weights_only: never unpickle arbitrary objects).
      with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(io.BytesIO(paths.read_bytes(path)), map_location='cpu',
                         weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
      raise not_recognized(path, f'torch.load failed: {e}') from None
    for key in ('model', 'state_dict'):
      if isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
      raise not_recognized(path, 'not a state dict of tensors')
    # numpy has no bfloat16; the model is float32 anyway
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in obj.items()}
  raise not_recognized(path, 'unknown file type')


def classify(tensors: dict[str, Any], path: str) -> str:
  if 'patch_embed.proj.weight' in tensors:
    return 'official'
  if any(k in tensors for k in HF_PATCH_KEYS):
    return 'hf'
  if NPZ_PREFIX + 'embedding/kernel' in tensors:
    return 'npz'
  raise not_recognized(path, f'no ViT patch embedding among its {len(tensors)} tensors, e.g. '
                             f'{sorted(tensors)[:3]}')


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  from safetensors import numpy as st_numpy
  paths.write_bytes(path, st_numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))


def write_pth(path: str, sd: dict[str, np.ndarray]) -> None:
  """The official MAE checkpoint layout: {'model': state_dict}."""
  torch = _torch()
  buffer = io.BytesIO()
  torch.save({'model': {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, buffer)
  paths.write_bytes(path, buffer.getvalue())


def write_npz(path: str, tensors: dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **tensors)
  paths.write_bytes(path, buffer.getvalue())


def write_json(path: str, obj: dict) -> None:
  paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def read_json(path: str) -> dict:
  return json.loads(paths.read_text(path))


def stem(path: str) -> str:
  """`P`, `P.safetensors`, `P.pth`, `P.npz` all name the file stem `P`."""
  root, ext = os.path.splitext(path)
  return root if ext in ('.safetensors', '.npz') + TORCH_SUFFIXES else path
