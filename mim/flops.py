"""Analytic matmul FLOPs of an MAE step (the count MFU is measured against).

Counts 2 FLOPs per multiply-add of every matmul (attention scores and values included);
a training step is taken as 3x the forward pass (backward ~ 2x forward), the usual convention;
a teacher pass (forward only) counts once.
"""
from mim.models.mae import ModelSpec


def _transformer(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  per_block = (2 * tokens * width * 3 * width      # q, k, v
               + 2 * 2 * tokens * tokens * width   # scores and weighted values
               + 2 * tokens * width * width        # out projection
               + 2 * 2 * tokens * width * mlp_dim) # MLP
  return depth * per_block


def mae_forward_flops(spec: ModelSpec, num_keep: int) -> float:
  """Forward FLOPs for one image."""
  n, k = spec.num_patches, num_keep
  return (2 * n * spec.patch_dim * spec.width                                     # patch embedding
          + _transformer(1 + k, spec.width, spec.depth, spec.mlp_dim)             # encoder
          + 2 * (1 + k) * spec.width * spec.decoder_width                         # decoder embed
          + _transformer(1 + n, spec.decoder_width, spec.decoder_depth, spec.decoder_mlp_dim)
          + 2 * (1 + n) * spec.decoder_width * spec.patch_dim)                    # pixel head


def _loss_predictor(spec: ModelSpec) -> float:
  n = spec.num_patches
  return (_transformer(1 + n, spec.decoder_width, spec.decoder_depth, spec.decoder_mlp_dim)
          + 2 * (1 + n) * spec.decoder_width * spec.patch_dim)


def train_flops_per_image(spec: ModelSpec, num_keep: int,
                          teacher_signals: tuple[str, ...] = ()) -> float:
  """The train step: 3x the student's forward (MAE + the loss predictor and feature head when
  the spec has them) + 1x the teacher pass (all patches; + the loss predictor for HPM)."""
  n = spec.num_patches
  student = mae_forward_flops(spec, num_keep)
  if spec.loss_predictor:
    student += _loss_predictor(spec)
  if spec.feature_head:
    student += 2 * n * spec.decoder_width * spec.width
  teacher = 0.0
  if teacher_signals:
    teacher = 2 * n * spec.patch_dim * spec.width + _transformer(1 + n, spec.width, spec.depth,
                                                                 spec.mlp_dim)
    if 'predicted_loss' in teacher_signals:
      teacher += 2 * (1 + n) * spec.width * spec.decoder_width + _loss_predictor(spec)
  return 3 * student + teacher


# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (device_kind prefixes).
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
    'NVIDIA A100': 312e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
}


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """The peak MFU is measured against: the override if > 0, else the table; None if unknown (CPU)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  return next((v for k, v in PEAK_FLOPS.items() if device_kind.startswith(k)), None)
