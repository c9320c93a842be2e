"""Compile and time the real train step of a config on synthetic images, for the bench scripts
(no flags here, so any script can import it beside its own)."""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim import sharding, train
from mim import teacher as teacher_lib


def traced_step(cfg, batch_size: int):
  """(the traced train step of `cfg`, its state, a synthetic batch, the frozen teacher's params
  as a tuple of 0 or 1, parts, trace seconds); traced but not compiled."""
  cfg.batch_size = batch_size
  parts = train.build_parts(cfg, total_steps=1000, warmup_steps=100)
  spec = parts.spec
  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh):
    _, shardings = train.state_shardings(parts, mesh)
    state = train.init_state(parts, shardings, cfg.seed)
    images = jax.random.normal(jax.random.key(1), (batch_size, spec.image_size, spec.image_size, 3))
    batch = {'image': jax.device_put(images, sharding.batch_sharding(mesh))}
    teacher, teacher_shardings = (), None
    if parts.frozen:  # a randomly initialized frozen teacher: the same cost as a loaded one
      _, teacher_shardings = train.frozen_shardings(parts, mesh)
      size = parts.frozen.spec.image_size
      init = lambda rng: teacher_lib.frozen_encoder(parts.frozen).init(
          rng, jnp.zeros((1, size, size, 3)))['params']
      teacher = (jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=teacher_shardings)(
          jax.random.key(2)),)
    step_fn = train.jit_train_step(cfg, parts, mesh, shardings, teacher_shardings)
    t = time.perf_counter()
    traced = step_fn.trace(state, batch, *teacher)
  return traced, state, batch, teacher, parts, time.perf_counter() - t


def compiled_step(cfg, batch_size: int):
  """(compiled train step, its state, a synthetic batch, compile seconds, parts, its jaxpr) for
  `cfg`."""
  traced, state, batch, teacher, parts, trace_s = traced_step(cfg, batch_size)
  t = time.perf_counter()
  compiled = traced.lower().compile()
  compile_s = trace_s + time.perf_counter() - t
  if teacher:
    return (lambda s, b: compiled(s, b, *teacher)), state, batch, compile_s, parts, traced.jaxpr
  return compiled, state, batch, compile_s, parts, traced.jaxpr


def time_steps(compiled, state, batch, steps: int) -> tuple[list[float], dict, object]:
  """Seconds of each of `steps` steps after one warm-up step, the last metrics and the state
  (the input state is donated: use the returned one for more steps)."""
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return times, metrics, state
