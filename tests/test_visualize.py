"""`--mode=visualize` with init_from: reconstructions from our workdirs and HF exports, any images,
and norm-pix predictions un-normalized with each patch's own statistics."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mim import interop
from mim import masking
from mim import train
from mim.evaluate import mask_views
from mim.evaluate import recon_views
from mim.evaluate import reconstruction
from mim.patches import patchify
from tests.test_train import tiny_config

TILE = 64  # 16 px images are drawn x4


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  w = str(tmp_path_factory.mktemp('pretrained'))
  c = tiny_config(total_steps=2, checkpoint_every_steps=2, reconstruction_every_steps=0)
  c.eval.num_reconstructions = 0
  train.train(c, w)
  return w


def _tiles(path, num_images, row):
  """The (num_images, TILE, TILE, 3) tiles of one row of a one-band 4-row grid."""
  grid = np.asarray(Image.open(path))
  assert grid.shape == (4 * TILE + 3 * 2, num_images * TILE + (num_images - 1) * 2, 3)
  y = row * (TILE + 2)
  return np.stack([grid[y:y + TILE, j * (TILE + 2):j * (TILE + 2) + TILE]
                   for j in range(num_images)])


def _identity_predict(view_cfg, model, step):
  """A 'model' whose prediction is exactly its training target (norm-pix or pixels)."""
  masker = masking.make_masker(view_cfg.masking, model.spec.grid, 1)

  def predict(params, images, rng):
    del params
    m = masker(rng, images.shape[0], step)
    target = patchify(images, model.spec.patch_size)
    return (_norm_pix(target) if view_cfg.targets.norm_pix else target), m.mask

  return jax.jit(predict)


def _norm_pix(target):
  mu = target.mean(-1, keepdims=True)
  var = target.var(-1, ddof=1, keepdims=True)
  return (target - mu) / (var + 1e-6) ** 0.5


def test_four_row_grid_of_a_perfect_norm_pix_prediction_is_the_original():
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 256, (3, 16, 16, 3), np.uint8)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  images = ((raw / 255 - np.array(mean)) / np.array(std)).astype(np.float32)
  mask = (rng.random((3, 16)) < 0.75).astype(np.float32)
  grid = reconstruction.reconstruction_grid(images, _norm_pix(patchify(images, 4)), mask,
                                            patch_size=4, mean=mean, std=std, norm_pix=True,
                                            raw_row=True)
  assert grid.shape == (4 * TILE + 6, 3 * TILE + 4, 3)
  tiles = [np.stack([grid[r * 66:r * 66 + TILE, j * 66:j * 66 + TILE] for j in range(3)])
           for r in range(4)]
  np.testing.assert_array_equal(tiles[0][:, ::4, ::4], raw)
  for r in (2, 3):  # raw and pasted reconstructions: the original, up to uint8 rounding
    assert np.abs(tiles[r].astype(int) - tiles[0].astype(int)).max() <= 1


def test_visualize_a_workdir_with_a_perfect_model_reconstructs_exactly(workdir, tmp_path,
                                                                      monkeypatch):
  monkeypatch.setattr(recon_views, 'predict_fn', _identity_predict)
  c = tiny_config(init_from=workdir)
  c.targets.norm_pix = False  # the workdir's config.json says True: that wins
  paths = mask_views.visualize(c, str(tmp_path))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ['masks_random.png', 'reconstructions_random.png', 'spectrum_random.png']
  recon = os.path.join(tmp_path, 'visualize', 'reconstructions_random.png')
  original = _tiles(recon, 8, 0)
  masked = _tiles(recon, 8, 1)
  assert (masked == 128).all(axis=-1).mean() > 0.5   # 12 of 16 patches grey
  for row in (2, 3):
    assert np.abs(_tiles(recon, 8, row).astype(int) - original.astype(int)).max() <= 1


def test_visualize_an_hf_export_on_image_files(workdir, tmp_path):
  config, params = interop.load(workdir)
  hf_dir = str(tmp_path / 'hf')
  interop.save(config, params, 'hf', hf_dir)
  with open(os.path.join(hf_dir, 'config.json')) as f:
    assert json.load(f)['norm_pix_loss'] is True
  folder = tmp_path / 'photos'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i, (size, mode) in enumerate([((40, 20), 'RGB'), ((9, 30), 'RGBA'), ((16, 16), 'L')]):
    Image.fromarray(rng.integers(0, 256, size + ((3,) if mode == 'RGB' else (4,) if mode ==
                                                 'RGBA' else ()), np.uint8), mode).save(
        folder / f'{i}.png')
  (folder / 'notes.txt').write_text('not an image')
  c = tiny_config(init_from=hf_dir)
  c.visualize.images = str(folder)
  c.masking.name = 'block'
  c.masking.block.min_patches = 4  # the 4x4 grid masks 12 patches
  out = str(tmp_path / 'out')
  paths = mask_views.visualize(c, out)
  assert sorted(os.path.basename(p) for p in paths) == [
      'masks_block.png', 'reconstructions_block.png', 'spectrum_block.png']
  first = _tiles(paths[-1], 3, 0)   # the three readable files, each a square crop
  assert first.std() > 10
  # Deterministic: the same seed draws the same masks and predictions.
  cfg, params, source = recon_views.load_weights(c)
  assert cfg.targets.norm_pix and source.endswith('config.json')
  images = recon_views.load_images(cfg, 16)
  again = recon_views.save_reconstructions(mask_views.views(cfg), params, images,
                                           str(tmp_path), cfg.seed)
  np.testing.assert_array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(paths[-1])))
