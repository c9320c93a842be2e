"""`--mode=summary`: the parameter table, the trainable count and analytic FLOPs."""
import flax.linen as nn
import jax
import numpy as np

from mim import flops as flops_lib
from mim import masking
from mim import optim
from mim.models import mae


def param_table(params) -> list[tuple[str, tuple[int, ...], int]]:
  rows = []
  jax.tree_util.tree_map_with_path(
      lambda p, x: rows.append((optim.path_str(p), tuple(x.shape), int(np.prod(x.shape)))), params)
  return rows


def summarize(cfg) -> str:
  spec = mae.spec_from_config(cfg.model)
  keep = masking.num_keep(spec.num_patches, cfg.masking.ratio)
  model = mae.MAE(spec)
  images = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3), np.float32)
  ids_keep = jax.ShapeDtypeStruct((1, keep), np.int32)
  ids_restore = jax.ShapeDtypeStruct((1, spec.num_patches), np.int32)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, ids_keep,
                                   ids_restore)['params'])
  rows = param_table(params)
  width = max(len(r[0]) for r in rows)
  lines = [f'{"parameter":<{width}}  {"shape":<20} {"count":>12}']
  lines += [f'{name:<{width}}  {str(shape):<20} {count:>12,}' for name, shape, count in rows]
  total = sum(r[2] for r in rows)
  by_part = {part: sum(r[2] for r in rows if r[0].startswith(part)) for part in ('encoder', 'decoder')}
  per_image = flops_lib.mae_train_flops_per_image(spec, keep)
  lines += [
      '',
      f'model: ViT {spec.width}x{spec.depth} ({spec.num_heads} heads), patch {spec.patch_size}, '
      f'image {spec.image_size}, decoder {spec.decoder_width}x{spec.decoder_depth} '
      f'({spec.decoder_heads} heads); {spec.num_patches} patches, {keep} visible',
      f'encoder parameters: {by_part["encoder"]:,}',
      f'decoder parameters: {by_part["decoder"]:,}',
      f'trainable parameters: {total}',
      f'FLOPs per image (train step, analytic): {per_image / 1e9:.2f} GFLOP',
      f'FLOPs per step (batch {cfg.batch_size}): {per_image * cfg.batch_size / 1e12:.3f} TFLOP',
  ]
  return '\n'.join(lines)
