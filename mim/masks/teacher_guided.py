"""Teacher-guided strategies: HPM's easy-to-hard mask and AttMask (methods.md §3.3, §4.4).

Both read a signal of the step's teacher pass (mim/teacher.py) from `ctx.signals`:
- `hard_patches` ('predicted_loss', (B, L)): the floor(alpha_t * masked) patches with the highest
  predicted loss are masked, the rest of the masked set is uniformly random among the others;
  alpha_t rises linearly from alpha_start to alpha_end over training (by step), or with
  `per_epoch` as the official alpha_t = alpha_end * (epoch + 1) / epochs.
- `attention` ('cls_attention', (B, L), the teacher's last-layer cls attention averaged over
  heads): `high` masks the most attended patches, `low` the least attended, `hints` masks as
  `high` and then reveals a few patches drawn uniformly from the top 10% most attended.
  Departures from AttMask (iBOT): the masked count is the config's exact ratio for every sample
  (AttMask samples a ratio per batch and leaves half the images unmasked).
"""
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections

from mim.masks import key

if TYPE_CHECKING:
  from mim.masking import MaskContext

HARD_PATCHES_DEFAULTS = dict(
    alpha_start=0.0,    # fraction of the masked patches chosen as the hardest, at step 0
    alpha_end=0.5,      # ... at the end of training
    per_epoch=False,    # the official per-epoch form alpha_end * (epoch + 1) / epochs
)
ATTENTION_DEFAULTS = dict(
    mode='high',        # 'high' | 'low' | 'hints'
    show_max=0.1,       # hints: reveal from the show_max most attended fraction of the patches
)
HINT_POOL = 0.1       # AttMask's hints come from the top 10% most attended patches


def _ranks_descending(values: jax.Array) -> jax.Array:
  """(B, L) rank of each value in its row, 0 = the largest."""
  return jnp.argsort(jnp.argsort(-values, axis=1), axis=1)


def alpha(ctx: 'MaskContext', params: ml_collections.ConfigDict) -> jax.Array:
  step = jnp.asarray(ctx.step, jnp.float32)
  if params.per_epoch:
    epochs = max(ctx.total_steps // ctx.steps_per_epoch, 1)
    progress = (jnp.floor(step / ctx.steps_per_epoch) + 1) / epochs
  else:
    progress = step / max(ctx.total_steps, 1)
  progress = jnp.clip(progress, 0.0, 1.0)
  return params.alpha_start + (params.alpha_end - params.alpha_start) * progress


def hard_patches_scores(rng: jax.Array, ctx: 'MaskContext', params: ml_collections.ConfigDict
                        ) -> jax.Array:
  num_masked = ctx.num_patches - ctx.num_keep
  num_hard = jnp.floor(num_masked * alpha(ctx, params)).astype(jnp.int32)
  hard = _ranks_descending(ctx.signals['predicted_loss']) < num_hard
  # Random scores in [0, 1); the hard patches score 2 and so are always masked.
  return jnp.where(hard, 2.0, jax.random.uniform(rng, (ctx.batch_size, ctx.num_patches)))


def attention_scores(rng: jax.Array, ctx: 'MaskContext', params: ml_collections.ConfigDict
                     ) -> jax.Array:
  attention = ctx.signals['cls_attention']
  ranks = _ranks_descending(attention).astype(jnp.float32)
  if params.mode == 'low':
    return ranks     # the least attended score highest: masked
  scores = ctx.num_patches - ranks   # the most attended score highest
  if params.mode == 'hints':
    num_masked = ctx.num_patches - ctx.num_keep
    pool = max(int(HINT_POOL * ctx.num_patches), 1)
    num_show = int(params.show_max * num_masked)
    # num_show of the `pool` most attended, uniformly: the lowest scores, so visible.
    pick = jax.random.uniform(rng, ranks.shape) + jnp.where(ranks < pool, 0.0, 2.0)
    shown = _ranks_descending(-pick) < num_show
    scores = jnp.where(shown, -1.0, scores)
  return scores


def hard_patches_check(params: ml_collections.ConfigDict, grid, num_keep: int) -> None:
  del grid, num_keep
  for name in ('alpha_start', 'alpha_end'):
    if not 0.0 <= params[name] <= 1.0:
      raise ValueError(f'{key("hard_patches", name, params)} must be in [0, 1].')


def attention_check(params: ml_collections.ConfigDict, grid, num_keep: int) -> None:
  del grid, num_keep
  if params.mode not in ('high', 'low', 'hints'):
    raise ValueError(f"{key('attention', 'mode', params)} must be 'high', 'low' or 'hints'.")
  if not 0.0 <= params.show_max <= HINT_POOL:
    raise ValueError(f'{key("attention", "show_max", params)} must be in [0, {HINT_POOL}] (the '
                     'revealed patches come from the top 10% most attended).')
