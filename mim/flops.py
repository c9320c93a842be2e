"""Analytic matmul FLOPs of an MAE step (the count MFU is measured against).

Counts 2 FLOPs per multiply-add of every matmul (attention scores and values included);
a training step is taken as 3x the forward pass (backward ~ 2x forward), the usual convention;
a teacher pass (forward only) counts once.
"""
import json
import os
import platform
import time

from mim.models.mae import ModelSpec


def transformer_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward matmul FLOPs of `depth` pre-LN blocks over `tokens` tokens (attention included)."""
  per_block = (2 * tokens * width * 3 * width      # q, k, v
               + 2 * 2 * tokens * tokens * width   # scores and weighted values
               + 2 * tokens * width * width        # out projection
               + 2 * 2 * tokens * width * mlp_dim) # MLP
  return depth * per_block


def encoder_forward_flops(spec: ModelSpec, num_keep: int) -> float:
  """Forward FLOPs of the encoder for one image that keeps `num_keep` patches (all embedded)."""
  return (2 * spec.num_patches * spec.patch_dim * spec.width                      # patch embedding
          + transformer_flops(1 + num_keep, spec.width, spec.depth, spec.mlp_dim))


def attentive_probe_flops(tokens: int, width: int, num_queries: int, value_divisor: int) -> float:
  """Forward FLOPs of the attentive probe's head (heads.AttentiveHead) on one example's tokens:
  query scores, the value projection, each query's weighted sum of its slice of the values."""
  values = width // value_divisor
  return 2 * num_queries * tokens * width + 2 * tokens * width * values + 2 * tokens * values


def mae_forward_flops(spec: ModelSpec, num_keep: int) -> float:
  """Forward FLOPs for one image."""
  n, k = spec.num_patches, num_keep
  return (encoder_forward_flops(spec, k)
          + 2 * (1 + k) * spec.width * spec.decoder_width                         # decoder embed
          + transformer_flops(1 + n, spec.decoder_width, spec.decoder_depth, spec.decoder_mlp_dim)
          + 2 * (1 + n) * spec.decoder_width * spec.patch_dim)                    # pixel head


def _loss_predictor(spec: ModelSpec) -> float:
  n = spec.num_patches
  return (transformer_flops(1 + n, spec.decoder_width, spec.decoder_depth, spec.decoder_mlp_dim)
          + 2 * (1 + n) * spec.decoder_width * spec.patch_dim)


def _distill_heads(spec: ModelSpec, num_keep: int) -> float:
  """The student's distillation heads (and MaskAlign's layer mixing) on their tokens."""
  d = spec.distill
  tokens, width = ((num_keep, spec.width) if d.source == 'encoder'
                   else (spec.num_patches, spec.decoder_width))
  head = (2 * tokens * (width * d.hidden + d.hidden * d.width) if d.head == 'mlp'
          else 2 * tokens * width * d.width)
  mix = 2 * tokens * width * len(d.taps) if d.align == 'dynamic' else 0
  return d.outputs * (head + mix)


