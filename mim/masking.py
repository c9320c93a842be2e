"""One masking interface: a strategy scores every patch, `scores_to_mask` keeps the lowest.

A strategy is `fn(rng, batch_size, num_patches, **kwargs) -> scores (B, L)`; lower score = more
likely visible. Every sample keeps exactly `num_keep` patches, so shapes stay static under jit.
Guided methods (HPM, AttMask, ColorMAE, block/radial masks) plug in by producing scores.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Mask(NamedTuple):
  ids_keep: jax.Array     # (B, K) indices of visible patches, in shuffled order
  ids_restore: jax.Array  # (B, L) inverse permutation of the shuffle
  mask: jax.Array         # (B, L) float32, 1 = removed (masked), 0 = visible, in patch order


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


def random_scores(rng: jax.Array, batch_size: int, num_patches: int) -> jax.Array:
  """MAE: i.i.d. uniform noise per patch and sample."""
  return jax.random.uniform(rng, (batch_size, num_patches))


STRATEGIES: dict[str, Callable[..., jax.Array]] = {
    'random': random_scores,
}


def get_strategy(name: str) -> Callable[..., jax.Array]:
  if name not in STRATEGIES:
    raise ValueError(f'config.masking.name={name!r} is not a masking strategy; '
                     f'choose one of {sorted(STRATEGIES)}.')
  return STRATEGIES[name]
