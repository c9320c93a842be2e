"""ColorMAE (Hinojosa et al., ECCV 2024): masks from filtered white noise, highest values visible.

White noise W on a periodic field a little larger than the patch grid is filtered in the Fourier
domain by Gaussians G(s) = exp(-2 pi^2 s^2 |f|^2) (s in patches, f in cycles per patch):

  white   W                                   every frequency (MAE's random masking)
  red     G(sigma_low) W                      low-pass: large blobs
  blue    W - G(sigma_high) W                 high-pass: evenly spread, close to a grid
  green   (G(sigma_high) - G(sigma_low)) W    band-pass (difference of Gaussians): mid-size clusters
  purple  W - green                           band-stop: blobs and fine grain together

Red + green + blue = W: the two sigmas split the spectrum into three bands, so green needs
sigma_high < sigma_low. Every sample gets its own noise at every step, then a random crop of the
grid and random vertical / horizontal flips; score = -noise, so the highest values stay visible.

Bank mode (`bank_path`): precomputed patterns as in ColorMAE's released files, an .npz holding a
float array (N, H, W) with H, W >= the grid (`bank_key`; '' = the file's first array, np.savez's
`arr_0`). Each sample draws its own pattern, crop offset and flips (the official code crops and
flips the whole batch at one offset). With a schedule, put `{color}` in the path: a file per color.

`color` is one color or a schedule by train step, 'green:0,blue:5000' (color:first_step entries,
the first at step 0), as the official epoch-keyed schedule. The step is traced and every scheduled
color is a row of one constant table, so switching colors never recompiles.
"""
import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim.masks import key

if TYPE_CHECKING:
  from mim.masking import MaskContext

COLORS = ('white', 'red', 'blue', 'green', 'purple')

DEFAULTS = dict(
    color='green',      # one of COLORS, or a schedule by step 'green:0,blue:5000'
    sigma_low=2.0,      # patches; the low band edge: red = G(sigma_low) W
    sigma_high=1.0,     # patches; the high band edge: blue = W - G(sigma_high) W
    field_size=0,       # side of the generated noise field; 0 = grid + 4 sigma (wrap uncorrelated)
    bank_path='',       # .npz of precomputed (N, H, W) patterns instead of generated noise
    bank_key='',        # its array; '' = the first one
)


def parse_schedule(color: str) -> list[tuple[int, str]]:
  """'green' -> [(0, 'green')]; 'green:0,blue:5000' -> [(0, 'green'), (5000, 'blue')]."""
  where = f"masking.colored_noise.color={color!r}"
  parts = color.split(',')
  entries = []
  for part in parts:
    name, colon, start = part.strip().partition(':')
    if name not in COLORS:
      raise ValueError(f'{where}: {name!r} is not a noise color; choose from {", ".join(COLORS)} '
                       "or give a schedule by step such as 'green:0,blue:5000'.")
    if (len(parts) > 1 and not colon) or (colon and not start.isdigit()):
      raise ValueError(f"{where}: each schedule entry is color:first_step, e.g. "
                       "'green:0,blue:5000'.")
    entries.append((int(start or 0), name))
  starts = [s for s, _ in entries]
  if starts[0] != 0 or any(a >= b for a, b in zip(starts, starts[1:])):
    raise ValueError(f'{where}: the schedule must start at step 0 with increasing steps.')
  return entries


def _colors(schedule: list[tuple[int, str]]) -> list[str]:
  return list(dict.fromkeys(c for _, c in schedule))


def transfer(color: str, sigma_low: float, sigma_high: float, shape: tuple[int, int]) -> np.ndarray:
  """The color's filter on the rfft2 frequencies of a `shape` field, (H, W // 2 + 1)."""
  fy, fx = np.fft.fftfreq(shape[0]), np.fft.rfftfreq(shape[1])
  f2 = fy[:, None] ** 2 + fx[None, :] ** 2
  low, high = (np.exp(-2 * np.pi ** 2 * s ** 2 * f2) for s in (sigma_low, sigma_high))
  green = high - low
  return {'white': np.ones_like(f2), 'red': low, 'blue': 1 - high, 'green': green,
          'purple': 1 - green}[color]


def field_shape(params: ml_collections.ConfigDict, grid: tuple[int, int]) -> tuple[int, int]:
  if params.field_size:
    return (params.field_size,) * 2
  # The field is periodic: 4 sigma between a crop's edge and its wrapped copy decorrelates them.
  margin = math.ceil(4 * max(params.sigma_low, params.sigma_high))
  return grid[0] + margin, grid[1] + margin


