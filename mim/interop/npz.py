"""big_vision-style `.npz` of the encoder: our flax names under `params/`, plus the materialized
`params/pos_embedding` (1, 1+N, D) with its zero cls row, which timm's `load_pretrained` reads
into a stock `VisionTransformer` (interop.md §4.2)."""
import re

import flax
import numpy as np

from mim import config as config_lib
from mim.interop import torch_layout
from mim.interop.torch_layout import InteropError
from mim.models import mae
from mim.models import vit

PREFIX = 'params/'
_QUERY = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'


def to_npz(encoder_params: dict, spec: mae.ModelSpec) -> dict[str, np.ndarray]:
  flat = flax.traverse_util.flatten_dict(encoder_params, sep='/')
  flat['pos_embedding'] = vit.sincos_table(spec.width, spec.grid)[None]
  return {PREFIX + k: v for k, v in flat.items()}


def from_npz(tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
  """-> (`config.model` fields, {'encoder': params}). The head count is in the kernel shapes."""
  flat = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
  try:
    p, _, _, width = flat['embedding/kernel'].shape
    pos = flat.pop('pos_embedding')
    heads = flat[_QUERY].shape[1]
    mlp_dim = flat['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'].shape[1]
  except (KeyError, ValueError, IndexError) as e:
    raise InteropError(f'Missing or malformed big_vision tensor: {PREFIX}{e.args[0]}.') from None
  grid = int(round((pos.shape[1] - 1) ** 0.5))
  depth = len({m.group(1) for k in flat if (m := re.match(r'Transformer/encoderblock_(\d+)/', k))})
  model = dict(variant='', image_size=grid * p, patch_size=p, width=width, depth=depth,
               num_heads=heads, mlp_dim=mlp_dim)
  model_cfg = config_lib.default_config().model
  model_cfg.update(model)
  spec = mae.spec_from_config(model_cfg)
  params = {'encoder': flax.traverse_util.unflatten_dict(
      {k: np.asarray(v, np.float32) for k, v in flat.items()}, sep='/')}
  torch_layout.check_compatible(params, torch_layout.abstract_params(spec, with_decoder=False))
  if pos.shape != (1, 1 + grid * grid, width) or not np.allclose(
      pos, vit.sincos_table(width, spec.grid), atol=torch_layout.POS_TABLE_ATOL):
    raise InteropError(f'{PREFIX}pos_embedding (shape {pos.shape}) is not the fixed MAE sin-cos table '
                       f'(1, {1 + grid * grid}, {width}) with a cls row.')
  return model, params
