"""Patchify / unpatchify in the official MAE order.

A patch vector is ordered (pixel row, pixel col, channel) with the channel fastest, and
patches are row-major over the grid (index = i * grid_w + j), matching the flatten order of a
stride-p convolution and the MAE loss target.
"""
import jax.numpy as jnp
import numpy as np


def patchify(images, patch_size: int):
  """(B, H, W, C) -> (B, (H/p)*(W/p), p*p*C). Works on numpy and jax arrays."""
  xp = np if isinstance(images, np.ndarray) else jnp
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = xp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches, patch_size: int, grid_hw: tuple[int, int], channels: int = 3):
  """(B, L, p*p*C) -> (B, H, W, C); the inverse of `patchify`."""
  xp = np if isinstance(patches, np.ndarray) else jnp
  b = patches.shape[0]
  gh, gw = grid_hw
  p = patch_size
  x = patches.reshape(b, gh, gw, p, p, channels)
  x = xp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(b, gh * p, gw * p, channels)
