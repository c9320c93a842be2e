"""The train step's matmul floor: every matmul of the step, timed alone in XLA on this machine.

  python bench/train_step.py --model=vitb16 --batch=8 --floor   # the table of its dot shapes

Reads every `dot_general` of the step's jaxpr (the forward, the backward autodiff built, any
teacher pass; the calls, custom-VJP rules and remat bodies it holds), groups them by shapes,
dimension numbers and dtypes, and times one of each alone (a jit of that dot on random inputs,
best of `reps`). The floor is the sum of those times over every dot the step runs: what the step
would take if it were its matmuls and nothing else, each at the rate XLA reaches on that shape
here (less the cost of a jit call, which the step's dots do not pay). `floor / step time` is the
share of XLA's own-shape matmul rate the whole step reaches, a criterion of bench/run.py (a
2048^3 rate flatters the small-K shapes of a ViT-Ti, which no kernel runs as fast). No flags here, so bench/run.py's worker and the tests import it.
"""
import collections
import functools
import math
import time

import jax

from mim import flops as flops_lib

# (lhs shape, rhs shape, ((lhs contracting, rhs contracting), (lhs batch, rhs batch)),
#  lhs dtype, rhs dtype, output dtype)
Dot = tuple


def step_dots(jaxpr) -> collections.Counter:
  """Dot -> how many times the step runs it, over a (closed) jaxpr and every jaxpr it calls (a
  scan's body times its length; the costliest branch of a cond)."""
  counts = collections.Counter()
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      lhs, rhs = (v.aval for v in eqn.invars)
      dims = tuple(tuple(tuple(int(d) for d in side) for side in pair)
                   for pair in eqn.params['dimension_numbers'])
      counts[(lhs.shape, rhs.shape, dims, lhs.dtype.name, rhs.dtype.name,
              eqn.outvars[0].aval.dtype.name)] += 1
      continue
    if eqn.primitive.name == 'cond':
      branches = [step_dots(b) for b in eqn.params['branches']]
      counts.update(max(branches, key=lambda c: sum(dot_flops(d) * n for d, n in c.items())))
      continue
    times = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          for dot, n in step_dots(sub).items():
            counts[dot] += n * times
  return counts


def dot_flops(dot: Dot) -> float:
  """2 x multiply-adds: batch x lhs free x rhs free x contracted sizes."""
  lhs, rhs, ((lc, rc), (lb, rb)), *_ = dot
  batch = math.prod(lhs[d] for d in lb)
  contract = math.prod(lhs[d] for d in lc)
  lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
  rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
  return 2.0 * batch * contract * lhs_free * rhs_free


def time_dot(dot: Dot, reps: int) -> float:
  """Best seconds of the dot alone, jitted, on random inputs of its shapes and dtypes, less the
  call's own cost (a jit reading one value of each input): inside the step a dot pays no Python
  dispatch, which would be most of a small dot's time here."""
  lhs, rhs, dims, lhs_dtype, rhs_dtype, out_dtype = dot
  f = jax.jit(functools.partial(jax.lax.dot_general, dimension_numbers=dims,
                                preferred_element_type=out_dtype))
  ka, kb = jax.random.split(jax.random.key(0))
  args = (jax.random.normal(ka, lhs).astype(lhs_dtype), jax.random.normal(kb, rhs).astype(rhs_dtype))
  call = flops_lib.best_seconds(jax.jit(lambda a, b: a.ravel()[0] + b.ravel()[0]), args, reps)
  return max(flops_lib.best_seconds(f, args, reps) - call, 1e-7)


def floor(jaxpr, reps: int = 5) -> dict:
  """{'gflop', 'seconds', 'gflops', 'shapes': [...]}: the step's dots, each shape timed alone."""
  shapes = []
  for dot, n in step_dots(jaxpr).items():
    sec = time_dot(dot, reps)
    shapes.append(dict(lhs=list(dot[0]), rhs=list(dot[1]), dims=dot[2], dtype=dot[3], count=n,
                       gflop=dot_flops(dot) / 1e9, ms=1e3 * sec,
                       gflops=dot_flops(dot) / sec / 1e9))
  shapes.sort(key=lambda s: -s['count'] * s['ms'])
  gflop = sum(s['count'] * s['gflop'] for s in shapes)
  seconds = sum(s['count'] * s['ms'] for s in shapes) / 1e3
  return dict(gflop=gflop, seconds=seconds, gflops=gflop / seconds, shapes=shapes)


def markdown(f: dict) -> str:
  """The table of `floor(...)`'s shapes, costliest first."""
  lines = ['| count | lhs | rhs | ((contract), (batch)) | GFLOP each | ms each | GFLOP/s | ms in all |',
           '|---:|---|---|---|---:|---:|---:|---:|']
  for s in f['shapes']:
    lines.append(f'| {s["count"]} | {tuple(s["lhs"])} | {tuple(s["rhs"])} | {s["dims"]} | '
                 f'{s["gflop"]:.3f} | {s["ms"]:.2f} | {s["gflops"]:.0f} | '
                 f'{s["count"] * s["ms"]:.1f} |')
  return '\n'.join(lines)
