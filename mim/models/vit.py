"""ViT encoder with big_vision parameter names and the official MAE initialization.

Parameter tree (under the encoder's scope):
  embedding/{kernel (p,p,3,D), bias}, cls (1,1,D),
  Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                                LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}},
  Transformer/encoder_norm.
The positional embedding is the fixed MAE sin-cos table: a constant, not a parameter
(interop materializes it as `pos_embedding` (1, 1+N, D) with a zero cls row).

Every parameter and block-boundary activation carries logical axis names (see mim/sharding.py),
so one code path runs on 1 device and on a (data, fsdp, tensor) mesh.

Applied with `mutable=['attention']`, every attention layer also sows the cls token's attention
over the patches ('cls_to_patches', averaged over heads), for attention-guided masking.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim import patches as patches_lib

# MAE init (methods.md §1.2): xavier-uniform everywhere; q/k/v use scale 0.5 because the
# official code applies xavier to the fused (3D, D) qkv matrix (bound sqrt(1.5/D)), while
# flax hands each of q, k, v its own flattened (D, D) kernel.
XAVIER = nn.initializers.xavier_uniform()
QKV_INIT = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')
TOKEN_INIT = nn.initializers.normal(stddev=0.02)
LN_EPS = 1e-6


def _logical(init, names):
  return nn.with_logical_partitioning(init, names)


def sincos_table(width: int, grid_hw: tuple[int, int], cls_token: bool = True) -> np.ndarray:
  """The official MAE 2D sin-cos table, (1 + H*W, width) float32 with a zero cls row.

  The first half of the channels encodes the column index (w), the second half the row (h);
  within each half all sines come first. Coordinates are integer grid indices.
  """
  if width % 4:
    raise ValueError(f'sin-cos position embedding needs a width divisible by 4, got {width}.')
  gh, gw = grid_hw
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
  rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64),
                           indexing='ij')

  def emb1d(coord):
    angles = coord.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  table = np.concatenate([emb1d(cols), emb1d(rows)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, width)), table], axis=0)
  return table.astype(np.float32)


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x[b, ids[b, k]] for (B, L, D) x and (B, K) ids."""
  return jnp.take_along_axis(x, ids[..., None], axis=1)


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, kernel_init=_logical(XAVIER, ('embed', 'mlp')),
                 bias_init=_logical(nn.initializers.zeros, ('mlp',)))(x)
    x = nn.gelu(x, approximate=False)  # the official models use exact (erf) GELU
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_mlp'))
    return nn.Dense(width, kernel_init=_logical(XAVIER, ('mlp', 'embed')),
                    bias_init=_logical(nn.initializers.zeros, ('embed',)))(x)


def _flat_init(init, num_in_axes: int):
  """Initializes a multi-axis kernel through its 2-D (fan_in, fan_out) view, as torch Linear does."""
  def wrapped(key, shape, dtype=jnp.float32):
    flat = (int(np.prod(shape[:num_in_axes])), int(np.prod(shape[num_in_axes:])))
    return init(key, flat, dtype).reshape(shape)
  return wrapped


class Projection(nn.Module):
  """Dense over the last `num_in_axes` input axes onto `features` (a flax DenseGeneral layout)."""
  features: tuple[int, ...]
  num_in_axes: int
  kernel_init: Any
  kernel_axes: tuple
  bias_axes: tuple

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.num_in_axes:]
    kernel = self.param('kernel', _logical(_flat_init(self.kernel_init, self.num_in_axes),
                                           self.kernel_axes), in_shape + self.features)
    bias = self.param('bias', _logical(nn.initializers.zeros, self.bias_axes), self.features)
    return jnp.tensordot(x, kernel, axes=self.num_in_axes) + bias


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with separate query/key/value/out kernels (flax/big_vision layout)."""
  num_heads: int

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    q, k, v = (Projection((self.num_heads, head_dim), 1, QKV_INIT, ('embed', 'heads', 'kv'),
                          ('heads', 'kv'), name=name)(x) for name in ('query', 'key', 'value'))
    y = jax.nn.dot_product_attention(q, k, v)  # scale head_dim**-0.5, softmax in fp32
    if self.is_mutable_collection('attention'):
      # Only when asked (AttMask's teacher pass): the cls token's attention over the patches,
      # averaged over heads, (B, L). The fused path above never materializes the weights.
      logits = jnp.einsum('bhd,bkhd->bhk', q[:, 0], k) / np.sqrt(head_dim)
      self.sow('attention', 'cls_to_patches',
               jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, :, 1:].mean(axis=1))
    y = nn.with_logical_constraint(y, ('batch', 'length', 'act_heads', None))
    return Projection((width,), 2, XAVIER, ('heads', 'kv', 'embed'), ('embed',), name='out')(y)


def _layer_norm(name=None):
  return nn.LayerNorm(epsilon=LN_EPS, name=name,
                      scale_init=_logical(nn.initializers.ones, ('embed',)),
                      bias_init=_logical(nn.initializers.zeros, ('embed',)))


class EncoderBlock(nn.Module):
  """Pre-LN transformer block."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    x = x + MultiHeadDotProductAttention(self.num_heads)(_layer_norm()(x))
    x = x + MlpBlock(self.mlp_dim)(_layer_norm()(x))
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))


class Transformer(nn.Module):
  """`depth` blocks named `{prefix}block_{i}` and a final LayerNorm `{prefix}_norm`.

  With `remat`, each block's activations are recomputed in the backward pass instead of stored
  (only block inputs stay live): ~1/3 more compute for a fraction of the activation memory.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  prefix: str = 'encoder'
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, name=f'{self.prefix}block_{i}')(x)
    return _layer_norm(name=f'{self.prefix}_norm')(x)


class PatchEmbedding(nn.Module):
  """A stride-p convolution stored in the flax Conv layout: kernel (p, p, C, D), bias (D,).

  Applied as one matmul on patchified pixels (same numbers as the conv; its flatten order
  (py, px, c) is the patchify order). Init as MAE: xavier over the (p*p*C, D) view, and the
  PyTorch default conv bias U(+-1/sqrt(p*p*C)), which MAE never re-initializes.
  """
  patch_size: int
  width: int

  @nn.compact
  def __call__(self, images):
    p, c = self.patch_size, images.shape[-1]
    kernel_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform',
                                                   in_axis=(0, 1, 2), out_axis=3)
    bound = 1.0 / np.sqrt(p * p * c)
    bias_init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    kernel = self.param('kernel', _logical(kernel_init, (None, None, None, 'embed')),
                        (p, p, c, self.width))
    bias = self.param('bias', _logical(bias_init, ('embed',)), (self.width,))
    x = patches_lib.patchify(images, p) @ kernel.reshape(p * p * c, self.width) + bias
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))


class Encoder(nn.Module):
  """ViT encoder over the visible patches: images (B,H,W,3) -> tokens (B, 1+K, D), cls first."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  remat: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, ids_keep: Optional[jax.Array] = None) -> jax.Array:
    b, h, w, c = images.shape
    p = self.patch_size
    grid = (h // p, w // p)
    x = PatchEmbedding(p, self.width, name='embedding')(images)
    pos = sincos_table(self.width, grid)
    x = x + pos[None, 1:]
    if ids_keep is not None:
      x = gather_tokens(x, ids_keep)
    cls = self.param('cls', _logical(TOKEN_INIT, (None, None, 'embed')), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls + pos[None, :1], (b, 1, self.width)), x], axis=1)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    return Transformer(self.depth, self.num_heads, self.mlp_dim, prefix='encoder',
                       remat=self.remat, name='Transformer')(x)
