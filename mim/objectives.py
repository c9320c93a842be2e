"""Targets and losses: norm-pix MSE, HPM's loss ranking, EMA-teacher feature regression,
frozen-teacher distillation (with DTM's token morphing)."""
import jax
import jax.numpy as jnp

from mim import morphing
from mim import patches as patches_lib

NORM_PIX_EPS = 1e-6


def pixel_targets(images: jax.Array, patch_size: int, norm_pix: bool) -> jax.Array:
  """Patchified images (B, L, p*p*3); with norm_pix each patch is standardized by its own mean
  and unbiased variance (torch `.var()`), eps inside the sqrt, as in the official MAE loss."""
  target = patches_lib.patchify(images, patch_size)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
  return target


def pixel_reconstruction_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, *,
                              patch_size: int, norm_pix: bool) -> tuple[jax.Array, jax.Array]:
  """Mean over masked patches (whole batch) of the per-patch MSE; also the (B, L) per-patch losses."""
  num, den, per_patch = pixel_term(pred, images, mask, patch_size=patch_size, norm_pix=norm_pix)
  return num / den, per_patch


# ---------------------------------------------------------------------- composable terms
# Each term is (numerator, denominator); the loss is sum_t weight_t * num_t / den_t. Logged
# values and gradient accumulation add numerators and denominators over micro-batches.
FEATURE_LN_EPS = 1e-5   # torch F.layer_norm's default, as data2vec's targets use


def layer_norm_noaffine(x: jax.Array, eps: float = FEATURE_LN_EPS) -> jax.Array:
  mean = x.mean(axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(axis=-1, keepdims=True) + eps)


def feature_targets(block_outputs: list[jax.Array]) -> jax.Array:
  """data2vec targets (methods.md §4.1): the mean over the teacher's top-K blocks of their
  parameter-free-LayerNorm'd outputs (B, L, D), LayerNorm'd again."""
  return layer_norm_noaffine(sum(layer_norm_noaffine(b) for b in block_outputs) / len(block_outputs))


