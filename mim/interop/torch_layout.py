"""Our parameter tree <-> the official MAE / timm state dict (numpy only, no torch).

The official `models_mae.py` and timm's `VisionTransformer` share the encoder names
(`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
mlp.fc2}`, `norm`); the MAE decoder adds `decoder_embed`, `mask_token`, `decoder_pos_embed`,
`decoder_blocks.{j}`, `decoder_norm`, `decoder_pred` (interop.md §1, §2, §5). The sin-cos tables
are constants in our model: export materializes them, import checks them.
"""
import functools
import re
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mim.models import mae
from mim.models import vit

# Heads of the standard ViT / MAE widths, for files that do not store the head count.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DECODER_HEADS_BY_WIDTH = {512: 16}
# The official code compares pos tables computed in float64; this also accepts 16-bit copies.
POS_TABLE_ATOL = 5e-3


class InteropError(ValueError):
  """A weights file cannot be read or does not fit; the message names the file or tensor."""


_ATTN = 'MultiHeadDotProductAttention_0/'
# (torch name, flax path, kind) inside one transformer block; '{}' stands for query/key/value.
_BLOCK = (
    ('norm1.weight', 'LayerNorm_0/scale', 'copy'),
    ('norm1.bias', 'LayerNorm_0/bias', 'copy'),
    ('attn.qkv.weight', _ATTN + '{}/kernel', 'qkv_kernel'),
    ('attn.qkv.bias', _ATTN + '{}/bias', 'qkv_bias'),
    ('attn.proj.weight', _ATTN + 'out/kernel', 'out_kernel'),
    ('attn.proj.bias', _ATTN + 'out/bias', 'copy'),
    ('norm2.weight', 'LayerNorm_1/scale', 'copy'),
    ('norm2.bias', 'LayerNorm_1/bias', 'copy'),
    ('mlp.fc1.weight', 'MlpBlock_0/Dense_0/kernel', 'dense'),
    ('mlp.fc1.bias', 'MlpBlock_0/Dense_0/bias', 'copy'),
    ('mlp.fc2.weight', 'MlpBlock_0/Dense_1/kernel', 'dense'),
    ('mlp.fc2.bias', 'MlpBlock_0/Dense_1/bias', 'copy'),
)
_QKV = ('query', 'key', 'value')


def rules(depth: int, decoder_depth: Optional[int]) -> list[tuple[str, str, str]]:
  """(torch name, flax path, kind) for every parameter; decoder_depth None = encoder only."""
  r = [('cls_token', 'encoder/cls', 'copy'),
       ('patch_embed.proj.weight', 'encoder/embedding/kernel', 'conv'),
       ('patch_embed.proj.bias', 'encoder/embedding/bias', 'copy')]
  for i in range(depth):
    r += [(f'blocks.{i}.{t}', f'encoder/Transformer/encoderblock_{i}/{f}', k) for t, f, k in _BLOCK]
  r += [('norm.weight', 'encoder/Transformer/encoder_norm/scale', 'copy'),
        ('norm.bias', 'encoder/Transformer/encoder_norm/bias', 'copy')]
  if decoder_depth is None:
    return r
  r += [('decoder_embed.weight', 'decoder/embed/kernel', 'dense'),
        ('decoder_embed.bias', 'decoder/embed/bias', 'copy'),
        ('mask_token', 'decoder/mask_token', 'copy')]
  for j in range(decoder_depth):
    r += [(f'decoder_blocks.{j}.{t}', f'decoder/Transformer/decoderblock_{j}/{f}', k)
          for t, f, k in _BLOCK]
  return r + [('decoder_norm.weight', 'decoder/Transformer/decoder_norm/scale', 'copy'),
              ('decoder_norm.bias', 'decoder/Transformer/decoder_norm/bias', 'copy'),
              ('decoder_pred.weight', 'decoder/pred/kernel', 'dense'),
              ('decoder_pred.bias', 'decoder/pred/bias', 'copy')]


def _flax_paths(path: str, kind: str) -> list[str]:
  return [path.format(n) for n in _QKV] if kind.startswith('qkv') else [path]


