"""Radial sectors: R-MAE's angular masking (Tayebati et al. 2024, LiDAR) adapted to the 2-D grid.

Per sample: a center (the grid center, or uniform over the grid), S = `num_sectors` wedges of
360/S degrees around it with a random rotation, and a random rank per wedge. A patch scores
(rank of its wedge + U(0, 1)) / S + beta * radius / diagonal: with beta = 0 the visible patches
are the lowest-ranked wedges, whole, plus a random part of one more (the jitter makes the ratio
exact); beta > 0 prefers keeping patches near the center, beta < 0 the periphery (|beta| >= 1/S
starts to trade whole wedges for radius). Unlike R-MAE's released code the sectors are drawn per
sample around the sample's center, and the visible count is exact.
"""
import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from mim.masks import key

if TYPE_CHECKING:
  from mim.masking import MaskContext

DEFAULTS = dict(
    num_sectors=16,     # wedges of 360 / num_sectors degrees
    center='random',    # 'random' (uniform over the grid, per sample) | 'fixed' (the grid center)
    beta=0.0,           # radial term: > 0 keeps the center, < 0 the periphery
)


class Sectors(NamedTuple):
  sector: jax.Array   # (B, L) int32, the wedge of each patch
  radius: jax.Array   # (B, L) distance of each patch center to the sample's center, in patches
  center: jax.Array   # (B, 2) (row, col) in patches; patch (i, j) is centered at (i + .5, j + .5)
  phase: jax.Array    # (B,) rotation of the wedges, radians in [0, 2 pi / S)


def sectors(rng: jax.Array, batch_size: int, grid: tuple[int, int],
            params: ml_collections.ConfigDict) -> Sectors:
  rows, cols = grid
  n = params.num_sectors
  k_center, k_phase = jax.random.split(jax.random.fold_in(rng, 0))  # scores() uses fold_in 1
  size = jnp.asarray(grid, jnp.float32)
  if params.center == 'random':
    center = jax.random.uniform(k_center, (batch_size, 2)) * size
  else:
    center = jnp.broadcast_to(size / 2, (batch_size, 2))
  phase = jax.random.uniform(k_phase, (batch_size,), maxval=2 * math.pi / n)
  y, x = jnp.meshgrid(jnp.arange(rows) + 0.5, jnp.arange(cols) + 0.5, indexing='ij')
  dy = y.reshape(1, -1) - center[:, :1]
  dx = x.reshape(1, -1) - center[:, 1:]
  angle = jnp.mod(jnp.arctan2(dy, dx) - phase[:, None], 2 * math.pi)
  sector = jnp.minimum(jnp.floor(angle / (2 * math.pi / n)).astype(jnp.int32), n - 1)
  return Sectors(sector, jnp.hypot(dy, dx), center, phase)


def scores(rng: jax.Array, ctx: 'MaskContext', params: ml_collections.ConfigDict) -> jax.Array:
  """`sectors(rng, ...)` gives the wedges these scores rank (the tests read them)."""
  geo = sectors(rng, ctx.batch_size, ctx.grid, params)
  k_rank, k_jitter = jax.random.split(jax.random.fold_in(rng, 1))
  n = params.num_sectors
  rank = jnp.argsort(jax.random.uniform(k_rank, (ctx.batch_size, n)), axis=1)
  jitter = jax.random.uniform(k_jitter, geo.sector.shape)
  diagonal = math.hypot(*ctx.grid)
  return ((jnp.take_along_axis(rank, geo.sector, axis=1) + jitter) / n
          + params.beta * geo.radius / diagonal)


def check(params: ml_collections.ConfigDict, grid: tuple[int, int], num_keep: int) -> None:
  del grid, num_keep
  if params.num_sectors < 2:
    raise ValueError(f'{key("radial", "num_sectors", params)} must be >= 2 (one sector is '
                     'random masking).')
  if params.center not in ('random', 'fixed'):
    raise ValueError(f"{key('radial', 'center', params)} must be 'random' or 'fixed'.")
  if not math.isfinite(params.beta):
    raise ValueError(f'{key("radial", "beta", params)} must be a finite number.')
