"""One masking interface: a strategy scores every patch, `scores_to_mask` keeps the lowest.

A strategy is `score(rng, ctx, params) -> scores (B, L)` with lower score = more likely visible;
`ctx` (a `MaskContext`) holds the batch size, the patch grid, the visible count, the step (traced
under jit), the schedule length and the signals computed in the step (teacher outputs such as
HPM's predicted losses or AttMask's attention), and `params` is the strategy's own section of
`config.masking`. Every sample keeps exactly `num_keep` patches, so shapes stay static under jit.
Strategies register in STRATEGIES with their parameter defaults, the signals they need and a
check of their parameters, so configs are validated before anything compiles.
"""
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections

from mim.masks import block
from mim.masks import colored_noise
from mim.masks import radial
from mim.masks import teacher_guided


class Mask(NamedTuple):
  ids_keep: jax.Array     # (B, K) indices of visible patches, in shuffled order
  ids_restore: jax.Array  # (B, L) inverse permutation of the shuffle
  mask: jax.Array         # (B, L) float32, 1 = removed (masked), 0 = visible, in patch order


class MaskContext(NamedTuple):
  """What a strategy may look at besides its rng; `signals` maps names to (B, ...) arrays."""
  batch_size: int
  grid: tuple[int, int]       # (rows, cols) of patches; L = rows * cols, row-major
  num_keep: int               # visible patches per sample
  step: Any = 0               # the train step (an int32 array under jit)
  total_steps: int = 1
  signals: Mapping[str, jax.Array] = {}
  steps_per_epoch: int = 1

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]


Score = Callable[[jax.Array, MaskContext, ml_collections.ConfigDict], jax.Array]


@dataclasses.dataclass(frozen=True)
class Strategy:
  score: Score
  params: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config defaults
  needs: tuple[str, ...] = ()   # signals the step must compute before masking
  # (params, grid, num_keep) -> None; raises ValueError naming the full key
  # ('masking.<name>.<param>=<value> must ...'); config.validate turns it into a ConfigError.
  check: Optional[Callable[[ml_collections.ConfigDict, tuple[int, int], int], None]] = None


def num_keep(num_patches: int, ratio: float) -> int:
  """Visible patches per sample, truncated as the official code does: int(L * (1 - r))."""
  return int(num_patches * (1 - ratio))


def scores_to_mask(scores: jax.Array, keep: int) -> Mask:
  """Argsort scores ascending; the `keep` lowest are visible (official `random_masking`)."""
  ids_shuffle = jnp.argsort(scores, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  # Equals gathering concat(zeros(K), ones(L-K)) with ids_restore.
  mask = (ids_restore >= keep).astype(jnp.float32)
  return Mask(ids_shuffle[:, :keep], ids_restore, mask)


def random_scores(rng: jax.Array, ctx: MaskContext, params=None) -> jax.Array:
  """MAE: i.i.d. uniform noise per patch and sample."""
  del params
  return jax.random.uniform(rng, (ctx.batch_size, ctx.num_patches))


STRATEGIES: dict[str, Strategy] = {
    'random': Strategy(random_scores),
    'colored_noise': Strategy(colored_noise.scores, colored_noise.DEFAULTS,
                              check=colored_noise.check),   # ColorMAE
    'block': Strategy(block.scores, block.DEFAULTS, check=block.check),   # BEiT
    'radial': Strategy(radial.scores, radial.DEFAULTS, check=radial.check),   # R-MAE, in 2-D
    'hard_patches': Strategy(teacher_guided.hard_patches_scores,   # HPM
                             teacher_guided.HARD_PATCHES_DEFAULTS, needs=('predicted_loss',),
                             check=teacher_guided.hard_patches_check),
    'attention': Strategy(teacher_guided.attention_scores,   # AttMask
                          teacher_guided.ATTENTION_DEFAULTS, needs=('cls_attention',),
                          check=teacher_guided.attention_check),
}


def get_strategy(name: str) -> Strategy:
  if name not in STRATEGIES:
    raise ValueError(f'config.masking.name={name!r} is not a masking strategy; '
                     f'choose one of {sorted(STRATEGIES)}.')
  return STRATEGIES[name]


def default_sections() -> dict[str, ml_collections.ConfigDict]:
  """`config.masking.<name>` sections with every strategy's parameter defaults."""
  return {name: ml_collections.ConfigDict(dict(s.params)) for name, s in STRATEGIES.items()
          if s.params}


def strategy_params(masking_cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The strategy's defaults updated with `masking_cfg.<name>` (a section may be partial, e.g.
  in a hand-written masking config or a config.json saved before the strategy had a key)."""
  params = ml_collections.ConfigDict(dict(get_strategy(name).params))
  params.update(masking_cfg.get(name, {}))
  return params


Masker = Callable[..., Mask]


def make_masker(masking_cfg: ml_collections.ConfigDict, grid: tuple[int, int],
                total_steps: int, name: Optional[str] = None, steps_per_epoch: int = 1) -> Masker:
  """`masker(rng, batch_size, step=0, signals={}) -> Mask` for the configured strategy (or
  `name`), with the visible count from `masking_cfg.ratio`."""
  name = name or masking_cfg.name
  strategy = get_strategy(name)
  params = strategy_params(masking_cfg, name)
  keep = num_keep(grid[0] * grid[1], masking_cfg.ratio)
  if strategy.check:  # config.validate ran it already; this covers direct callers
    strategy.check(params, tuple(grid), keep)

  def masker(rng: jax.Array, batch_size: int, step=0, signals: Mapping[str, jax.Array] = {}
             ) -> Mask:
    missing = [s for s in strategy.needs if s not in signals]
    if missing:
      raise ValueError(f'masking strategy {name!r} needs the signals {missing}; the step passed '
                       f'{sorted(signals)}.')
    ctx = MaskContext(batch_size, tuple(grid), keep, step, total_steps, signals, steps_per_epoch)
    return scores_to_mask(strategy.score(rng, ctx, params), keep)

  return masker
