"""Targets and losses. Each term maps model outputs + batch to a scalar; the step sums terms."""
import jax
import jax.numpy as jnp

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


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean over masked patches (whole batch) of the per-patch MSE; also returns the (B, L) per-patch losses."""
  per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask), per_patch


def pixel_reconstruction_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, *,
                              patch_size: int, norm_pix: bool) -> tuple[jax.Array, jax.Array]:
  return masked_mse(pred, pixel_targets(images, patch_size, norm_pix), mask)