def _to_torch(kind: str, xs: list) -> Any:
  """Flax leaves -> one torch-layout tensor. Works on numpy arrays and on jax tracers."""
  x = xs[0]
  xp = np if isinstance(x, np.ndarray) else jnp
  if kind == 'copy':
    return x
  if kind == 'dense':                      # (in, out) -> (out, in)
    return x.T
  if kind == 'conv':                       # (p, p, C, D) -> (D, C, p, p)
    return x.transpose(3, 2, 0, 1)
  if kind == 'out_kernel':                 # (H, Dh, D) -> (D, H*Dh)
    return x.reshape(-1, x.shape[-1]).T
  if kind == 'qkv_kernel':                 # 3 x (D, H, Dh) -> rows [q; k; v] of (3*H*Dh, D)
    return xp.concatenate([w.reshape(w.shape[0], -1).T for w in xs])
  if kind == 'qkv_bias':                   # 3 x (H, Dh) -> (3*H*Dh,)
    return xp.concatenate([b.reshape(-1) for b in xs])
  raise AssertionError(kind)


def _from_torch(kind: str, t: np.ndarray, shape: tuple) -> list[np.ndarray]:
  """The inverse of `_to_torch`; `shape` is the flax shape of (each of) the leaves."""
  if kind == 'copy':
    return [t]
  if kind == 'dense':
    return [t.T]
  if kind == 'conv':
    return [t.transpose(2, 3, 1, 0)]
  if kind == 'out_kernel':
    return [t.T.reshape(shape)]
  if kind == 'qkv_kernel':
    return [w.T.reshape(shape) for w in np.split(t, 3)]
  if kind == 'qkv_bias':
    return [b.reshape(shape) for b in np.split(t, 3)]
  raise AssertionError(kind)


def abstract_params(spec: mae.ModelSpec, with_decoder: bool = True) -> dict:
  """The model's parameter shapes (ShapeDtypeStructs), without allocating anything."""
  tree = mae.abstract_params(spec)
  return tree if with_decoder else {'encoder': tree['encoder']}


def to_torch(params: dict, spec: mae.ModelSpec) -> dict[str, Any]:
  """Our params (encoder, optionally decoder) -> the official MAE state dict, pos tables included."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  has_decoder = 'decoder' in params
  out = {}
  for name, path, kind in rules(spec.depth, spec.decoder_depth if has_decoder else None):
    out[name] = _to_torch(kind, [flat.pop(p) for p in _flax_paths(path, kind)])
  if flat:
    raise InteropError(f'Parameters with no official name: {sorted(flat)}.')
  out['pos_embed'] = vit.sincos_table(spec.width, spec.grid)[None]
  if has_decoder:
    out['decoder_pos_embed'] = vit.sincos_table(spec.decoder_width, spec.grid)[None]
  return out


def torch_shapes(spec: mae.ModelSpec, with_decoder: bool = True,
                 abstract: Optional[dict] = None) -> dict[str, tuple]:
  """{official name: shape} of `to_torch`'s output for a model of this spec."""
  if abstract is None:
    abstract = abstract_params(spec, with_decoder)
  return {k: tuple(v.shape)
          for k, v in jax.eval_shape(functools.partial(to_torch, spec=spec), abstract).items()}


