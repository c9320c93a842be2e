"""MAE reconstruction grids: original / masked input / [raw reconstruction /] reconstruction with
the visible patches pasted, as a uint8 RGB image."""
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

from mim import paths
from mim.patches import patchify, unpatchify

_GREY = 128  # Fill for masked patches in the masked-input row.
_GAP = 2  # Pixels between tiles, drawn white.
_COLS = 8  # Images per row band.
_MIN_TILE = 64  # Small images are upscaled (nearest) to at least this many pixels.


def _to_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  x = images * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def reconstruction_grid(images: np.ndarray, pred: np.ndarray, mask: np.ndarray, *, patch_size: int,
                        mean: Sequence[float], std: Sequence[float], norm_pix: bool,
                        raw_row: bool = False) -> np.ndarray:
  """Returns a uint8 (rows, cols, 3) grid visualizing MAE reconstructions.

  Args:
    images: (B, H, W, 3) model inputs, normalized with `mean` / `std`.
    pred: (B, L, p*p*3) decoder predictions in `mim.patches.patchify` order.
    mask: (B, L), 1 = masked (removed), 0 = visible.
    patch_size: p.
    mean, std: per-channel normalization applied to `images`.
    norm_pix: whether `pred` predicts per-patch standardized targets. Each patch is then
      un-normalized with its own statistics over the normalized input (unbiased variance, as
      in the MAE loss): pred * sqrt(var + 1e-6) + mean.
    raw_row: also draw the model's output on every patch (visible ones included: what the
      decoder makes of the patches it saw), before the pasted row.

  Each band of up to 8 images is three rows (four with `raw_row`): original, masked input
  (masked patches mid-grey), [raw reconstruction,] and reconstruction with the visible patches
  pasted from the original. Tiles are separated by 2 white pixels; images smaller than 64 px are
  upscaled (nearest) to at least 64 px.
  """
  images = np.asarray(images, np.float32)
  pred = np.asarray(pred, np.float32)
  mask = np.asarray(mask).astype(bool)
  b, h, w, c = images.shape
  p = patch_size
  grid_hw = (h // p, w // p)

  target = patchify(images, p)
  if norm_pix:
    mu = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    pred = pred * np.sqrt(var + 1e-6) + mu
  # Only the masked patches are model output; the visible ones are shown as the model saw them.
  recon = np.where(mask[..., None], pred, target)
  pixel_mask = unpatchify(np.repeat(mask[..., None], p * p * c, axis=-1), p, grid_hw, c)

  original = _to_uint8(images, mean, std)
  masked = np.where(pixel_mask, np.uint8(_GREY), original)
  reconstructed = _to_uint8(unpatchify(recon, p, grid_hw, c), mean, std)
  shown = [original, masked, reconstructed]
  if raw_row:
    shown.insert(2, _to_uint8(unpatchify(pred, p, grid_hw, c), mean, std))

  scale = max(1, math.ceil(_MIN_TILE / min(h, w)))
  rows = [np.repeat(np.repeat(x, scale, axis=1), scale, axis=2) for x in shown]
  th, tw = h * scale, w * scale
  cols = min(b, _COLS)
  bands = math.ceil(b / _COLS)
  n = len(rows)
  out = np.full((n * bands * (th + _GAP) - _GAP, cols * (tw + _GAP) - _GAP, c), 255, np.uint8)
  for i in range(b):
    band, col = divmod(i, _COLS)
    x0 = col * (tw + _GAP)
    for r, row in enumerate(rows):
      y0 = (n * band + r) * (th + _GAP)
      out[y0:y0 + th, x0:x0 + tw] = row[i]
  return out


def save_reconstruction_grid(path: str, *args, **kwargs) -> None:
  """Writes `reconstruction_grid(*args, **kwargs)` as a PNG at `path` (local or gs://)."""
  buffer = io.BytesIO()
  Image.fromarray(reconstruction_grid(*args, **kwargs)).save(buffer, format="PNG")
  paths.write_bytes(path, buffer.getvalue())