def frozen_teacher_flops(frozen, student_patches: int) -> float:
  """A frozen teacher's pass (mim/teacher.Frozen): the patch embedding and the blocks that run,
  on all its patches, + DTM's token matching (cosine scores of A x B tokens per ToMe step)."""
  t, n = frozen.spec, frozen.spec.num_patches
  matching = frozen.morph_steps * 2 * ((student_patches + 1) // 2) * (student_patches // 2) * t.width
  return (2 * n * t.patch_dim * t.width + transformer_flops(1 + n, t.width, frozen.blocks, t.mlp_dim)
          + matching)


def train_flops_per_image(spec: ModelSpec, num_keep: int,
                          teacher_signals: tuple[str, ...] = (), frozen=None) -> float:
  """The train step: 3x the student's forward (MAE + the loss predictor, feature head and
  distillation heads when the spec has them; no decoder without one) + 1x the teacher pass
  (all patches; + the loss predictor for HPM; a `frozen` teacher's own blocks)."""
  n = spec.num_patches
  student = mae_forward_flops(spec, num_keep)
  if not spec.decoder:
    student = encoder_forward_flops(spec, num_keep)
  if spec.loss_predictor:
    student += _loss_predictor(spec)
  if spec.feature_head:
    student += 2 * n * spec.decoder_width * spec.width
  if spec.distill:
    student += _distill_heads(spec, num_keep)
  teacher = 0.0
  if frozen is not None:
    teacher = frozen_teacher_flops(frozen, n)
  elif teacher_signals:
    teacher = encoder_forward_flops(spec, n)
    if 'predicted_loss' in teacher_signals:
      teacher += 2 * (1 + n) * spec.width * spec.decoder_width + _loss_predictor(spec)
  return 3 * student + teacher


# Dense peak FLOP/s per device from the vendors' datasheets (device_kind prefix -> (bf16, fp32)).
# The fp32 column is what an fp32 matmul runs at under JAX's default precision: one bf16 pass
# on TPU, TF32 on NVIDIA Ampere and later.
PEAK_FLOPS = {
    'TPU v4': (275e12, 275e12),
    'TPU v5 lite': (197e12, 197e12),   # v5e
    'TPU v5p': (459e12, 459e12),
    'TPU v5': (459e12, 459e12),
    'TPU v6 lite': (918e12, 918e12),   # v6e (Trillium)
    'NVIDIA A100': (312e12, 156e12),
    'NVIDIA H100': (989e12, 495e12),   # SXM
    'NVIDIA H200': (989e12, 495e12),
    'NVIDIA B200': (2250e12, 1100e12),
}
# Named systems for the planner (mim/summary.py): (device kind in PEAK_FLOPS, devices, HBM GiB).
SYSTEMS = {'v4-64': ('TPU v4', 32, 32), 'v5e-256': ('TPU v5 lite', 256, 16),
           '8xH100': ('NVIDIA H100', 8, 80)}
_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'mim', 'cpu_matmul_peak.json')


def table_peak(device_kind: str, dtype: str = 'bfloat16') -> float | None:
  """The datasheet peak for a device kind and compute dtype; None if not in the table."""
  peaks = next((v for k, v in PEAK_FLOPS.items() if device_kind.startswith(k)), None)
  return None if peaks is None else peaks[0 if dtype == 'bfloat16' else 1]


def best_seconds(f, args: tuple, reps: int) -> float:
  """The best wall seconds of `f(*args)` (a jitted function) over `reps` calls after a warm-up."""
  f(*args).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    f(*args).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return best


def measure_matmul_peak(dtype: str = 'float32', n: int = 2048, reps: int = 7) -> float:
  """This backend's best n^3 matmul rate (FLOP/s) on one device: what a perfectly efficient
  step could reach."""
  import jax, jax.numpy as jnp  # noqa: E401 (local: keeps this module light for the planner)
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  return 2 * n ** 3 / best_seconds(jax.jit(lambda a: a @ a), (x,), reps)


def cpu_matmul_peak(dtype: str = 'float32') -> float:
  """The host's matmul peak: the best 2048^3 rate seen on this CPU model, thread count, jax
  version and dtype, kept in ~/.cache/mim. Every call measures again (~0.3 s) and keeps the
  maximum: a rate measured while other work shares the cores undercounts the peak (one taken
  during a test run read 127 GFLOP/s on a machine that does 310, and every later run reported
  MFU 2.4x too high), and the next quiet run corrects it."""
  import jax
  key = f'{cpu_name()}|{os.cpu_count()}|jax {jax.__version__}|{dtype}'
  try:
    with open(_CACHE) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    cache = {}
  measured = measure_matmul_peak(dtype, reps=3)
  if measured > cache.get(key, 0.0):
    cache[key] = measured
    try:
      os.makedirs(os.path.dirname(_CACHE), exist_ok=True)
      with open(_CACHE, 'w') as f:
        json.dump(cache, f, indent=1)
    except OSError:
      pass  # a read-only home: this run's figure only
  return cache[key]


def cpu_name() -> str:
  """The CPU model, as lscpu's 'Model name' (from /proc/cpuinfo)."""
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown cpu'


def total_peak_flops(devices, dtype: str = 'float32', override_tflops: float = 0.0
                     ) -> float | None:
  """The peak MFU is measured against, summed over `devices`: the override per device if > 0,
  else the datasheet table; on CPU the host's measured matmul rate (simulated devices share
  the host's cores, so it counts once per process). None for an unknown accelerator."""
  if override_tflops > 0:
    return override_tflops * 1e12 * len(devices)
  kind = devices[0].device_kind
  if devices[0].platform == 'cpu':
    return cpu_matmul_peak(dtype) * len({d.process_index for d in devices})
  peak = table_peak(kind, dtype)
  return None if peak is None else peak * len(devices)