def check_compatible(params: dict, reference: dict) -> None:
  """Raises InteropError naming the first tensor of `params` that `reference` (params or shapes of
  the model to load into) lacks or shapes differently. Only the parts in `params` are compared, so
  encoder-only weights fit a full model."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  ref = {k: reference[k] for k in params if k in reference}
  ref = flax.traverse_util.flatten_dict(ref, sep='/')
  missing, unexpected = sorted(ref.keys() - flat.keys()), sorted(flat.keys() - ref.keys())
  if missing or unexpected:
    raise InteropError(f'The weights do not fit the model: missing {missing[:5]}, unexpected '
                       f'{unexpected[:5]} ({len(missing)} and {len(unexpected)} in all).')
  for path, x in flat.items():
    if tuple(x.shape) != tuple(ref[path].shape):
      raise InteropError(f'Tensor {path!r} has shape {tuple(x.shape)}, but the model needs '
                         f'{tuple(ref[path].shape)}.')


def from_torch(sd: dict[str, np.ndarray], spec: mae.ModelSpec, with_decoder: bool,
               names: Optional[dict] = None) -> dict:
  """The official state dict -> our params (float32). Every tensor must be present and fit `spec`;
  `names` maps official names to the file's own names for the error messages."""
  names = names or {}
  abstract = abstract_params(spec, with_decoder)
  want = torch_shapes(spec, with_decoder, abstract)
  missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
  if missing or unexpected:
    raise InteropError(f'The tensors do not match a {"full MAE" if with_decoder else "ViT encoder"} '
                       f'of the inferred size: missing {missing}, unexpected '
                       f'{[names.get(k, k) for k in unexpected]}.')
  for name, shape in want.items():
    if sd[name].shape != shape:
      alias = f' (official name {name!r})' if names.get(name, name) != name else ''
      raise InteropError(f'Tensor {names.get(name, name)!r}{alias} has shape {sd[name].shape}, but '
                         f'the model inferred from the file needs {shape}.')
  for name, width in (('pos_embed', spec.width), ('decoder_pos_embed', spec.decoder_width)):
    if name in sd and not np.allclose(sd[name].astype(np.float32),
                                      vit.sincos_table(width, spec.grid), atol=POS_TABLE_ATOL):
      raise InteropError(f'Tensor {names.get(name, name)!r} is not the fixed MAE 2-D sin-cos table; '
                         'this model has no learned position embedding, so the weights would not '
                         'mean the same thing here.')
  abstract = flax.traverse_util.flatten_dict(abstract, sep='/')
  flat = {}
  for name, path, kind in rules(spec.depth, spec.decoder_depth if with_decoder else None):
    paths = _flax_paths(path, kind)
    for p, x in zip(paths, _from_torch(kind, sd[name], abstract[paths[0]].shape)):
      flat[p] = np.ascontiguousarray(x, dtype=np.float32)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def _count(keys, pattern: str) -> int:
  return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _heads(width: int, stored: int, hint: Optional[mae.ModelSpec], key: str, table: dict) -> int:
  """Head count: stored with the weights > the caller's config when its width matches > table."""
  width_key = 'decoder_width' if key == 'decoder_heads' else 'width'
  hint_heads = getattr(hint, key) if getattr(hint, width_key, 0) == width else 0
  heads = stored or hint_heads or table.get(width, 0)
  if not heads:
    raise InteropError(f'The weights do not say how many attention heads their width-{width} layers '
                       f'have; give them in the config: --config.model.{width_key}={width} '
                       f'--config.model.{key}=N (or pass that config.model to mim.interop.load).')
  if width % heads:
    raise InteropError(f'model.{key}={heads} does not divide the width {width} of the weights.')
  return heads


def infer_model(sd: dict[str, np.ndarray], hint: Optional[mae.ModelSpec] = None,
                stored_heads: tuple[int, int] = (0, 0)) -> tuple[dict, bool]:
  """`config.model` fields from an official state dict, and whether it holds a decoder.

  `stored_heads` are (encoder, decoder) head counts saved with the weights (0 = unknown); `hint`
  is the caller's model, consulted for head counts of layers as wide as its own.
  """
  try:
    width, channels, p, _ = sd['patch_embed.proj.weight'].shape
    num_pos = sd['pos_embed'].shape[1] - 1
    mlp_dim = sd['blocks.0.mlp.fc1.weight'].shape[0]
  except (KeyError, ValueError, IndexError) as e:
    raise InteropError(f'Missing or malformed ViT tensor: {e}.') from None
  grid = int(round(num_pos ** 0.5))
  if channels != 3 or grid * grid != num_pos:
    raise InteropError(f'Expected RGB input and a square patch grid with a cls slot; got {channels} '
                       f'channels and {num_pos + 1} positions.')
  model = dict(variant='', image_size=grid * p, patch_size=p, width=width, mlp_dim=mlp_dim,
               depth=_count(sd, r'blocks\.(\d+)\.'),
               num_heads=_heads(width, stored_heads[0], hint, 'num_heads', HEADS_BY_WIDTH))
  with_decoder = any(k.startswith('decoder_') or k == 'mask_token' for k in sd)
  if with_decoder:
    try:
      dwidth = sd['decoder_embed.weight'].shape[0]
      model.update(decoder_width=dwidth, decoder_depth=_count(sd, r'decoder_blocks\.(\d+)\.'),
                   decoder_mlp_dim=sd['decoder_blocks.0.mlp.fc1.weight'].shape[0])
    except (KeyError, IndexError) as e:
      raise InteropError(f'Incomplete MAE decoder: missing or malformed tensor {e}.') from None
    model['decoder_heads'] = _heads(dwidth, stored_heads[1], hint, 'decoder_heads',
                                    DECODER_HEADS_BY_WIDTH)
  return model, with_decoder
