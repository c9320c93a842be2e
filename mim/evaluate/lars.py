"""LARS as in the official MAE linear probe (util/lars.py), built from optax pieces.

For each parameter with ndim > 1 (others skip both steps):
  g <- g + wd * w;  q = tc * ||w|| / ||g|| (1 if either norm is 0);  g <- q * g
then for all:  mu <- momentum * mu + g;  w <- w - lr * mu.

`optax.lars` applies the learning rate before the momentum trace (mu <- m * mu - lr * g), which
differs from MAE's once the lr follows a schedule; here the transform returns -mu at unit lr and
the step applies lr_t to it (`mim.optim.apply_updates`), as MAE does.
"""
import jax
import optax

from mim import optim


def weight_matrices(params):
  """MAE's LARS mask (rank > 1) in our layouts: tensors of rank > 1 that are not biases (ours can
  be (heads, head_dim))."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and optim.path_str(path).rsplit('/', 1)[-1] != 'bias', params)


def lars(momentum: float = 0.9, trust_coefficient: float = 0.001, weight_decay: float = 0.0,
         mask=weight_matrices) -> optax.GradientTransformation:
  """Unit-lr LARS updates (-mu); scale them by the schedule's lr when applying."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), mask),
      optax.trace(decay=momentum),
      optax.scale(-1.0))