def pixel_term(pred: jax.Array, images: jax.Array, mask: jax.Array, *, patch_size: int,
               norm_pix: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum over masked patches of the per-patch MSE, masked count, per-patch losses (B, L))."""
  per_patch = jnp.mean(jnp.square(pred - pixel_targets(images, patch_size, norm_pix)), axis=-1)
  return jnp.sum(per_patch * mask), jnp.sum(mask), per_patch


def feature_term(pred: jax.Array, target: jax.Array, mask: jax.Array, *, kind: str,
                 beta: float) -> tuple[jax.Array, jax.Array]:
  """Smooth-L1 (torch's, with `beta`) or MSE per element, averaged over channels per patch,
  summed over masked patches; and the masked count."""
  return jnp.sum(token_losses(pred, target, kind, beta) * mask), jnp.sum(mask)


def loss_rank_term(pred: jax.Array, losses: jax.Array, mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """HPM's relative loss (methods.md §3.2): binary cross-entropy on the order of every ordered
  pair (i, j) of masked patches of an image, target [l_j > l_i], logit s_j - s_i; pairs with
  equal losses (i = j included) are left out. Returns (sum over pairs, number of pairs)."""
  losses = jax.lax.stop_gradient(losses)
  pair = mask[:, :, None] * mask[:, None, :]
  pos = (losses[:, None, :] > losses[:, :, None]) * pair
  neg = (losses[:, None, :] < losses[:, :, None]) * pair
  p = jax.nn.sigmoid(pred[:, None, :] - pred[:, :, None])
  num = -jnp.sum(pos * jnp.log(p + 1e-6) + neg * jnp.log(1 - p + 1e-6))
  return num, jnp.sum(pos + neg)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # torch F.normalize


def normalize_targets(feats: jax.Array, how: str) -> jax.Array:
  """The teacher's features before the distillation loss (`distill.normalize`)."""
  if how == 'target_layer_norm':
    return layer_norm_noaffine(feats)
  return _l2_normalize(feats) if how == 'l2' else feats


def token_losses(pred: jax.Array, target: jax.Array, kind: str, beta: float) -> jax.Array:
  """Per-token loss (the channel mean of smooth-L1 / MSE / L1, or 1 - cosine) over the last axis."""
  if kind == 'cosine':
    return 1 - jnp.sum(_l2_normalize(pred) * _l2_normalize(target), axis=-1)
  d = pred - target
  if kind == 'smooth_l1':
    per_element = jnp.where(jnp.abs(d) < beta, 0.5 * jnp.square(d) / beta, jnp.abs(d) - 0.5 * beta)
  else:
    per_element = jnp.square(d) if kind == 'mse' else jnp.abs(d)
  return per_element.mean(axis=-1)


def distill_term(distill_cfg, pred: jax.Array, targets: jax.Array, ids_keep: jax.Array,
                 mask: jax.Array, groups: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Student predictions (B, T, N, D) against the teacher's (B, T, L, D) on the same patches:
  the visible ones (N = K, gathered by ids_keep), all, or only the masked ones (weighted by
  `mask`). With DTM's groups (B, branches, L) both sides are first aggregated to their group
  means, per branch. -> (sum of per-token losses, tokens x layers x branches)."""
  d = distill_cfg
  if d.tokens == 'visible':
    targets = jnp.take_along_axis(targets, ids_keep[:, None, :, None], axis=2)
    weight = jnp.ones(ids_keep.shape, pred.dtype)
  else:
    weight = mask if d.tokens == 'masked' else jnp.ones(mask.shape, pred.dtype)
  if d.normalize == 'l2':
    pred = _l2_normalize(pred)
  pairs = [(pred, targets)] if groups is None else [
      (morphing.aggregate(pred, g), morphing.aggregate(targets, g))
      for g in jnp.moveaxis(groups, 1, 0)]
  num = sum(jnp.sum(token_losses(p, t, d.loss, d.beta) * weight[:, None]) for p, t in pairs)
  return num, jnp.sum(weight) * pred.shape[1] * len(pairs)


def terms(cfg, outputs: dict, images: jax.Array, mask, signals: dict, *, patch_size: int
          ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{name: (numerator, denominator)} of every term with a positive weight; `mask` is the
  step's masking.Mask."""
  targets_cfg, out = cfg.targets, {}
  if 'pixels' in outputs:
    num, den, per_patch = pixel_term(outputs['pixels'], images, mask.mask, patch_size=patch_size,
                                     norm_pix=targets_cfg.norm_pix)
    out['pixel'] = (num, den)
  if targets_cfg.loss_pred_weight > 0:
    out['loss_pred'] = loss_rank_term(outputs['loss_pred'], per_patch, mask.mask)
  if targets_cfg.feature_weight > 0:
    out['feature'] = feature_term(outputs['features'], signals['feature_targets'], mask.mask,
                                  kind=targets_cfg.feature_loss, beta=targets_cfg.feature_beta)
  if targets_cfg.distill_weight > 0:
    out['distill'] = distill_term(cfg.distill, outputs['distill'], signals['distill_targets'],
                                  mask.ids_keep, mask.mask, signals.get('morph_groups'))
  return out


def term_weights(targets_cfg, step: jax.Array, steps_per_epoch: int) -> dict[str, jax.Array]:
  """Each term's weight at `step`; the feature weight ramps up as BootMAE's,
  weight * min((epoch + 1) / feature_ramp_epochs, 1)."""
  feature = jnp.asarray(targets_cfg.feature_weight, jnp.float32)
  if targets_cfg.feature_ramp_epochs > 0:
    epoch = jnp.floor(jnp.asarray(step, jnp.float32) / steps_per_epoch)
    feature = feature * jnp.minimum((epoch + 1) / targets_cfg.feature_ramp_epochs, 1.0)
  return {'pixel': jnp.asarray(targets_cfg.pixel_weight, jnp.float32),
          'loss_pred': jnp.asarray(targets_cfg.loss_pred_weight, jnp.float32), 'feature': feature,
          'distill': jnp.asarray(targets_cfg.distill_weight, jnp.float32)}


def total(term_values: dict, weights: dict) -> jax.Array:
  return sum(weights[k] * num / jnp.maximum(den, 1) for k, (num, den) in term_values.items())
