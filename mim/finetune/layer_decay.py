"""Layer-wise lr decay (BEiT rule, MAE util/lr_decay.py) and the fine-tuning weight-decay mask.

With num_layers = depth + 1: layer id 0 for the patch embedding and the cls token (and the
position table, a constant here), k + 1 for encoder block k, num_layers for everything else (the
final / fc norm, the head). A parameter's lr is scaled by decay ** (num_layers - id): for ViT-B
at 0.65 the head gets 1.0, block 11 0.65 and the patch embedding 0.65 ** 13 = 0.0037.
"""
import re

import jax
import optax

from mim import optim

_BLOCK = re.compile(r'(^|/)encoderblock_(\d+)/')
_STEM = re.compile(r'(^|/)(embedding|cls|pos_embedding)(/|$)')


def layer_id(path: str, num_layers: int) -> int:
  """The layer id of the parameter at `path` ('encoder/Transformer/encoderblock_3/...')."""
  if block := _BLOCK.search(path):
    return int(block.group(2)) + 1
  if _STEM.search(path):
    return 0
  return num_layers


def lr_multipliers(params, depth: int, decay: float):
  """A tree like `params` of each parameter's lr scale decay ** (depth + 1 - layer id)."""
  num_layers = depth + 1
  return jax.tree_util.tree_map_with_path(
      lambda p, _: decay ** (num_layers - layer_id(optim.path_str(p), num_layers)), params)


def scale_by_layer(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by its layer's lr scale (chain it after the optimizer)."""
  return optax.GradientTransformation(
      lambda _: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(lambda u, m: u * m, updates, multipliers),
                                           state))


def weight_decay_mask(params):
  """MAE fine-tuning decays every weight matrix but not biases, norms or the cls token (ndim == 1
  or no_weight_decay there). Our q/k/v biases are (heads, head_dim): names decide, not ranks."""
  return optim.decay_mask(params, r'.*/kernel$')
