"""Tests for mim.evaluate.reconstruction."""
import numpy as np
from PIL import Image

from mim.evaluate.reconstruction import reconstruction_grid, save_reconstruction_grid
from mim.patches import patchify

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
P = 4


def _inputs(b=3, size=32, seed=0):
  """Returns uint8 images, their normalized float32 version and a random mask (75% masked)."""
  rng = np.random.default_rng(seed)
  raw = rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8)
  images = ((raw / 255.0 - np.array(MEAN)) / np.array(STD)).astype(np.float32)
  num_patches = (size // P) ** 2
  mask = np.zeros((b, num_patches), np.float32)
  for i in range(b):
    mask[i, rng.permutation(num_patches)[:3 * num_patches // 4]] = 1.0
  return raw, images, mask


def _norm_pix_target(images):
  """Per-patch standardized targets, built patch by patch in (row, col, channel) order."""
  b, h, w, _ = images.shape
  out = []
  for i in range(h // P):
    for j in range(w // P):
      patch = images[:, i * P:(i + 1) * P, j * P:(j + 1) * P, :].reshape(b, -1)
      mu = patch.mean(axis=1, keepdims=True)
      var = patch.var(axis=1, ddof=1, keepdims=True)
      out.append((patch - mu) / np.sqrt(var + 1e-6))
  return np.stack(out, axis=1)


def _tile(grid, index, row, tile):
  """Tile of image `index` in row 0 (original), 1 (masked) or 2 (reconstruction)."""
  band, col = divmod(index, 8)
  y0, x0 = (3 * band + row) * (tile + 2), col * (tile + 2)
  return grid[y0:y0 + tile, x0:x0 + tile]


def _downscale(tile, scale):
  return tile[::scale, ::scale]


def _pixel_mask(mask, size):
  g = size // P
  return np.repeat(np.repeat(mask.reshape(g, g), P, axis=0), P, axis=1).astype(bool)


def test_shape_and_layout():
  _, images, mask = _inputs(b=3)
  grid = reconstruction_grid(images, patchify(images, P), mask, patch_size=P, mean=MEAN, std=STD,
                             norm_pix=False)
  # 32 px images are upscaled x2 to 64 px tiles; 3 rows x 3 columns with 2 px gaps.
  assert grid.shape == (3 * 64 + 2 * 2, 3 * 64 + 2 * 2, 3)
  assert grid.dtype == np.uint8
  assert (grid[64:66] == 255).all() and (grid[:, 64:66] == 255).all()

  _, images, mask = _inputs(b=10, size=64)
  grid = reconstruction_grid(images, patchify(images, P), mask, patch_size=P, mean=MEAN, std=STD,
                             norm_pix=False)
  # Two bands of three rows; 8 columns; no upscaling for 64 px images.
  assert grid.shape == (6 * 64 + 5 * 2, 8 * 64 + 7 * 2, 3)
  assert (_tile(grid, 9, 0, 64) == _tile(grid, 9, 2, 64)).all()
  assert (_tile(grid, 10, 0, 64) == 255).all()  # Empty slot in the last band.


def test_norm_pix_reconstruction_equals_original():
  raw, images, mask = _inputs()
  grid = reconstruction_grid(images, _norm_pix_target(images), mask, patch_size=P, mean=MEAN,
                             std=STD, norm_pix=True)
  for i in range(3):
    original = _downscale(_tile(grid, i, 0, 64), 2)
    recon = _downscale(_tile(grid, i, 2, 64), 2)
    assert np.array_equal(original, raw[i])
    assert np.abs(recon.astype(int) - raw[i].astype(int)).max() <= 1


def test_pixel_reconstruction_equals_original():
  raw, images, mask = _inputs()
  grid = reconstruction_grid(images, patchify(images, P), mask, patch_size=P, mean=MEAN, std=STD,
                             norm_pix=False)
  for i in range(3):
    recon = _downscale(_tile(grid, i, 2, 64), 2)
    assert np.abs(recon.astype(int) - raw[i].astype(int)).max() <= 1


def test_masked_row_and_visible_patches_pasted():
  raw, images, mask = _inputs()
  rng = np.random.default_rng(1)
  pred = rng.normal(size=patchify(images, P).shape).astype(np.float32)  # Garbage predictions.
  grid = reconstruction_grid(images, pred, mask, patch_size=P, mean=MEAN, std=STD, norm_pix=False)
  for i in range(3):
    pm = _pixel_mask(mask[i], 32)
    masked = _downscale(_tile(grid, i, 1, 64), 2)
    recon = _downscale(_tile(grid, i, 2, 64), 2)
    assert (masked[pm] == 128).all()
    assert np.array_equal(masked[~pm], raw[i][~pm])
    assert np.array_equal(recon[~pm], raw[i][~pm])
    assert not np.array_equal(recon[pm], raw[i][pm])


def test_norm_pix_uses_each_patch_statistics():
  raw, images, mask = _inputs()
  # A zero prediction is each patch's own mean (over all its pixels and channels).
  grid = reconstruction_grid(images, np.zeros_like(patchify(images, P)), mask, patch_size=P,
                             mean=MEAN, std=STD, norm_pix=True)
  patch_means = patchify(images, P).mean(axis=-1)  # (B, L)
  for i in range(3):
    mu = np.repeat(np.repeat(patch_means[i].reshape(8, 8), P, 0), P, 1)[..., None]
    expected = np.round(np.clip(mu * np.array(STD) + np.array(MEAN), 0, 1) * 255)
    recon = _downscale(_tile(grid, i, 2, 64), 2).astype(int)
    pm = _pixel_mask(mask[i], 32)
    assert np.abs(recon[pm] - expected[pm]).max() <= 1


def test_save_png(tmp_path):
  _, images, mask = _inputs()
  path = tmp_path / "a" / "b" / "recon.png"
  kwargs = dict(patch_size=P, mean=MEAN, std=STD, norm_pix=False)
  save_reconstruction_grid(str(path), images, patchify(images, P), mask, **kwargs)
  expected = reconstruction_grid(images, patchify(images, P), mask, **kwargs)
  assert np.array_equal(np.asarray(Image.open(path)), expected)
