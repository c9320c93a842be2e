"""`--mode=visualize --config.init_from=W_OR_WEIGHTS`: reconstructions of any MAE with a decoder.

  python main.py --mode=visualize --config=configs/demo.py --workdir=W --config.init_from=W
  python main.py --mode=visualize --config=configs/mae_vitb.py --workdir=OUT \
    --config.init_from=facebook_vit-mae-base_DIR --config.visualize.images='photos/*.jpg'

The weights are anything `mim.interop.load` reads that has a decoder (a workdir's latest
checkpoint, official MAE .pth / .safetensors with decoder, a Hugging Face ViTMAE directory); the
architecture comes with them. The images are `visualize.images` (a directory or glob of any image
files, square center crop then the eval view at the model's size) or the first images of
`data.eval_split`. Each masking row of mask_views.views (the configured strategy, or every one
with masking.name=all) gives W/visualize/reconstructions_<label>.png: original / masked /
reconstruction / reconstruction with the visible patches pasted. The masks are a function of
`seed` (and, for teacher-driven strategies, of the images: the model is its own teacher).
Norm-pix predictions are un-normalized with each patch's mean and variance in the original
(mim/evaluate/reconstruction.py); whether the weights predict norm-pix targets comes from the
weights where they say it (our config.json, HF `norm_pix_loss`), else from targets.norm_pix
(official .pth files do not say: `mae_visualize_*.pth` predict raw pixels, norm_pix=False).
"""
import glob
import os
import re
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

import data as data_lib
from data import images as images_lib
from data import transforms
from mim import masking
from mim import paths
from mim import teacher as teacher_lib
from mim.evaluate import reconstruction
from mim.models import mae

_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


def load_weights(cfg: ml_collections.ConfigDict
                 ) -> tuple[ml_collections.ConfigDict, dict, str]:
  """(a copy of `cfg` with the weights' model and norm_pix, params, what norm_pix follows) for
  cfg.init_from."""
  from mim import interop  # pylint: disable=g-import-not-at-top  (torch only for .pth files)
  loaded_cfg, params = interop.load(cfg.init_from, cfg.model)
  if 'decoder' not in params:
    raise interop.InteropError(
        f'{cfg.init_from} holds an encoder only: reconstructions need the MAE decoder (an MAE '
        'checkpoint with decoder, e.g. our workdirs, *_full.pth, mae_visualize_*.pth, HF ViTMAE).')
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.model = loaded_cfg.model
  # Only pixels are drawn: method heads and loss terms this model may lack do not matter.
  c.targets.update(dict(loss_pred_weight=0.0, feature_weight=0.0))
  c.targets.norm_pix, source = _norm_pix(cfg, loaded_cfg)
  return c, params, source   # mask_views.views validates it, masking row by row


def _norm_pix(cfg, loaded_cfg) -> tuple[bool, str]:
  from mim.interop import files, ours  # pylint: disable=g-import-not-at-top
  path = cfg.init_from
  if paths.isdir(path) and ours.find_step_dir(path):
    return bool(loaded_cfg.targets.norm_pix), 'the run\'s config.json'
  hf_json = os.path.join(path if paths.isdir(path) else os.path.dirname(path), 'config.json')
  if paths.exists(hf_json) and files.read_json(hf_json).get('norm_pix_loss') is not None:
    return bool(files.read_json(hf_json)['norm_pix_loss']), hf_json
  return bool(cfg.targets.norm_pix), 'targets.norm_pix (the weights do not say)'


def image_files(pattern: str) -> list[str]:
  """Sorted image files of a directory (by extension) or of a glob."""
  if os.path.isdir(pattern):
    return sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                  if f.lower().endswith(_IMAGE_EXTENSIONS))
  return sorted(p for p in glob.glob(pattern) if os.path.isfile(p))


def load_images(cfg: ml_collections.ConfigDict, image_size: int) -> np.ndarray:
  """Normalized float32 (n, S, S, 3) images: visualize.images, else the eval split's first."""
  v = cfg.visualize
  if not v.images:
    images, _ = data_lib.load_eval_split(cfg.data, cfg.data.eval_split, image_size=image_size,
                                         max_examples=v.num_images)
    return images
  out = []
  for path in image_files(v.images):
    try:
      image = images_lib.decode(path)
    except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
      logging.warning('visualize.images: skipping %s (%s: %s)', path, type(e).__name__, e)
      continue
    h, w = image.shape[:2]
    side = min(h, w)  # a square center crop first, so any aspect ratio keeps its proportions
    square = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    out.append(transforms.eval_resize(np.ascontiguousarray(square), image_size))
    if len(out) == v.num_images:
      break
  if not out:
    raise data_lib.DataError(f'visualize.images={v.images!r} matches no readable image file.')
  return transforms.normalize(np.stack(out), cfg.data.mean, cfg.data.std)


def predict_fn(view_cfg: ml_collections.ConfigDict, model: mae.MAE, step: int) -> Callable:
  """jitted (params, images, rng) -> (pred (B, L, p*p*3), mask (B, L)) under `view_cfg.masking`
  at train step `step`; teacher-driven strategies use the model itself as the teacher."""
  masker = masking.make_masker(view_cfg.masking, model.spec.grid, max(view_cfg.total_steps, 1))
  teacher_pass = teacher_lib.make_teacher_pass(view_cfg, model)

  def predict(params, images, rng):
    m = masker(rng, images.shape[0], step, teacher_pass(params, images))
    return model.apply({'params': params}, images, m.ids_keep, m.ids_restore)['pixels'], m.mask

  return jax.jit(predict)


def save_reconstructions(views, params, images: np.ndarray, out_dir: str, seed: int) -> list[str]:
  """One reconstructions_<label>.png per view (mask_views.View); returns the paths."""
  written = []
  for view in views:
    c = view.cfg
    model = mae.MAE(mae.spec_from_config(c.model))
    pred, mask = predict_fn(c, model, view.step)(params, images, jax.random.key(seed))
    label = re.sub(r'[^A-Za-z0-9_]+', '_', view.label).strip('_')
    path = os.path.join(out_dir, f'reconstructions_{label}.png')
    reconstruction.save_reconstruction_grid(
        path, images, np.asarray(pred), np.asarray(mask), patch_size=model.spec.patch_size,
        mean=c.data.mean, std=c.data.std, norm_pix=c.targets.norm_pix, raw_row=True)
    written.append(path)
  return written
