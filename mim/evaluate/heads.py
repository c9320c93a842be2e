"""Probe heads on frozen features: the MAE linear probe and the efficient attentive probe (EP).

Linear (MAE main_linprobe.py): BatchNorm without affine (eps 1e-6) -> Dense, weight
trunc_normal(0.01), bias 0. BN running statistics follow torch's momentum 0.1 (flax 0.9) and are
used at eval; under jit the batch statistics are those of the global batch.

Attentive (EP, "Attention, Please!", ICLR 2026; methods.md §10): M learnable queries (normal 0.02)
attend, with one head and scale D**-0.5, over the frozen tokens used as keys without a projection;
one bias-free value projection D -> D/d_out is split into M channel slices, query m reading slice
m; the pooled (D/d_out,) vector then goes through the linear head above.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp


class LinearHead(nn.Module):
  num_classes: int
  bn_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.BatchNorm(use_running_average=not train, use_bias=False, use_scale=False,
                     momentum=0.9, epsilon=self.bn_eps, name='bn')(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01),
                    name='head')(x)


class AttentiveHead(nn.Module):
  """tokens (B, 1+N, D), cls first -> logits; the cls token is a key only with `use_cls`."""
  num_classes: int
  num_queries: int = 32
  value_divisor: int = 1   # d_out: the value projection maps D -> D / d_out
  use_cls: bool = False
  bn_eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
    x = tokens if self.use_cls else tokens[:, 1:]
    b, n, d = x.shape
    m, dv = self.num_queries, d // self.value_divisor
    queries = self.param('queries', nn.initializers.normal(0.02), (m, d))
    attn = jax.nn.softmax(jnp.einsum('md,bnd->bmn', queries * d ** -0.5, x), axis=-1)
    v = nn.Dense(dv, use_bias=False, name='value')(x).reshape(b, n, m, dv // m)
    pooled = jnp.einsum('bmn,bnmc->bmc', attn, v).reshape(b, dv)
    return LinearHead(self.num_classes, self.bn_eps, name='linear')(pooled, train)


def attentive_param_count(width: int, num_queries: int, value_divisor: int, num_classes: int
                          ) -> int:
  """M*D queries + D*D/d_out values + (D/d_out + 1)*C classifier (the BN has no parameters)."""
  dv = width // value_divisor
  return num_queries * width + width * dv + (dv + 1) * num_classes


def check_attentive(width: int, num_queries: int, value_divisor: int) -> str | None:
  """Why these sizes do not fit (None if they do): D/d_out must split into M equal slices."""
  if width % value_divisor or (width // value_divisor) % num_queries:
    return (f'the value width {width} / probe.value_divisor={value_divisor} must be a multiple '
            f'of probe.num_queries={num_queries}')
  return None
