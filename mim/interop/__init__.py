"""Weight interop with timm, Hugging Face ViTMAE and the official MAE code.

  config, params = mim.interop.load(path)        # any supported file, directory or our workdir
  paths = mim.interop.save(config, params, 'hf', 'out/vit_mae')
  out = mim.interop.mae_forward(config, params, images_nchw, noise)

`load` returns a config shaped like `mim.config.default_config()` with `model.*` inferred from the
weights, and params holding 'encoder' and, when the file has one, 'decoder' (timm files are
encoder-only: a trainer initializes the decoder fresh).

Files written by `save` / `export` (`path` is a stem; a trailing .safetensors/.pth/.npz is dropped):
  timm  P.safetensors  encoder-only timm state dict (no decoder keys, interop.md §1 trap)
        P.npz          the same encoder with big_vision names, for timm's `model.load_pretrained`
  hf    P/             `config.json` + `model.safetensors` for `ViTMAEForPreTraining.from_pretrained`
  mae   P.safetensors  the official `models_mae` state dict, encoder + decoder
        P.pth          the same as {'model': state_dict}, as the official code saves (needs torch)

Only `.pth` files import torch; everything else is numpy (+ safetensors, orbax for our checkpoints).
"""
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mim import config as config_lib
from mim import masking
from mim import objectives
from mim import paths
from mim.interop import files
from mim.interop import hf
from mim.interop import npz
from mim.interop import ours
from mim.interop import torch_layout
from mim.interop.torch_layout import InteropError, check_compatible
from mim.models import mae

FORMATS = ('timm', 'hf', 'mae')
HF_WEIGHTS = 'model.safetensors'
HF_CONFIG = 'config.json'

__all__ = ['FORMATS', 'InteropError', 'check_compatible', 'export', 'load', 'mae_forward', 'save']


