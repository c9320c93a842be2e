"""Official MAE names <-> Hugging Face `ViTMAEForPreTraining` names, and its config.json.

Export writes the names of the published `facebook/vit-mae-*` checkpoints (interop.md §3.1),
which every transformers version loads (5.x renames them on load). Import also accepts the 5.x
module names (`vit.layers.{i}.attention.q_proj`, `mlp.fc1`, ...), the
`decoder.decoder_encoder.layer.{j}` names that transformers 5.23's `save_pretrained` writes, and
`ViTMAEModel` files without the `vit.` prefix.
"""
import re

import numpy as np

from mim.interop.torch_layout import InteropError
from mim.models import mae

_TOP = {
    'cls_token': 'vit.embeddings.cls_token',
    'pos_embed': 'vit.embeddings.position_embeddings',
    'patch_embed.proj.weight': 'vit.embeddings.patch_embeddings.projection.weight',
    'patch_embed.proj.bias': 'vit.embeddings.patch_embeddings.projection.bias',
    'norm.weight': 'vit.layernorm.weight',
    'norm.bias': 'vit.layernorm.bias',
    'mask_token': 'decoder.mask_token',
    'decoder_pos_embed': 'decoder.decoder_pos_embed',
    **{f'decoder_{m}.{w}': f'decoder.decoder_{m}.{w}'
       for m in ('embed', 'norm', 'pred') for w in ('weight', 'bias')},
}
_FROM_TOP = {**{v: k for k, v in _TOP.items()},
             **{v[len('vit.'):]: k for k, v in _TOP.items() if v.startswith('vit.')}}
# official sub-module -> HF sub-module (published names); q/k/v are split out of attn.qkv.
_SUB = {'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
        'attn.proj': 'attention.output.dense', 'mlp.fc1': 'intermediate.dense',
        'mlp.fc2': 'output.dense'}
_QKV = ('attention.attention.query', 'attention.attention.key', 'attention.attention.value')
_FROM_SUB = {**{v: k for k, v in _SUB.items()}, **dict(zip(_QKV, ('attn.q', 'attn.k', 'attn.v'))),
             # transformers 5.x module names
             'attention.q_proj': 'attn.q', 'attention.k_proj': 'attn.k', 'attention.v_proj': 'attn.v',
             'attention.o_proj': 'attn.proj', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'}
_BLOCK = re.compile(r'(decoder_)?blocks\.(\d+)\.(.+)\.(weight|bias)$')
_HF_BLOCK = re.compile(r'(?:(?:vit\.)?(?:encoder\.layer|layers)'                 # encoder
                       r'|(decoder)\.decoder_(?:layers|encoder\.layer))'              # decoder
                       r'\.(\d+)\.(.+)\.(weight|bias)$')
PATCH_KEYS = ('vit.embeddings.patch_embeddings.projection.weight',
              'embeddings.patch_embeddings.projection.weight')


def to_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Official state dict -> HF `ViTMAEForPreTraining` state dict (published names)."""
  out = {}
  for name, x in sd.items():
    if name in _TOP:
      out[_TOP[name]] = x
      continue
    decoder, i, sub, kind = _BLOCK.match(name).groups()
    prefix = f'decoder.decoder_layers.{i}.' if decoder else f'vit.encoder.layer.{i}.'
    if sub == 'attn.qkv':
      for hf_sub, part in zip(_QKV, np.split(x, 3)):
        out[f'{prefix}{hf_sub}.{kind}'] = part
    else:
      out[f'{prefix}{_SUB[sub]}.{kind}'] = x
  return out


def from_hf(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """HF state dict -> (official state dict, {official name: HF name} for error messages).
  Unknown names pass through unchanged, so the shape check reports them."""
  out, names, qkv = {}, {}, {}
  for name, x in sd.items():
    m = _HF_BLOCK.match(name)
    sub = _FROM_SUB.get(m.group(3)) if m else None
    if sub:
      decoder, i, _, kind = m.groups()
      prefix = f'{"decoder_" if decoder else ""}blocks.{i}.'
      if sub in ('attn.q', 'attn.k', 'attn.v'):
        qkv.setdefault(f'{prefix}attn.qkv.{kind}', {})[sub[-1]] = (name, x)
        continue
      official = f'{prefix}{sub}.{kind}'
    else:
      official = _FROM_TOP.get(name, name)
    out[official], names[official] = x, name
  for official, parts in qkv.items():
    shapes = {n: x.shape for n, x in parts.values()}
    if sorted(parts) != ['k', 'q', 'v'] or len(set(shapes.values())) != 1:
      raise InteropError(f'Query/key/value tensors do not match: {shapes}.')
    out[official] = np.concatenate([parts[c][1] for c in 'qkv'])
    names[official] = ', '.join(parts[c][0] for c in 'qkv')
  return out, names


def config_json(spec: mae.ModelSpec, norm_pix: bool, mask_ratio: float) -> dict:
  """A `ViTMAEConfig` for `spec`, with MAE's LayerNorm eps (the HF default 1e-12 is not what MAE
  trained with, interop.md §3.2)."""
  return dict(
      architectures=['ViTMAEForPreTraining'], model_type='vit_mae',
      image_size=spec.image_size, patch_size=spec.patch_size, num_channels=3,
      hidden_size=spec.width, num_hidden_layers=spec.depth, num_attention_heads=spec.num_heads,
      intermediate_size=spec.mlp_dim,
      decoder_hidden_size=spec.decoder_width, decoder_num_hidden_layers=spec.decoder_depth,
      decoder_num_attention_heads=spec.decoder_heads,
      decoder_intermediate_size=spec.decoder_mlp_dim,
      hidden_act='gelu', qkv_bias=True, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, initializer_range=0.02,
      mask_ratio=mask_ratio, norm_pix_loss=norm_pix)


def read_config_json(cfg: dict, path: str) -> dict:
  """The head counts and training settings a ViTMAE config.json adds to what the tensors say."""
  if cfg.get('model_type') != 'vit_mae':
    raise InteropError(f'{path} has model_type={cfg.get("model_type")!r}; only ViTMAE '
                       "('vit_mae') Hugging Face checkpoints are supported.")
  if cfg.get('hidden_act', 'gelu') != 'gelu' or not cfg.get('qkv_bias', True):
    raise InteropError(f'{path}: hidden_act={cfg.get("hidden_act")!r}, '
                       f'qkv_bias={cfg.get("qkv_bias")} differ from MAE (exact gelu, qkv bias).')
  return dict(num_heads=cfg.get('num_attention_heads', 0),
              decoder_heads=cfg.get('decoder_num_attention_heads', 0),
              norm_pix=cfg.get('norm_pix_loss'), mask_ratio=cfg.get('mask_ratio'))
