"""Masked autoencoder: ViT encoder on visible patches + a light transformer decoder + heads.

The decoder's parameters live under `decoder/`: embed (Dense D->Dd), mask_token (1,1,Dd),
Transformer/decoderblock_{i}/..., Transformer/decoder_norm, pred (Dense Dd->p*p*3).
The forward pass follows the official `models_mae.py` (methods.md §1.5).

Optional heads, each a top-level parameter group (so the MAE part keeps its interop names):
- `loss_predictor/` (HPM, methods.md §3.1): a second decoder stack of the decoder's shape on the
  same input tokens (decoder embed, mask token and positions shared), whose p*p*3 outputs are
  averaged to one predicted loss per patch;
- `feature_head/` (EMA feature targets, §4.1-4.2): Dense Dd->D on the decoder's output tokens.
The model returns named outputs: {'pixels', 'loss_pred' (HPM), 'features' (feature head)}.
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
class DistillHeadSpec:
  """The student's side of distillation (config `distill.*`, resolved): which features, which
  heads, predicting `outputs` teacher layers of width `width`."""
  source: str                # 'encoder': block outputs on the visible tokens | 'decoder': its output
  taps: tuple[int, ...]      # encoder block indices (non-negative), for source='encoder'
  final_norm: bool           # the last block's output after the encoder's final LayerNorm
  outputs: int               # teacher layers predicted (T)
  width: int                 # the teacher's width
  head: str                  # 'linear' | 'mlp'
  hidden: int                # mlp hidden width
  align: str                 # 'direct' | 'dynamic' (MaskAlign's learnable layer weights)


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
  loss_predictor: bool = False   # HPM's second decoder (per-patch loss predictions)
  feature_head: bool = False     # a head regressing teacher features (width D) from the decoder
  dtype: str = 'float32'         # compute dtype ('bfloat16': mixed precision, fp32 params)
  decoder: bool = True           # False: an encoder only, no pixel output (MaskAlign)
  distill: DistillHeadSpec | None = None   # heads predicting a frozen teacher's features

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
      remat=model_cfg.remat, loss_predictor=model_cfg.loss_predictor,
      feature_head=model_cfg.feature_head, dtype=resolve_dtype(model_cfg.dtype),
      decoder=model_cfg.decoder)


def block_indices(layers, depth: int) -> tuple[int, ...]:
  """Block indices as given in a config (0-based, negative from the end) -> non-negative."""
  return tuple(i % depth if -depth <= i < depth else i for i in layers)


def spec_for_run(cfg) -> ModelSpec:
  """The student's spec for a full config: `model.*` plus the distillation heads (the frozen
  teacher's width from `teacher.model.*`) when targets.distill_weight > 0."""
  spec = spec_from_config(cfg.model)
  if not cfg.targets.distill_weight:
    return spec
  d = cfg.distill
  teacher_width = cfg.teacher.model.width or VARIANTS.get(cfg.teacher.model.variant, (0,))[0]
  return dataclasses.replace(spec, distill=DistillHeadSpec(
      source=d.student, taps=block_indices(d.student_layers, spec.depth) if d.student == 'encoder'
      else (), final_norm=d.final_norm, outputs=len(d.teacher_layers), width=teacher_width,
      head=d.head, hidden=d.head_hidden or teacher_width, align=d.align))


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


COMPUTE_DTYPES = ('float32', 'bfloat16', 'auto')


def resolve_dtype(dtype: str) -> str:
  """A compute dtype of COMPUTE_DTYPES as a dtype name: 'auto' is bfloat16 on GPU and TPU (MAE
  trains in mixed precision there) and float32 on CPU, where bf16 dots are no faster."""
  if dtype != 'auto':
    return dtype
  return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'


def cast_for_compute(params, images: jax.Array, dtype: str):
  """(params, images) in the compute dtype (`resolve_dtype`). Mixed precision: the float32
  params stay the optimizer's master copy; gradients flow back through the cast in float32.
  Softmax and layer norm statistics run in float32 inside the model, the loss outside it."""
  dtype = resolve_dtype(dtype)
  if dtype == 'float32':
    return params, images
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, params), images.astype(dtype)


def _dense(features: int, name=None, out_axis=None):
  """A Dense with the MAE init (xavier, zero bias) from an `embed`-sharded input."""
  return nn.Dense(features, name=name, kernel_init=vit._logical(vit.XAVIER, ('embed', out_axis)),
                  bias_init=nn.initializers.zeros)