def load(path: str, model_config: Optional[ml_collections.ConfigDict] = None,
         encoder_only: bool = False) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Reads weights in any supported format (detected) -> (config, params as numpy float32).

  `model_config` (a `config.model`) supplies head counts for layers as wide as its own when the
  file does not store them (only HF and our files do); the standard ViT widths need none.
  `encoder_only` ignores a file's decoder (a frozen teacher needs none of its head counts).
  """
  if paths.isdir(path):
    step_dir = ours.find_step_dir(path)
    if step_dir:
      cfg, params = ours.load(step_dir)
      check_compatible(params, torch_layout.abstract_params(mae.spec_for_run(cfg)))
      return cfg, params
    if paths.exists(os.path.join(path, HF_WEIGHTS)):
      return _load_file(os.path.join(path, HF_WEIGHTS), model_config, encoder_only)
    raise files.not_recognized(path, f'a directory with neither checkpoints nor {HF_WEIGHTS}')
  if not paths.exists(path):
    raise InteropError(f'{path} does not exist.')
  return _load_file(path, model_config, encoder_only)


def _load_file(path: str, model_config, encoder_only: bool = False
               ) -> tuple[ml_collections.ConfigDict, dict]:
  tensors = files.read_tensors(path)
  kind = files.classify(tensors, path)
  cfg = config_lib.default_config()
  if kind == 'npz':
    model, params = npz.from_npz(tensors)
    cfg.model.update(model)
    return cfg, params
  names, stored_heads = {}, (0, 0)
  if kind == 'hf':
    tensors, names = hf.from_hf(tensors)
    hf_config = os.path.join(os.path.dirname(path), HF_CONFIG)
    if paths.exists(hf_config):
      extra = hf.read_config_json(files.read_json(hf_config), hf_config)
      stored_heads = (extra['num_heads'], extra['decoder_heads'])
      if extra['norm_pix'] is not None:
        cfg.targets.norm_pix = bool(extra['norm_pix'])
      if extra['mask_ratio'] is not None:
        cfg.masking.ratio = float(extra['mask_ratio'])
  if encoder_only:  # the official decoder's tensors: decoder_* and the mask token
    tensors = {k: v for k, v in tensors.items() if not k.startswith(('decoder', 'mask_token'))}
  hint = mae.spec_from_config(model_config) if model_config is not None else None
  model, with_decoder = torch_layout.infer_model(tensors, hint, stored_heads)
  cfg.model.update(model)
  params = torch_layout.from_torch(tensors, mae.spec_from_config(cfg.model), with_decoder, names)
  return cfg, params


def save(config: ml_collections.ConfigDict, params: dict[str, Any], fmt: str, path: str
         ) -> list[str]:
  """Writes `params` (of the model `config.model`) in `fmt` (timm | hf | mae); returns the paths."""
  if fmt not in FORMATS:
    raise InteropError(f'Unknown export format {fmt!r}; choose one of {FORMATS}.')
  spec = mae.spec_from_config(config.model)
  # The MAE part (encoder + reconstructor); method heads (HPM's loss predictor, a feature head)
  # have no counterpart in the PyTorch formats.
  params = {k: jax.tree.map(np.asarray, v) for k, v in params.items() if k in ('encoder', 'decoder')}
  check_compatible(params, torch_layout.abstract_params(spec))
  base = files.stem(path)
  paths.makedirs(os.path.dirname(paths.absolute(base)))
  if fmt == 'timm':
    sd = torch_layout.to_torch({'encoder': params['encoder']}, spec)
    files.write_safetensors(base + '.safetensors', sd)
    files.write_npz(base + '.npz', npz.to_npz(params['encoder'], spec))
    return [base + '.safetensors', base + '.npz']
  if 'decoder' not in params:
    raise InteropError(f'--export_format={fmt} needs the MAE decoder, but these weights are '
                       'encoder-only; use --export_format=timm.')
  sd = torch_layout.to_torch(params, spec)
  if fmt == 'hf':
    paths.makedirs(path)
    files.write_safetensors(os.path.join(path, HF_WEIGHTS), hf.to_hf(sd))
    files.write_json(os.path.join(path, HF_CONFIG),
                     hf.config_json(spec, config.targets.norm_pix, config.masking.ratio))
    return [os.path.join(path, HF_CONFIG), os.path.join(path, HF_WEIGHTS)]
  files.write_safetensors(base + '.safetensors', sd)
  written = [base + '.safetensors']
  try:
    files.write_pth(base + '.pth', sd)
    written.append(base + '.pth')
  except InteropError as e:  # torch missing: the .safetensors holds the same state dict
    logging.warning('Skipped %s.pth: %s', base, e)
  return written


def export(config: ml_collections.ConfigDict, workdir: Optional[str], fmt: str, path: str
           ) -> list[str]:
  """`main.py --mode=export`: the workdir's latest checkpoint, else `config.init_from`, as `fmt`."""
  source = workdir if workdir and ours.find_step_dir(workdir) else config.get('init_from', '')
  if not source:
    raise InteropError(f'Nothing to export: workdir {workdir!r} has no checkpoint and '
                       'config.init_from is empty.')
  cfg, params = load(source, config.model)
  return save(cfg, params, fmt, path)


def mae_forward(config: ml_collections.ConfigDict, params: dict[str, Any], images: Any, noise: Any
                ) -> dict[str, np.ndarray]:
  """The official MAE forward with pinned masking: images (B, 3, H, W) float32, normalized as the
  official code does; noise (B, L), the lowest `int(L * (1 - ratio))` are kept.
  -> numpy dict(loss, pred (B, L, p*p*3), mask (B, L), ids_restore (B, L))."""
  if 'decoder' not in params:
    raise InteropError('mae_forward needs the MAE decoder; these params are encoder-only.')
  spec = mae.spec_from_config(config.model)
  x = jnp.transpose(jnp.asarray(images, jnp.float32), (0, 2, 3, 1))
  # Ranks keep the exact order of float64 noise, which jax would round to float32.
  ranks = np.argsort(np.argsort(np.asarray(noise), axis=1, kind='stable'), axis=1)
  m = masking.scores_to_mask(jnp.asarray(ranks, jnp.int32),
                             masking.num_keep(spec.num_patches, config.masking.ratio))
  pred = mae.MAE(spec).apply({'params': params}, x, m.ids_keep, m.ids_restore)['pixels']
  loss, _ = objectives.pixel_reconstruction_loss(pred, x, m.mask, patch_size=spec.patch_size,
                                                 norm_pix=config.targets.norm_pix)
  out = dict(loss=loss, pred=pred, mask=m.mask, ids_restore=m.ids_restore)
  return {k: np.asarray(v) for k, v in out.items()}
