"""The fine-tuning classifier (MAE models_vit.py with global_pool): the ViT encoder without its
final norm -> mean of the patch tokens (cls excluded) -> fc_norm (LayerNorm) -> linear head.

Parameters: encoder/{embedding, cls, Transformer/encoderblock_i} (the pretrained encoder's names,
so `init_from` fills them as they are), fc_norm/{scale, bias}, head/{kernel (D, C), bias (C,)}.
Drop path runs when the model is applied with a 'dropout' rng (the train step), not in eval.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mim.models import mae
from mim.models import vit


class Classifier(nn.Module):
  spec: mae.ModelSpec
  num_classes: int
  drop_path: float = 0.0
  head_init_std: float = 2e-5

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Normalized images (B, H, W, 3) -> logits (B, num_classes)."""
    s = self.spec
    tokens = vit.Encoder(s.patch_size, s.width, s.depth, s.num_heads, s.mlp_dim, s.remat,
                         drop_path=self.drop_path, final_norm=False, name='encoder')(images)
    pooled = tokens[:, 1:].mean(axis=1)  # global average pool, the cls token left out
    x = vit._layer_norm(name='fc_norm')(pooled)  # pylint: disable=protected-access
    # timm's trunc_normal_(std=2e-5) cuts at +-2 absolute, i.e. not at all: a plain normal here.
    head_init = nn.initializers.normal(self.head_init_std)
    return nn.Dense(self.num_classes, name='head',
                    kernel_init=nn.with_logical_partitioning(head_init, ('embed', None)),
                    bias_init=nn.initializers.zeros)(x)


def example_images(spec: mae.ModelSpec, batch: int = 1) -> jax.Array:
  return jnp.zeros((batch, spec.image_size, spec.image_size, 3), jnp.float32)