class Decoder(nn.Module):
  """`tokens`: encoder tokens (B, 1+K, D) + ids_restore (B, L) -> decoder input (B, 1+L, Dd), in
  patch order with mask tokens and positions; `__call__`: that input -> (output tokens after the
  final norm (B, 1+L, Dd), per-patch pixel predictions (B, L, out_dim))."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  out_dim: int
  remat: bool = False

  def setup(self):
    self.embed = nn.Dense(self.width, kernel_init=vit._logical(vit.XAVIER, (None, 'embed')),
                          bias_init=vit._logical(nn.initializers.zeros, ('embed',)))
    self.mask_token = self.param('mask_token',
                                 vit._logical(vit.TOKEN_INIT, (None, None, 'embed')),
                                 (1, 1, self.width))
    self.Transformer = vit.Transformer(self.depth, self.num_heads, self.mlp_dim, prefix='decoder',
                                       remat=self.remat)
    self.pred = _dense(self.out_dim)

  def tokens(self, tokens: jax.Array, ids_restore: jax.Array) -> jax.Array:
    b, num_patches = ids_restore.shape
    x = self.embed(tokens)
    num_masked = num_patches + 1 - x.shape[1]
    # [visible..., mask tokens...] is in shuffled order; ids_restore puts it back in patch order.
    patch_tokens = jnp.concatenate(
        [x[:, 1:], jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, num_masked, self.width))], axis=1)
    patch_tokens = vit.gather_tokens(patch_tokens, ids_restore)
    side = int(round(num_patches ** 0.5))
    pos = jnp.asarray(vit.sincos_table(self.width, (side, side)), x.dtype)
    x = jnp.concatenate([x[:, :1], patch_tokens], axis=1) + pos
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    hidden = self.Transformer(x)
    return hidden, self.pred(hidden)[:, 1:]  # the cls output is dropped


class LossPredictor(nn.Module):
  """HPM's loss predictor: decoder input (B, 1+L, Dd) -> a predicted loss per patch (B, L)."""
  depth: int
  num_heads: int
  mlp_dim: int
  out_dim: int
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = vit.Transformer(self.depth, self.num_heads, self.mlp_dim, prefix='decoder',
                        remat=self.remat, name='Transformer')(x)
    return _dense(self.out_dim, 'pred')(x)[:, 1:].mean(axis=-1)


class DistillHead(nn.Module):
  """Student features [(B, N, D_s)] -> (B, T, N, D_t) predictions of T teacher layers: one
  linear or MLP head per teacher layer, on the matching student layer ('direct'; one student
  layer feeds every head), or on a learnable mix of all student layers ('dynamic': MaskAlign's
  Dynamic Alignment, weights W (T, S) initialized to 0.01 + 1 where teacher layer t meets the
  student layer as deep (the last T of S), no softmax, no weight decay)."""
  spec: DistillHeadSpec

  @nn.compact
  def __call__(self, features: list[jax.Array]) -> jax.Array:
    s, num = self.spec, len(features)
    if s.align == 'dynamic':
      init = lambda key, shape, dtype=jnp.float32: 0.01 + jnp.eye(shape[0], shape[1], shape[1] - shape[0],
                                                                   dtype=dtype)
      w = self.param('align_weights', vit._logical(init, (None, None)), (s.outputs, num))
      stacked = jnp.stack(features)
      inputs = [jnp.einsum('s,sbnd->bnd', w[t].astype(stacked.dtype), stacked)
                for t in range(s.outputs)]
    else:
      inputs = features if num == s.outputs else features * s.outputs
    preds = []
    for t, x in enumerate(inputs):
      if s.head == 'mlp':
        x = vit.gelu(_dense(s.hidden, f'head_{t}_hidden', 'mlp')(x))
        x = nn.Dense(s.width, name=f'head_{t}', bias_init=nn.initializers.zeros,
                     kernel_init=vit._logical(vit.XAVIER, ('mlp', None)))(x)
      else:
        x = _dense(s.width, f'head_{t}')(x)
      preds.append(x)
    return jnp.stack(preds, axis=1)


class MAE(nn.Module):
  spec: ModelSpec

  def setup(self):
    s = self.spec
    self.encoder = vit.Encoder(s.patch_size, s.width, s.depth, s.num_heads, s.mlp_dim, s.remat)
    if s.decoder:
      self.decoder = Decoder(s.decoder_width, s.decoder_depth, s.decoder_heads, s.decoder_mlp_dim,
                             s.patch_dim, s.remat)
    if s.distill:
      self.distill_head = DistillHead(s.distill)
    if s.loss_predictor:
      self.loss_predictor = LossPredictor(s.decoder_depth, s.decoder_heads, s.decoder_mlp_dim,
                                          s.patch_dim, s.remat)
    if s.feature_head:
      self.feature_head = _dense(s.width)

  def __call__(self, images: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array
               ) -> dict[str, jax.Array]:
    """Normalized images (B,H,W,3) -> {'pixels': (B, L, p*p*3) in patchify order (with the
    decoder), and with the heads 'loss_pred' (B, L), 'features' (B, L, D), 'distill' (B, T, N,
    D_t) on the visible (N = K) or all (N = L) patches}."""
    s = self.spec
    taps = s.distill.taps if s.distill and s.distill.source == 'encoder' else ()
    tokens = self.encoder(images, ids_keep, taps, s.distill.final_norm if s.distill else True)
    tokens, tapped = tokens if taps else (tokens, [])
    out = {}
    if taps:
      out['distill'] = self.distill_head([t[:, 1:] for t in tapped])
    if not s.decoder:
      return out
    x = self.decoder.tokens(tokens, ids_restore)
    hidden, out['pixels'] = self.decoder(x)
    if s.loss_predictor:
      out['loss_pred'] = self.loss_predictor(x)
    if s.feature_head:
      out['features'] = self.feature_head(hidden[:, 1:])
    if s.distill and s.distill.source == 'decoder':
      out['distill'] = self.distill_head([hidden[:, 1:]])
    return out

  def encode(self, images: jax.Array, ids_keep=None) -> jax.Array:
    """Encoder tokens (B, 1+K, D) after the final norm; all patches when ids_keep is None."""
    return self.encoder(images, ids_keep)

  def predict_loss(self, tokens: jax.Array) -> jax.Array:
    """The loss predictor on encoder tokens of all patches (B, 1+L, D) -> (B, L); HPM's teacher
    pass (the reconstructor is skipped)."""
    b, n = tokens.shape[0], tokens.shape[1] - 1
    ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    return self.loss_predictor(self.decoder.tokens(tokens, ids))
