"""The EMA teacher: `params_ema` in the train state, its momentum schedule, and the one teacher
pass per step that serves every consumer (HPM's predicted losses, AttMask's attention, feature
targets), methods.md §3.3, §4, §8.2-8.3.

The teacher runs on all patches, without gradients (its params are not an argument of the
differentiated function, and its outputs are stop_gradient'ed), without drop path (the model has
none), optionally in bfloat16. Its params come from `teacher_params(state)`: today the EMA copy;
a frozen teacher loaded from a weight file would plug in there.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from mim import masking
from mim import objectives
from mim.models import mae

SIGNALS = ('predicted_loss', 'cls_attention', 'feature_targets')


def needed_signals(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The teacher outputs this config consumes (none: no teacher, no EMA in the state)."""
  needs = set(masking.get_strategy(cfg.masking.name).needs)
  if cfg.targets.feature_weight > 0:
    needs.add('feature_targets')
  return tuple(s for s in SIGNALS if s in needs)


def momentum_schedule(teacher_cfg: ml_collections.ConfigDict, steps_per_epoch: int
                      ) -> Callable[[jax.Array], jax.Array]:
  """step -> EMA momentum tau, through the (time, tau) points of `teacher.momentum` (epochs or
  steps), linear or half-cosine between points, constant before the first and after the last.

  HPM: ((0, 0.999), (100, 0.9999)) in epochs, per epoch. BootMAE: ((0, 0.999), (100, 0.9999),
  (400, 0.99999)). data2vec ViT-B: ((0, 0.9998),). iBOT: ((0, 0.996), (E, 1.0)), cosine."""
  scale = steps_per_epoch if teacher_cfg.momentum_unit == 'epochs' else 1
  xs = jnp.asarray([t for t, _ in teacher_cfg.momentum], jnp.float32) * scale
  ys = jnp.asarray([tau for _, tau in teacher_cfg.momentum], jnp.float32)

  def tau(step: jax.Array) -> jax.Array:
    t = jnp.asarray(step, jnp.float32)
    if teacher_cfg.momentum_per_epoch:  # the official code sets tau once at each epoch's start
      t = jnp.floor(t / steps_per_epoch) * steps_per_epoch
    if len(xs) == 1:
      return jnp.asarray(ys[0])
    i = jnp.clip(jnp.searchsorted(xs, t, side='right') - 1, 0, len(xs) - 2)
    frac = jnp.clip((t - xs[i]) / (xs[i + 1] - xs[i]), 0.0, 1.0)
    if teacher_cfg.momentum_shape == 'cosine':
      frac = (1 - jnp.cos(jnp.pi * frac)) / 2
    return ys[i] + (ys[i + 1] - ys[i]) * frac

  return tau


def ema_update(params_ema: Any, params: Any, tau: jax.Array) -> Any:
  """tau * ema + (1 - tau) * params, leaf by leaf (after the optimizer update)."""
  return jax.tree.map(lambda e, p: (tau * e + (1 - tau) * p).astype(e.dtype), params_ema, params)


def teacher_params(state) -> Any:
  """The params the teacher runs with."""
  return state.params_ema


def make_teacher_pass(cfg: ml_collections.ConfigDict, model: mae.MAE
                      ) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
  """(teacher params, images) -> {signal: array} for `needed_signals(cfg)`, in one pass of the
  encoder over all patches (+ the loss predictor for HPM), float32 and stop_gradient'ed."""
  needs = needed_signals(cfg)
  depth = model.spec.depth
  top_k = cfg.targets.feature_top_k
  blocks = {f'encoderblock_{i}' for i in range(depth - top_k, depth)}

  def teacher_pass(params, images: jax.Array) -> dict[str, jax.Array]:
    if not needs:
      return {}
    params, images = mae.cast_for_compute(jax.lax.stop_gradient(params), images,
                                          cfg.teacher.dtype)
    mutable = (['attention'] if 'cls_attention' in needs else []) + (
        ['intermediates'] if 'feature_targets' in needs else [])
    capture = ((lambda mdl, method: mdl.name in blocks and method == '__call__')
               if 'feature_targets' in needs else False)
    tokens, state = model.apply({'params': params}, images, method=mae.MAE.encode,
                                mutable=mutable, capture_intermediates=capture)
    signals = {}
    if 'predicted_loss' in needs:
      signals['predicted_loss'] = model.apply({'params': params}, tokens,
                                              method=mae.MAE.predict_loss)
    if 'cls_attention' in needs:
      last = state['attention']['encoder']['Transformer'][f'encoderblock_{depth - 1}']
      (signals['cls_attention'],) = last['MultiHeadDotProductAttention_0']['cls_to_patches']
    if 'feature_targets' in needs:
      captured = state['intermediates']['encoder']['Transformer']
      outputs = [captured[f'encoderblock_{i}']['__call__'][0][:, 1:].astype(jnp.float32)
                 for i in range(depth - top_k, depth)]
      signals['feature_targets'] = objectives.feature_targets(outputs)
    return {k: jax.lax.stop_gradient(v.astype(jnp.float32)) for k, v in signals.items()}

  return teacher_pass
