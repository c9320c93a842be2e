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


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as the official models use. Written with erf rather than flax's erfc form:
  the same values within 5e-7, and XLA's CPU erf is a short polynomial where erfc is an
  exp-and-select sequence (2.5-3.5x slower; it was 8% of the ViT-B step, bench/step_profile.py)."""
  return 0.5 * x * (1 + jax.lax.erf(x * 2 ** -0.5))  # Python floats keep x's dtype


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
    x = gelu(x)
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
  """A dense layer over x's last `num_in_axes` axes whose kernel keeps flax's DenseGeneral layout
  `kernel_shape` (input axes, then output axes: what checkpoints and the interop hold) but runs as
  one 2-D matmul on its (fan_in, fan_out) view. As an einsum on the multi-axis kernel, XLA copied
  each attention kernel into another layout every step (ViT-B MAE step 7% slower)."""
  kernel_shape: tuple[int, ...]
  num_in_axes: int
  kernel_init: Any
  kernel_axes: tuple
  bias_axes: tuple

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', _logical(_flat_init(self.kernel_init, self.num_in_axes),
                                           self.kernel_axes), self.kernel_shape)
    out_shape = self.kernel_shape[self.num_in_axes:]
    bias = self.param('bias', _logical(nn.initializers.zeros, self.bias_axes), out_shape)
    fan_in = int(np.prod(self.kernel_shape[:self.num_in_axes]))
    lead = x.shape[:x.ndim - self.num_in_axes]
    y = (x.reshape(*lead, fan_in) @ kernel.reshape(fan_in, -1).astype(x.dtype)
         + bias.reshape(-1).astype(x.dtype))
    return y.reshape(*lead, *out_shape)


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v over (B, H, L, Dh) inputs, the softmax in float32.

  A custom VJP: the backward pass uses the identity sum_k p (dp) = sum_d o (do), a row sum over
  Dh instead of one over the (L, L) weights, and keeps only (q, k, v, weights, out) for it
  (ViT-B MAE step 3% faster than autodiff of the same forward, bench/step_profile.py)."""
  return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
  logits = jnp.einsum('bhqd,bhkd->bhqk', q * q.shape[-1] ** -0.5, k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  out = jnp.einsum('bhqk,bhkd->bhqd', weights, v)
  return out, (q, k, v, weights, out)


def _attention_bwd(residuals, d_out):
  q, k, v, weights, out = residuals
  d_v = jnp.einsum('bhqk,bhqd->bhkd', weights, d_out)
  d_weights = jnp.einsum('bhqd,bhkd->bhqk', d_out, v)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (weights * (d_weights - row.astype(d_out.dtype))) * q.shape[-1] ** -0.5
  return (jnp.einsum('bhqk,bhkd->bhqd', d_logits, k), jnp.einsum('bhqk,bhqd->bhkd', d_logits, q),
          d_v)


attention.defvjp(_attention_fwd, _attention_bwd)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with separate query/key/value/out kernels (flax/big_vision layout).

  The attention itself runs heads-first, (B, H, L, Dh): both of its matmuls are then plain batched
  matmuls. jax.nn.dot_product_attention on (B, L, H, Dh) cost ViT-B's MAE step ~2.5x more in
  attention (transposes and a 5-D softmax around its einsums; bench/step_profile.py).
  """
  num_heads: int

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    q, k, v = (Projection((width, self.num_heads, head_dim), 1, QKV_INIT, ('embed', 'heads', 'kv'),
                          ('heads', 'kv'), name=name)(x).transpose(0, 2, 1, 3)
               for name in ('query', 'key', 'value'))
    y = attention(q, k, v)
    if self.is_mutable_collection('attention'):
      # Only when asked (AttMask's teacher pass, no gradient): the cls token's attention over
      # the patches, averaged over heads, (B, L).
      logits = jnp.einsum('bhd,bhkd->bhk', q[:, :, 0] * head_dim ** -0.5, k)
      self.sow('attention', 'cls_to_patches',
               jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, :, 1:].mean(axis=1))
    y = nn.with_logical_constraint(y, ('batch', 'act_heads', 'length', None))
    return Projection((self.num_heads, head_dim, width), 2, XAVIER, ('heads', 'kv', 'embed'),
                      ('embed',), name='out')(y.transpose(0, 2, 1, 3))


def _layer_norm(name=None):
  return nn.LayerNorm(epsilon=LN_EPS, name=name,
                      scale_init=_logical(nn.initializers.ones, ('embed',)),
                      bias_init=_logical(nn.initializers.zeros, ('embed',)))


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth (timm DropPath): per sample, the branch is zeroed with probability `rate`
  and kept scaled by 1 / (1 - rate) otherwise, so its expected value is unchanged."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class EncoderBlock(nn.Module):
  """Pre-LN transformer block. With `drop_path` > 0, applied with a 'dropout' rng (fine-tuning's
  train step), each residual branch goes through `drop_path`; without the rng it is the identity."""
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x):
    train = self.drop_path > 0 and self.has_rng('dropout')
    branch = (lambda y: drop_path(y, self.drop_path, self.make_rng('dropout'))) if train else (
        lambda y: y)
    x = x + branch(MultiHeadDotProductAttention(self.num_heads)(_layer_norm()(x)))
    x = x + branch(MlpBlock(self.mlp_dim)(_layer_norm()(x)))
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))


class Transformer(nn.Module):
  """`depth` blocks named `{prefix}block_{i}` and a final LayerNorm `{prefix}_norm`.

  With `remat`, each block's activations are recomputed in the backward pass instead of stored
  (only block inputs stay live): ~1/3 more compute for a fraction of the activation memory.
  `drop_path` is the last block's stochastic-depth rate, rising linearly from 0 at the first
  (timm); `final_norm=False` leaves the final LayerNorm out (MAE fine-tuning pools before fc_norm).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  prefix: str = 'encoder'
  remat: bool = False
  drop_path: float = 0.0
  final_norm: bool = True

  @nn.compact
  def __call__(self, x, taps: tuple[int, ...] = (), tap_final_norm: bool = True):
    """x -> the output; with `taps` (block indices), (the output, [those blocks' outputs]), the
    last block's after the final LayerNorm (the encoder's output) if `tap_final_norm`."""
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    outputs = {}
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      x = outputs[i] = block(self.num_heads, self.mlp_dim, rate, name=f'{self.prefix}block_{i}')(x)
    if self.final_norm:
      x = _layer_norm(name=f'{self.prefix}_norm')(x)
      if tap_final_norm:
        outputs[self.depth - 1] = x
    return (x, [outputs[i] for i in taps]) if taps else x


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
  drop_path: float = 0.0     # fine-tuning only (see Transformer); 0 in pretraining
  final_norm: bool = True

  @nn.compact
  def __call__(self, images: jax.Array, ids_keep: Optional[jax.Array] = None,
               taps: tuple[int, ...] = (), tap_final_norm: bool = True):
    """-> tokens; with `taps`, (tokens, [the tapped blocks' tokens]) (Transformer)."""
    b, h, w, c = images.shape
    p = self.patch_size
    grid = (h // p, w // p)
    x = PatchEmbedding(p, self.width, name='embedding')(images)
    pos = jnp.asarray(sincos_table(self.width, grid), x.dtype)
    x = x + pos[None, 1:]
    if ids_keep is not None:
      x = gather_tokens(x, ids_keep)
    cls = self.param('cls', _logical(TOKEN_INIT, (None, None, 'embed')), (1, 1, self.width)).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls + pos[None, :1], (b, 1, self.width)), x], axis=1)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    return Transformer(self.depth, self.num_heads, self.mlp_dim, prefix='encoder',
                       remat=self.remat, drop_path=self.drop_path, final_norm=self.final_norm,
                       name='Transformer')(x, taps, tap_final_norm)