@functools.lru_cache(maxsize=8)
def load_bank(path: str, array_key: str) -> np.ndarray:
  """The (N, H, W) float32 patterns of `path`; ValueError naming the config key otherwise."""
  where = f'masking.colored_noise.bank_path={path!r}'
  try:
    f = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise ValueError(f'{where}: no such file (ColorMAE pattern banks are .npz files).') from None
  except (OSError, ValueError) as e:
    raise ValueError(f'{where} is not a readable .npz of patterns: {e}') from None
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise ValueError(f'{where} is a single array, not an .npz of patterns.')
  with f:
    names = list(f.files)
    if not names or (array_key and array_key not in names):
      raise ValueError(f'masking.colored_noise.bank_key={array_key!r} is not in {path} '
                       f'(it has {names}).')
    patterns = np.asarray(f[array_key or names[0]], np.float32)
  if patterns.ndim != 3 or not patterns.size:
    raise ValueError(f'{where}: the patterns must be a stack of 2-D patterns (N, H, W); got shape '
                     f'{patterns.shape}.')
  return patterns


def stacked_banks(params: ml_collections.ConfigDict, colors: list[str], grid: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All banks of the schedule's colors in one array (N, H, W), and each color's (first, count)."""
  paths = [params.bank_path.format(color=c) for c in colors]
  if len(colors) > 1 and len(set(paths)) == 1:
    raise ValueError(f'{key("colored_noise", "color", params)} schedules several colors but '
                     f'{key("colored_noise", "bank_path", params)} is one file; put {{color}} in '
                     'the path (one bank per color).')
  banks = [load_bank(p, params.bank_key) for p in dict.fromkeys(paths)]
  for path, bank in zip(dict.fromkeys(paths), banks):
    if bank.shape[1] < grid[0] or bank.shape[2] < grid[1] or bank.shape[1:] != banks[0].shape[1:]:
      raise ValueError(f'masking.colored_noise.bank_path={path!r}: patterns {bank.shape[1:]} must '
                       f'be at least the {grid[0]}x{grid[1]} patch grid, and all banks one size.')
  counts = np.asarray([b.shape[0] for b in banks])
  return np.concatenate(banks), np.cumsum(counts) - counts, counts


def crop_and_flip(rng: jax.Array, sources: jax.Array, index: jax.Array, grid: tuple[int, int]
                  ) -> jax.Array:
  """(B, *grid): a window of sources[index[b]] at its own random offset, randomly flipped."""
  b = index.shape[0]
  _, h, w = sources.shape
  k_top, k_left, k_flip = jax.random.split(rng, 3)
  top = jax.random.randint(k_top, (b,), 0, h - grid[0] + 1)
  left = jax.random.randint(k_left, (b,), 0, w - grid[1] + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (b, 2))

  def window(i, y, x, flip):
    win = jax.lax.dynamic_slice(sources, (i, y, x), (1, *grid))[0]
    win = jnp.where(flip[0], win[::-1], win)
    return jnp.where(flip[1], win[:, ::-1], win)

  return jax.vmap(window)(index, top, left, flips)


def scores(rng: jax.Array, ctx: 'MaskContext', params: ml_collections.ConfigDict) -> jax.Array:
  schedule = parse_schedule(params.color)
  colors = _colors(schedule)
  starts = jnp.asarray([s for s, _ in schedule])
  row = jnp.asarray([colors.index(c) for _, c in schedule])[jnp.sum(ctx.step >= starts) - 1]
  k_noise, k_pick, k_crop = jax.random.split(rng, 3)
  b = ctx.batch_size
  if params.bank_path:
    patterns, first, count = map(jnp.asarray, stacked_banks(params, colors, ctx.grid))
    index = first[row] + jax.random.randint(k_pick, (b,), 0, count[row])
  else:
    shape = field_shape(params, ctx.grid)
    tables = jnp.asarray(np.stack([transfer(c, params.sigma_low, params.sigma_high, shape)
                                   for c in colors]), jnp.float32)
    white = jax.random.normal(k_noise, (b, *shape))
    patterns = jnp.fft.irfft2(jnp.fft.rfft2(white) * tables[row], s=shape)
    index = jnp.arange(b)
  return -crop_and_flip(k_crop, patterns, index, ctx.grid).reshape(b, -1)


def check(params: ml_collections.ConfigDict, grid: tuple[int, int], num_keep: int) -> None:
  del num_keep
  colors = _colors(parse_schedule(params.color))
  if params.bank_path:
    stacked_banks(params, colors, grid)
    return
  for name in ('sigma_low', 'sigma_high'):
    if not params[name] >= 0:
      raise ValueError(f'{key("colored_noise", name, params)} must be >= 0 (a Gaussian sigma, '
                       'in patches).')
  if {'green', 'purple'} & set(colors) and not params.sigma_high < params.sigma_low:
    raise ValueError(f'{key("colored_noise", "sigma_high", params)} must be smaller than '
                     f'{key("colored_noise", "sigma_low", params)}: green and purple noise are '
                     'the band between the two (empty otherwise).')
  if 'blue' in colors and params.sigma_high == 0:
    raise ValueError(f'{key("colored_noise", "sigma_high", params)} must be > 0 for blue noise '
                     '(W - G(0) W is zero).')
  if params.field_size < 0 or 0 < params.field_size < max(grid):
    raise ValueError(f'{key("colored_noise", "field_size", params)} must be 0 (auto) or at least '
                     f'the grid side {max(grid)}.')
