"""Optimizer: AdamW with an explicit weight-decay mask, per-step warmup + cosine schedule.

The optimizer gives the update direction at unit learning rate; the train step scales it by
`schedule(state.step)` (`apply_updates`), so the applied lr follows the step counter even when
NaN/Inf updates are skipped. Adam's bias correction keeps its own count of the updates applied
to its moments, as torch's Adam does when a GradScaler skips a step.
"""
import re

import jax
import optax


def peak_lr(optim_cfg, batch_size: int) -> float:
  """The MAE scaling rule: lr = base_lr * batch / 256."""
  return optim_cfg.base_lr * batch_size / 256


def lr_schedule(optim_cfg, batch_size: int, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then half-cycle cosine to min_lr; evaluated every iteration."""
  peak = peak_lr(optim_cfg, batch_size)
  warmup_steps = min(warmup_steps, total_steps)
  cosine = optax.cosine_decay_schedule(
      peak, decay_steps=max(total_steps - warmup_steps, 1),
      alpha=optim_cfg.min_lr / peak if peak else 0.0)
  if warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def path_str(path) -> str:
  """'encoder/Transformer/encoderblock_0/...' for a jax tree path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def decay_mask(params, regex: str):
  """True for the parameters whose path matches `regex` (fullmatch)."""
  pattern = re.compile(regex)
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(pattern.fullmatch(path_str(p))), params)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
  # A unit-valued schedule rather than the constant 1.0: it keeps the optimizer state's layout
  # (a schedule count) that checkpoints written before the lr moved into the step hold.
  adamw = optax.adamw(lambda count: 1.0, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay,
                      mask=lambda params: decay_mask(params, optim_cfg.weight_decay_regex))
  if optim_cfg.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), adamw)
  return adamw


def apply_updates(params, updates, lr: jax.Array):
  """params + lr * updates (updates at unit lr; -lr * x and lr * (-x) are the same floats)."""
  return jax.tree.map(lambda p, u: (p + lr * u).astype(p.dtype), params, updates)
