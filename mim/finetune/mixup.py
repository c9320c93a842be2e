"""Mixup / CutMix with label smoothing, as timm's Mixup in 'batch' mode (the MAE fine-tuning recipe:
mixup alpha 0.8, cutmix alpha 1.0, probability 1, switch probability 0.5, smoothing 0.1).

One lam for the whole batch, which is mixed with itself reversed. Mixup blends images with lam
~ Beta(0.8, 0.8); CutMix pastes a box of side sqrt(1 - lam) (lam ~ Beta(1, 1)) with a uniform
center, clipped to the image, and then sets lam to the unpasted fraction. The targets are
lam * smooth(y) + (1 - lam) * smooth(reversed y), smooth(y) = one_hot(y) * (1 - s) + s / C.
Runs inside a jitted step: everything is a function of the key.
"""
import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
  """(H, W) bool mask of the pasted box for a given lam (timm rand_bbox, no margin)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
  ky, kx = jax.random.split(key)
  cy, cx = jax.random.randint(ky, (), 0, height), jax.random.randint(kx, (), 0, width)
  def inside(size, center, cut):  # [center - cut // 2, center + cut // 2), clipped to the image
    coords = jnp.arange(size)
    return (coords >= jnp.clip(center - cut // 2, 0, size)) & (
        coords < jnp.clip(center + cut // 2, 0, size))

  return inside(height, cy, cut_h)[:, None] & inside(width, cx, cut_w)[None, :]


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
              mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
              smoothing: float = 0.1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mixed images (B, H, W, C), soft targets (B, num_classes), lam) for one batch."""
  k_switch, k_mix, k_cut, k_box = jax.random.split(key, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  flipped = images[::-1]
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  mixed = lam_mix * images + (1.0 - lam_mix) * flipped
  if cutmix_alpha > 0:
    box = cutmix_box(k_box, images.shape[1], images.shape[2],
                     jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha))
    pasted = jnp.where(box[None, :, :, None], flipped, images)
    lam_box = 1.0 - box.mean()
    mixed = jnp.where(use_cutmix, pasted, mixed)
    lam = jnp.where(use_cutmix, lam_box, lam_mix)
  else:
    lam = jnp.asarray(lam_mix)
  targets = smooth_one_hot(labels, num_classes, smoothing)
  return mixed, lam * targets + (1.0 - lam) * targets[::-1], lam
