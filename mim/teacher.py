"""The teacher: one pass per step over all patches, without gradients, that serves every
consumer (HPM's predicted losses, AttMask's attention, feature targets, distillation targets),
methods.md §3.3, §4, §8.2-8.3, docs/distillation.md.

Two kinds (`teacher.kind`):
- 'ema': `params_ema` in the train state, a momentum copy of the student (its schedule below);
- 'frozen': a pretrained ViT of its own architecture (`teacher.model.*`) read once from
  `teacher.weights` by mim.interop (any format init_from reads), optionally only its first
  `teacher.blocks` blocks. Its params are an argument of the jitted step, placed like the
  student's (FSDP on a pod), never in the state or a checkpoint; the run records the weights'
  sha256 in config.json and a resume whose file changed stops (`check_weights_unchanged`).
Either way the teacher's params are not an argument of the differentiated function and its
outputs are stop_gradient'ed; it has no drop path; it runs in `teacher.dtype`.
"""
import dataclasses
import hashlib
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from mim import masking
from mim import morphing
from mim import objectives
from mim import paths
from mim import sharding
from mim.models import mae
from mim.models import vit

SIGNALS = ('predicted_loss', 'cls_attention', 'feature_targets', 'distill_targets',
           'morph_groups')


class TeacherError(ValueError):
  """The frozen teacher's weights are missing, do not fit teacher.model, or changed on resume."""


