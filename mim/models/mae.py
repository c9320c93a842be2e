"""Masked autoencoder: ViT encoder on visible patches + a light transformer decoder + pixel head.

The decoder's parameters live under `decoder/`: embed (Dense D->Dd), mask_token (1,1,Dd),
Transformer/decoderblock_{i}/..., Transformer/decoder_norm, pred (Dense Dd->p*p*3).
The forward pass follows the official `models_mae.py` (methods.md §1.5).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim import sharding
from mim.models import vit

# ViT presets: (width, depth, heads); MLP is 4x width.
VARIANTS = {
    'Ti': (192, 12, 3),
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'H': (1280, 32, 16),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Resolved architecture; built from the `config.model` section by `spec_from_config`."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  decoder_width: int
  decoder_depth: int
  decoder_heads: int
  decoder_mlp_dim: int
  remat: bool = False

  @property
  def grid(self) -> tuple[int, int]:
    return (self.image_size // self.patch_size,) * 2

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * 3


def spec_from_config(model_cfg) -> ModelSpec:
  """`model.variant` ('B', 'L', ...) fills width/depth/heads unless given explicitly (> 0)."""
  width, depth, heads = VARIANTS[model_cfg.variant] if model_cfg.variant else (0, 0, 0)
  width = model_cfg.width or width
  return ModelSpec(
      image_size=model_cfg.image_size, patch_size=model_cfg.patch_size,
      width=width, depth=model_cfg.depth or depth, num_heads=model_cfg.num_heads or heads,
      mlp_dim=model_cfg.mlp_dim or 4 * width,
      decoder_width=model_cfg.decoder_width, decoder_depth=model_cfg.decoder_depth,
      decoder_heads=model_cfg.decoder_heads,
      decoder_mlp_dim=model_cfg.decoder_mlp_dim or 4 * model_cfg.decoder_width,
      remat=model_cfg.remat)


def example_inputs(spec: ModelSpec, keep: int = 1, batch: int = 1):
  """(images, ids_keep, ids_restore) placeholders to initialize the model with; the parameter
  shapes do not depend on `keep` or `batch`."""
  return (jnp.zeros((batch, spec.image_size, spec.image_size, 3), jnp.float32),
          jnp.zeros((batch, keep), jnp.int32),
          jnp.tile(jnp.arange(spec.num_patches, dtype=jnp.int32)[None], (batch, 1)))


def abstract_params(spec: ModelSpec) -> dict:
  """The parameter tree as ShapeDtypeStructs (nothing allocated, no sharding constraints)."""
  boxed = jax.eval_shape(lambda: MAE(spec).init(jax.random.key(0), *example_inputs(spec)))
  return sharding.strip_boxes(boxed['params'])


class Decoder(nn.Module):
  """Encoder tokens (B, 1+K, D) + ids_restore (B, L) -> per-patch predictions (B, L, out_dim)."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  out_dim: int
  remat: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array, ids_restore: jax.Array) -> jax.Array:
    b, num_patches = ids_restore.shape
    x = nn.Dense(self.width, name='embed', kernel_init=vit._logical(vit.XAVIER, (None, 'embed')),
                 bias_init=vit._logical(nn.initializers.zeros, ('embed',)))(tokens)
    mask_token = self.param('mask_token', vit._logical(vit.TOKEN_INIT, (None, None, 'embed')),
                            (1, 1, self.width))
    num_masked = num_patches + 1 - x.shape[1]
    # [visible..., mask tokens...] is in shuffled order; ids_restore puts it back in patch order.
    patch_tokens = jnp.concatenate(
        [x[:, 1:], jnp.broadcast_to(mask_token, (b, num_masked, self.width))], axis=1)
    patch_tokens = vit.gather_tokens(patch_tokens, ids_restore)
    side = int(round(num_patches ** 0.5))
    x = jnp.concatenate([x[:, :1], patch_tokens], axis=1) + vit.sincos_table(self.width, (side, side))
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    x = vit.Transformer(self.depth, self.num_heads, self.mlp_dim, prefix='decoder',
                        remat=self.remat, name='Transformer')(x)
    x = nn.Dense(self.out_dim, name='pred', kernel_init=vit._logical(vit.XAVIER, ('embed', None)),
                 bias_init=nn.initializers.zeros)(x)
    return x[:, 1:]  # the cls output is dropped


class MAE(nn.Module):
  spec: ModelSpec

  def setup(self):
    s = self.spec
    self.encoder = vit.Encoder(s.patch_size, s.width, s.depth, s.num_heads, s.mlp_dim, s.remat)
    self.decoder = Decoder(s.decoder_width, s.decoder_depth, s.decoder_heads, s.decoder_mlp_dim,
                           s.patch_dim, s.remat)

  def __call__(self, images: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """Normalized images (B,H,W,3) -> predictions (B, L, p*p*3) in patchify order."""
    return self.decoder(self.encoder(images, ids_keep), ids_restore)

  def encode(self, images: jax.Array, ids_keep=None) -> jax.Array:
    """Encoder tokens (B, 1+K, D) after the final norm; all patches when ids_keep is None."""
    return self.encoder(images, ids_keep)
