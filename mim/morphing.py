"""Dynamic Token Morphing (DTM, docs/distillation.md): ToMe bipartite soft matching on the
teacher's tokens decides which tokens form a group; teacher and student tokens are both replaced
by their group's mean, with the same groups, before the feature loss.

Static shapes throughout: each sample keeps its current token sequence as a length-L array of
group representatives (original token indices) of which the first `alive` are real, so samples
may merge different numbers of tokens in the same compiled step.
"""
import jax
import jax.numpy as jnp


def _segment_mean(x: jax.Array, group: jax.Array) -> jax.Array:
  """(L, D) features, (L,) group ids in [0, L) -> (L, D) mean of each group (0 for empty ones)."""
  total = jax.ops.segment_sum(x, group, num_segments=x.shape[0])
  count = jax.ops.segment_sum(jnp.ones_like(group, x.dtype), group, num_segments=x.shape[0])
  return total / jnp.maximum(count, 1)[:, None]


def _merge_step(tokens: jax.Array, order: jax.Array, group: jax.Array, alive: jax.Array,
                r: jax.Array):
  """One ToMe step on one sample: the current sequence order[:alive] splits into A (even
  positions) and B (odd); each A token's most cosine-similar B token is its edge; the r A tokens
  with the most similar edges join their B token's group. The new sequence is the unmerged A
  tokens, then the B tokens, each in their previous order. Position 0 is never merged (ToMe's
  protected class token; DTM's code passes class_token=True on patch tokens, so it protects the
  first patch of the sequence)."""
  n = tokens.shape[0]
  pos = jnp.arange(n)
  a_pos, b_pos = pos[0::2], pos[1::2]
  valid_a, valid_b = a_pos < alive, b_pos < alive
  r = jnp.minimum(r, (alive - 1) // 2)   # ToMe: at most (tokens - protected) // 2 per step
  metric = _segment_mean(tokens, group)[order]
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  scores = jnp.where(valid_a[:, None] & valid_b[None, :], metric[0::2] @ metric[1::2].T, -jnp.inf)
  scores = scores.at[0].set(-jnp.inf)
  best, dst = scores.max(axis=1), scores.argmax(axis=1)
  rank = jnp.argsort(jnp.argsort(-best, stable=True), stable=True)
  merged = valid_a & (rank < r)
  # Each merged representative points at its destination's representative (B tokens are never
  # merged in the same step, so one redirection is enough).
  hits = (order[a_pos][:, None] == pos[None, :]) & merged[:, None]      # (A position, rep)
  redirect = jnp.where(hits.any(axis=0), (hits * order[b_pos][dst][:, None]).sum(axis=0), pos)
  kept_a = valid_a & ~merged
  new_a = jnp.where(kept_a, jnp.cumsum(kept_a) - 1, n)           # n: dropped (out of range)
  new_b = jnp.where(valid_b, kept_a.sum() + jnp.cumsum(valid_b) - 1, n)
  order = (jnp.zeros_like(order).at[new_a].set(order[a_pos], mode='drop')
           .at[new_b].set(order[b_pos], mode='drop'))
  return order, redirect[group], alive - merged.sum()


def morph_groups(tokens: jax.Array, steps: jax.Array, per_step: jax.Array, max_steps: int
                 ) -> jax.Array:
  """Teacher tokens (B, L, D), per-sample step counts k (B,) and tokens merged per step r (B,)
  -> (B, L) group id of every token (the representative's index), after k ToMe steps."""
  def one(x, k, r):
    n = x.shape[0]
    x = x.astype(jnp.float32)

    def body(i, carry):
      order, group, alive = carry
      return _merge_step(x, order, group, alive, jnp.where(i < k, r, 0))

    init = (jnp.arange(n), jnp.arange(n), jnp.asarray(n))
    return jax.lax.fori_loop(0, max_steps, body, init)[1]

  return jax.vmap(one)(tokens, steps, per_step)


def draw_schedule(rng: jax.Array, batch: int, max_tokens: int, max_steps: int,
                  per_sample: bool) -> tuple[jax.Array, jax.Array]:
  """DTM's dynamic schedule: n ~ U{0..max_tokens} tokens to merge in k ~ U{1..max_steps} steps
  of r = floor(n / k) each (the official code takes ceil(n / k) unless ceil * k > n, which is
  floor in every case); one draw per sample, or one per batch as the official code does.
  -> (k (B,), r (B,))."""
  draws = batch if per_sample else 1
  n_key, k_key = jax.random.split(rng)
  n = jax.random.randint(n_key, (draws,), 0, max_tokens + 1)
  k = jax.random.randint(k_key, (draws,), 1, max_steps + 1)
  return jnp.broadcast_to(k, (batch,)), jnp.broadcast_to(n // k, (batch,))


def aggregate(x: jax.Array, group: jax.Array) -> jax.Array:
  """Every token replaced by the mean of its group: S^T (S X / rowsum S) for (B, ..., L, D) x
  and (B, L) groups (the middle axes share the sample's groups)."""
  def one(xs, g):
    flat = xs.reshape((-1,) + xs.shape[-2:])
    return jax.vmap(lambda t: _segment_mean(t, g)[g])(flat).reshape(xs.shape)
  return jax.vmap(one)(x, group)
