"""bench/matmul_floor.py: the dots of a jaxpr counted against hand counts, and of the real MAE step
against mim/flops.py's analytic count; the floor's arithmetic; bench/run.py's goal rows on it."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import matmul_floor, step_timer
from mim import config as config_lib
from mim import flops as flops_lib
from tests import launch


def test_dots_of_nested_jits_scans_conds_and_the_backward():
  w1, w2 = jnp.ones((8, 16)), jnp.ones((16, 4))

  @jax.jit
  def layer(x, w):
    return jnp.tanh(x @ w)

  def loss(ws, x):
    h = layer(x, ws[0])                                    # (32, 8) @ (8, 16), inside a jit
    h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ jnp.eye(16)), None), h, None, length=3)
    y = jax.lax.cond(x.sum() > 0, lambda: h @ ws[1], lambda: h[:, :4])   # costliest branch
    q = jnp.einsum('bld,bmd->blm', y.reshape(4, 8, 4), y.reshape(4, 8, 4))  # batched
    return q.sum()

  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))((w1, w2), jnp.ones((32, 8)))
  dots = matmul_floor.step_dots(jaxpr)
  # Hand count of forward + backward (the gradient is of ws: no dx for the input x):
  jitted = 2 * 32 * 8 * 16       # in the jit: forward, dW
  scan = 2 * 32 * 16 * 16        # 3 steps: forward, dc (the eye is a constant: no dW)
  cond = 2 * 32 * 16 * 4         # its dot branch, not the slice: forward, dh, dW
  batched = 2 * 4 * 8 * 8 * 4    # forward and a gradient for each operand
  counted = sum(matmul_floor.dot_flops(d) * n for d, n in dots.items())
  assert counted == 2 * jitted + 2 * 3 * scan + 3 * cond + 3 * batched
  assert sum(dots.values()) == 2 + 6 + 3 + 3
  assert sum(n for d, n in dots.items() if d[2][1] == ((0,), (0,))) == 3   # the batched einsum


def test_dot_flops_of_batch_free_and_contracted_dims():
  batched = ((4, 6, 5), (4, 7, 5), (((2,), (2,)), ((0,), (0,))), 'float32', 'float32', 'float32')
  assert matmul_floor.dot_flops(batched) == 2 * 4 * 6 * 7 * 5
  two_contracted = ((3, 4, 5), (4, 5, 2), (((1, 2), (0, 1)), ((), ())), 'float32', 'float32',
                    'float32')
  assert matmul_floor.dot_flops(two_contracted) == 2 * 3 * 2 * 4 * 5
  a, b = np.random.rand(3, 4, 5), np.random.rand(4, 5, 2)   # the same contraction in numpy
  assert np.allclose(np.tensordot(a, b, axes=((1, 2), (0, 1))), np.einsum('ijk,jkl->il', a, b))


def test_mae_step_dots_match_the_analytic_count():
  cfg = config_lib.load('configs/demo.py')
  traced, _, _, _, parts, _ = step_timer.traced_step(cfg, 8)
  counted = sum(matmul_floor.dot_flops(d) * n
                for d, n in matmul_floor.step_dots(traced.jaxpr).items())
  analytic = 8 * flops_lib.train_flops_per_image(parts.spec, parts.keep)
  # The analytic 3x forward also counts a dx of the patch embedding, which no step computes: a
  # missing backward (-2/3), a custom VJP's rule left out, or a nested jit counted twice would
  # be far outside 3%.
  assert counted == pytest.approx(analytic, rel=0.03)
  assert counted < analytic


def test_probe_dots_match_the_analytic_counts():
  """bench/methods_table.py's probe estimate: the encoder on every patch and the attentive head
  (cls token left out, values D -> D / d_out), against the dots their jaxprs hold. Counting the
  cls token as an attentive key, or the kept patches of training instead of all, fails."""
  from flax import linen as nn
  from mim.evaluate import heads
  from mim.models import mae
  spec = mae.ModelSpec(32, 4, 64, 2, 4, 128, 32, 1, 4, 64)
  model, images = mae.MAE(spec), jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
  encode = lambda p, x: model.apply({'params': p}, x, method=mae.MAE.encode)
  enc_params = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), jnp.zeros(images.shape), method=mae.MAE.encode)['params']))
  dots = matmul_floor.step_dots(jax.make_jaxpr(encode)(enc_params, images).jaxpr)
  counted = sum(matmul_floor.dot_flops(d) * n for d, n in dots.items())
  assert counted == 3 * flops_lib.encoder_forward_flops(spec, spec.num_patches)

  head = heads.AttentiveHead(num_classes=10, num_queries=4, value_divisor=2)
  tokens = jnp.zeros((3, 1 + spec.num_patches, 64))
  variables = head.init(jax.random.key(0), tokens, train=False)
  jaxpr = jax.make_jaxpr(lambda v, t: head.apply(v, t, train=False))(variables, tokens).jaxpr
  counted = sum(matmul_floor.dot_flops(d) * n for d, n in matmul_floor.step_dots(jaxpr).items())
  classifier = 2 * (64 // 2) * 10
  assert counted == 3 * (flops_lib.attentive_probe_flops(spec.num_patches, 64, 4, 2) + classifier)


def test_floor_sums_each_shape_times_its_count():
  fn = lambda a, b, c: ((a @ b) @ c).sum() + (a @ b).sum()   # (64,32)@(32,32) twice, then @ c
  jaxpr = jax.make_jaxpr(fn)(jnp.ones((64, 32)), jnp.ones((32, 32)), jnp.ones((32, 16)))
  f = matmul_floor.floor(jaxpr, reps=2)
  assert sorted(s['count'] for s in f['shapes']) == [1, 2]
  assert f['gflop'] == pytest.approx((2 * 2 * 64 * 32 * 32 + 2 * 64 * 32 * 16) / 1e9)
  assert f['seconds'] == pytest.approx(sum(s['count'] * s['ms'] for s in f['shapes']) / 1e3)
  assert f['gflops'] == pytest.approx(f['gflop'] / f['seconds'])
  assert '| 2 | (64, 32) | (32, 32) |' in matmul_floor.markdown(f)


def test_run_criteria_read_each_goal_at_its_threshold():
  """bench/run.py's met / not met rows, at the thresholds (its absl flags would clash with other
  bench modules' in this process: it runs in its own). Catches a goal column read for another
  (floor share vs speedup), a comparison the wrong way, the AMD row shown where it does not
  apply, or a case without a goal given rows."""
  case = lambda name, floor_fraction, speedup: dict(
      case=name, model=name, batch=8, speedup=speedup, round_speedups=[speedup - 0.1, speedup],
      floor_fraction=floor_fraction, floor_s=1.0, own_shape_gflops=100.0, ours_s=1.2)
  results = [case('vitb16:8', 0.80, 1.49), case('tiny32:128', 0.549, 1.2), case('demo:128', 0, 0)]
  script = ('import json, sys; sys.path.insert(0, "bench"); import run; '
            f'r = {results!r}; print(json.dumps([run.criteria(r, 1.0), run.criteria(r, 2.0)]))')
  res = subprocess.run([sys.executable, '-c', script], cwd=launch.ROOT, capture_output=True,
                       text=True, check=True)
  slow, fast = json.loads(res.stdout.strip().splitlines()[-1])
  assert [(r['case'], r['met']) for r in slow] == [
      ('vitb16:8, 8', True), ('vitb16:8, 8', True), ('tiny32:128, 8', False),
      ('tiny32:128, 8', True)]
  assert [(r['met'], r['criterion'].split(' (')[0]) for r in fast[2:3] + fast[5:]] == [
      (False, '>= 1.5x'), (True, '>= 1.2x')]
  assert len(fast) == 6 and '80%' in slow[0]['criterion']
  assert '(rounds 1.39-1.49)' in slow[1]['figure']