def needed_signals(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The teacher outputs this config consumes (none: no teacher, no EMA in the state)."""
  needs = set(masking.get_strategy(cfg.masking.name).needs)
  if cfg.targets.feature_weight > 0:
    needs.add('feature_targets')
  if cfg.targets.distill_weight > 0:
    needs.add('distill_targets')
    if cfg.distill.morph:
      needs.add('morph_groups')
  return tuple(s for s in SIGNALS if s in needs)


def uses_ema(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the state carries an EMA teacher."""
  return cfg.teacher.kind == 'ema' and bool(needed_signals(cfg))


@dataclasses.dataclass(frozen=True)
class Frozen:
  """The frozen teacher, resolved from the config."""
  spec: mae.ModelSpec         # its ViT (teacher.model.*; the decoder fields are unused)
  blocks: int                 # the first `blocks` blocks run
  layers: tuple[int, ...]     # the blocks whose outputs are the targets (non-negative)
  final_norm: bool            # the last block's output after the final LayerNorm (all blocks run)
  student_grid: tuple[int, int]
  morph_steps: int            # ToMe steps per image (branches x max steps); 0 = no morphing


def teacher_model_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`teacher.model.*` as a full `model` section (the student's decoder keys, unused)."""
  from mim import config as config_lib  # local: config imports the registries lazily too
  model = config_lib.default_config().model
  model.update(cfg.teacher.model.to_dict())
  model.dtype = cfg.teacher.dtype
  return model


def frozen_teacher(cfg: ml_collections.ConfigDict) -> Frozen | None:
  """The frozen teacher of this config, or None (an EMA teacher or none)."""
  if cfg.teacher.kind != 'frozen':
    return None
  spec = mae.spec_from_config(teacher_model_config(cfg))
  student = mae.spec_from_config(cfg.model)
  blocks = cfg.teacher.blocks or spec.depth
  d = cfg.distill
  return Frozen(spec=spec, blocks=blocks, layers=mae.block_indices(d.teacher_layers, spec.depth),
                final_norm=d.final_norm and blocks == spec.depth, student_grid=student.grid,
                morph_steps=d.morph_branches * d.morph_max_steps if d.morph else 0)


def frozen_encoder(frozen: Frozen) -> vit.Encoder:
  """The teacher's encoder with only its first `blocks` blocks (and the final norm if all run)."""
  s = frozen.spec
  return vit.Encoder(s.patch_size, s.width, frozen.blocks, s.num_heads, s.mlp_dim,
                     final_norm=frozen.blocks == s.depth)


def abstract_frozen(frozen: Frozen, full: bool = False):
  """The teacher's params in their logical-partitioning boxes, as ShapeDtypeStructs: what runs,
  or with `full` every block of teacher.model (what a weights file must hold)."""
  encoder = frozen_encoder(dataclasses.replace(frozen, blocks=frozen.spec.depth) if full else frozen)
  size = frozen.spec.image_size
  return jax.eval_shape(lambda: encoder.init(jax.random.key(0),
                                             jnp.zeros((1, size, size, 3))))['params']


def weights_digest(path: str) -> str:
  """sha256 over the files `path` stands for: our checkpoint step directory (the newest of a
  workdir), a Hugging Face directory's weights and config, or the file itself."""
  from mim.interop import ours  # local: the interop stack only for a frozen teacher
  if paths.isdir(path):
    root = ours.find_step_dir(path) or path
    names = paths.files_under(root)
  else:
    root, names = os.path.dirname(path), [os.path.basename(path)]
  digest = hashlib.sha256()
  for name in names:
    digest.update(name.encode())
    with paths.open_binary(os.path.join(root, name)) as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        digest.update(chunk)
  return digest.hexdigest()


def load_frozen(cfg: ml_collections.ConfigDict, frozen: Frozen):
  """The teacher's encoder params (numpy) from `teacher.weights`, checked against teacher.model
  (a one-line TeacherError naming the tensor and both shapes), cut to the blocks that run."""
  from mim import interop
  path = cfg.teacher.weights
  try:
    _, params = interop.load(path, teacher_model_config(cfg), encoder_only=True)
    interop.check_compatible({'encoder': params['encoder']},
                             {'encoder': sharding.strip_boxes(abstract_frozen(frozen, full=True))})
  except interop.InteropError as e:
    raise TeacherError(f'teacher.weights={path!r} does not fit teacher.model: {e}') from None
  encoder = params['encoder']
  keep = sharding.strip_boxes(abstract_frozen(frozen))
  return {'embedding': encoder['embedding'], 'cls': encoder['cls'],
          'Transformer': {k: v for k, v in encoder['Transformer'].items()
                          if k in keep['Transformer']}}


def resolve_digest(cfg: ml_collections.ConfigDict) -> str:
  """The frozen teacher's weights digest; `teacher.weights_sha256`, when given, must match."""
  path = cfg.teacher.weights
  if not paths.exists(path):
    raise TeacherError(f'teacher.weights={path!r} does not exist; point it at a workdir, a '
                       'checkpoint, a .safetensors/.npz/.pth file or a Hugging Face directory.')
  digest = weights_digest(path)
  if cfg.teacher.weights_sha256 and cfg.teacher.weights_sha256 != digest:
    raise TeacherError(f'teacher.weights={path!r} has sha256 {digest}, not the '
                       f'teacher.weights_sha256={cfg.teacher.weights_sha256} asked for.')
  return digest


def check_weights_unchanged(cfg: ml_collections.ConfigDict, saved_config: dict | None) -> None:
  """A resumed run's teacher must be the one its checkpoints were trained with."""
  saved = ((saved_config or {}).get('teacher') or {}).get('weights_sha256', '')
  if saved and saved != cfg.teacher.weights_sha256:
    raise TeacherError(
        f'teacher.weights={cfg.teacher.weights!r} changed since this run started: sha256 '
        f'{cfg.teacher.weights_sha256[:16]}... now, {saved[:16]}... in its checkpoints. Nothing '
        'was touched. Point teacher.weights at the original file, or start a new workdir.')


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


def teacher_params(state, frozen_params: Any = None) -> Any:
  """The params the teacher runs with: the frozen teacher's, else the EMA copy."""
  return state.params_ema if frozen_params is None else frozen_params


def make_teacher_pass(cfg: ml_collections.ConfigDict, model: mae.MAE
                      ) -> Callable[..., dict[str, jax.Array]]:
  """(teacher params, images, rng) -> {signal: array} for `needed_signals(cfg)`, in one pass of
  the encoder over all patches (+ the loss predictor for HPM), float32 and stop_gradient'ed."""
  frozen = frozen_teacher(cfg)
  if frozen is not None:
    return _frozen_pass(cfg, frozen)
  needs = needed_signals(cfg)
  depth = model.spec.depth
  top_k = cfg.targets.feature_top_k
  blocks = {f'encoderblock_{i}' for i in range(depth - top_k, depth)}

  def teacher_pass(params, images: jax.Array, rng: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
    del rng  # the EMA teacher's signals are deterministic
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


def _frozen_pass(cfg: ml_collections.ConfigDict, frozen: Frozen):
  """The frozen teacher's pass: its tapped blocks' patch tokens on the student's grid, stacked
  (B, T, L, D_t) and normalized (`distill.normalize`) as 'distill_targets'; with DTM, the
  morphing groups (B, branches, L) drawn from the raw last tapped layer as 'morph_groups'."""
  encoder, d = frozen_encoder(frozen), cfg.distill
  size, grid = frozen.spec.image_size, frozen.spec.grid

  def teacher_pass(params, images: jax.Array, rng: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
    params, images = mae.cast_for_compute(jax.lax.stop_gradient(params), images, cfg.teacher.dtype)
    b = images.shape[0]
    if images.shape[1:3] != (size, size):   # teacher.resample (validated)
      images = jax.image.resize(images, (b, size, size, 3), 'linear')
    _, tapped = encoder.apply({'params': params}, images, None, frozen.layers, frozen.final_norm)
    feats = jnp.stack([t[:, 1:] for t in tapped], axis=1).astype(jnp.float32)   # (B, T, Lt, D)
    if grid != frozen.student_grid:          # teacher.resample: its token grid to the student's
      t, width = feats.shape[1], feats.shape[-1]
      feats = jax.image.resize(feats.reshape(b, t, *grid, width),
                               (b, t, *frozen.student_grid, width), 'linear')
      feats = feats.reshape(b, t, -1, width)
    signals = {'distill_targets': objectives.normalize_targets(feats, d.normalize)}
    if d.morph:
      num = feats.shape[2]
      groups = []
      for key in jax.random.split(rng, d.morph_branches):
        steps, per_step = morphing.draw_schedule(key, b, d.morph_max_tokens or num,
                                                 d.morph_max_steps, d.morph_per_sample)
        groups.append(morphing.morph_groups(feats[:, -1], steps, per_step, d.morph_max_steps))
      signals['morph_groups'] = jnp.stack(groups, axis=1)
    return jax.tree.map(jax.lax.stop_gradient, signals)

  return teacher_pass
