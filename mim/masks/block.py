"""BEiT block-wise masking (Bao et al. 2022), on device with static shapes and an exact count.

BEiT's rejection sampler, per sample, until T = L - num_keep patches are masked: the budget is
min(T - count, max_patches); up to `attempts` tries draw an area s ~ U(min_patches, budget) and an
aspect a log-uniform in [min_aspect, 1 / min_aspect], h = round(sqrt(s a)), w = round(sqrt(s / a)),
strictly h < rows and w < cols, a uniform top-left corner; the first try that masks 0 < new <=
budget more patches is taken; when no try does, the sampler stops. On device the tries of a block
are drawn together (the first valid one is the one a sequential loop takes) and the blocks run in
a `lax.while_loop` of at most T iterations that ends when every sample is done.

Two deliberate differences: a try whose rounded h * w is below `min_patches` is rejected (BEiT's
rounding lets 14-patch blocks through at min 16), so every block has at least `min_patches`; and a
shortfall (the sampler stopped early, or T is not a sum of blocks) is filled with patches drawn
uniformly among the unmasked ones, so exactly T are masked (never more: a block never exceeds the
budget). `sample_blocks` returns the mask before that fill, and the blocks.
"""
import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections

from mim.masks import key

if TYPE_CHECKING:
  from mim.masking import MaskContext

DEFAULTS = dict(
    min_patches=16,     # smallest block, in patches (BEiT: 16)
    max_patches=0,      # largest block; 0 = no limit but the masked count (BEiT's default)
    min_aspect=0.3,     # aspect h / w log-uniform in [min_aspect, 1 / min_aspect]
    attempts=10,        # tries per block before the sampler stops (BEiT: 10)
)


def sample_blocks(rng: jax.Array, batch_size: int, grid: tuple[int, int], num_masked: int,
                  params: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(mask (B, rows, cols) bool before the random fill, blocks (B, T, 4) int32 as (top, left, h,
  w), all zero after the last block), as `scores(rng, ...)` draws them."""
  return _sample_blocks(jax.random.fold_in(rng, 0), batch_size, tuple(grid), num_masked,
                        params.min_patches, params.max_patches or num_masked,
                        float(params.min_aspect), params.attempts)


# Jitted with static sizes so that eager callers (views, tests) compile the loop once per shape;
# inside the train step it is inlined.
@functools.partial(jax.jit, static_argnums=range(1, 8))
def _sample_blocks(rng, batch_size, grid, num_masked, min_patches, max_block, min_aspect, tries):
  rows, cols = grid
  log_aspect = math.log(min_aspect)
  row_ids, col_ids = jnp.arange(rows), jnp.arange(cols)
  # Every iteration's uniforms drawn up front (T * 4 * B * tries floats, 47k for BEiT at batch 8),
  # as one flat draw: XLA compiles a PRNG inside the loop body, or a 4-D draw, seconds slower.
  draws = jax.random.uniform(rng, (num_masked * 4 * batch_size * tries,)).reshape(
      num_masked, 4, batch_size, tries)

  def block(carry):
    i, mask, count, done, blocks = carry
    u = draws[i]                                          # area, aspect, top, left
    budget = jnp.minimum(num_masked - count, max_block)[:, None]            # (B, 1)
    area = min_patches + (budget - min_patches) * u[0]    # U(min, budget), either order as BEiT
    aspect = jnp.exp(log_aspect * (1 - 2 * u[1]))         # log-uniform in [a, 1/a]
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    top = jnp.floor(u[2] * (rows - h + 1)).astype(jnp.int32)
    left = jnp.floor(u[3] * (cols - w + 1)).astype(jnp.int32)
    inside = (((row_ids >= top[..., None]) & (row_ids < (top + h)[..., None]))[..., :, None]
              & ((col_ids >= left[..., None]) & (col_ids < (left + w)[..., None]))[..., None, :])
    new = jnp.sum(inside & ~mask[:, None], axis=(2, 3))                     # (B, tries)
    ok = ((h < rows) & (w < cols) & (h * w >= min_patches) & (new > 0) & (new <= budget)
          & ~done[:, None])
    first = jnp.argmax(ok, axis=1)
    take = jnp.any(ok, axis=1)
    pick = lambda x: jnp.take_along_axis(x, first[:, None], axis=1)[:, 0]
    chosen = jnp.take_along_axis(inside, first[:, None, None, None], axis=1)[:, 0]
    mask = mask | (chosen & take[:, None, None])
    count = count + jnp.where(take, pick(new), 0)
    rect = jnp.stack([pick(top), pick(left), pick(h), pick(w)], axis=-1) * take[:, None]
    blocks = jax.lax.dynamic_update_slice_in_dim(blocks, rect[:, None], i, axis=1)
    return i + 1, mask, count, done | ~take | (count >= num_masked), blocks

  init = (0, jnp.zeros((batch_size, rows, cols), bool), jnp.zeros(batch_size, jnp.int32),
          jnp.zeros(batch_size, bool), jnp.zeros((batch_size, num_masked, 4), jnp.int32))
  _, mask, _, _, blocks = jax.lax.while_loop(
      lambda c: (c[0] < num_masked) & ~jnp.all(c[3]), block, init)
  return mask, blocks


def scores(rng: jax.Array, ctx: 'MaskContext', params: ml_collections.ConfigDict) -> jax.Array:
  mask, _ = sample_blocks(rng, ctx.batch_size, ctx.grid, ctx.num_patches - ctx.num_keep,
                          params)
  # Block patches score >= 1, the rest U(0, 1): the num_keep visible ones are random non-block
  # patches and the remaining non-block ones fill the shortfall.
  fill = jax.random.uniform(jax.random.fold_in(rng, 1), (ctx.batch_size, ctx.num_patches))
  return mask.reshape(ctx.batch_size, -1) + fill


def check(params: ml_collections.ConfigDict, grid: tuple[int, int], num_keep: int) -> None:
  num_masked = grid[0] * grid[1] - num_keep
  largest = (grid[0] - 1) * (grid[1] - 1)
  if not 1 <= params.min_patches <= num_masked:
    raise ValueError(f'{key("block", "min_patches", params)} must be in [1, the masked count '
                     f'{num_masked}] ({grid[0]}x{grid[1]} grid, {num_keep} visible).')
  if params.min_patches > largest:
    raise ValueError(f'{key("block", "min_patches", params)}: no block fits strictly inside the '
                     f'{grid[0]}x{grid[1]} grid (at most {grid[0] - 1}x{grid[1] - 1} = '
                     f'{max(largest, 0)} patches).')
  if params.max_patches and params.max_patches < params.min_patches:
    raise ValueError(f'{key("block", "max_patches", params)} must be 0 (no limit) or >= '
                     f'masking.block.min_patches={params.min_patches}.')
  if not 0 < params.min_aspect <= 1:
    raise ValueError(f'{key("block", "min_aspect", params)} must be in (0, 1], e.g. 0.3.')
  if params.attempts < 1:
    raise ValueError(f'{key("block", "attempts", params)} must be >= 1.')
