"""`--mode=summary`: the parameter table, the trainable count, analytic FLOPs, the expected step
time on named TPU/GPU systems and the compiled memory plan."""
import jax
import numpy as np

from mim import flops as flops_lib
from mim import masking
from mim import optim
from mim import sharding
from mim import teacher
from mim.models import mae


def param_table(params) -> list[tuple[str, tuple[int, ...], int]]:
  rows = []
  jax.tree_util.tree_map_with_path(
      lambda p, x: rows.append((optim.path_str(p), tuple(x.shape), int(np.prod(x.shape)))), params)
  return rows


def _teacher_lines(cfg, frozen) -> list[str]:
  if frozen is None:
    return []
  t = frozen.spec
  count = sum(r[2] for r in param_table(sharding.strip_boxes(teacher.abstract_frozen(frozen))))
  return [f'frozen teacher: ViT {t.width}x{t.depth} ({t.num_heads} heads), patch {t.patch_size}, '
          f'image {t.image_size}, {frozen.blocks} of {t.depth} blocks run; {count:,} parameters '
          f'(not trained, not checkpointed) from {cfg.teacher.weights}']


def summarize(cfg) -> str:
  spec = mae.spec_for_run(cfg)
  frozen = teacher.frozen_teacher(cfg)
  keep = masking.num_keep(spec.num_patches, cfg.masking.ratio)
  params = mae.abstract_params(spec)
  rows = param_table(params)
  width = max(len(r[0]) for r in rows)
  lines = [f'{"parameter":<{width}}  {"shape":<20} {"count":>12}']
  lines += [f'{name:<{width}}  {str(shape):<20} {count:>12,}' for name, shape, count in rows]
  total = sum(r[2] for r in rows)
  by_part = {part: sum(r[2] for r in rows if r[0].startswith(part + '/'))
             for part in ('encoder', 'decoder', 'loss_predictor', 'feature_head', 'distill_head')}
  per_image = flops_lib.train_flops_per_image(spec, keep, teacher.needed_signals(cfg), frozen)
  lines += [
      '',
      f'model: ViT {spec.width}x{spec.depth} ({spec.num_heads} heads), patch {spec.patch_size}, '
      f'image {spec.image_size}, decoder {spec.decoder_width}x{spec.decoder_depth} '
      f'({spec.decoder_heads} heads); {spec.num_patches} patches, {keep} visible',
      f'encoder parameters: {by_part["encoder"]:,}',
      f'decoder parameters: {by_part["decoder"]:,}',
      *[f'{part.replace("_", " ")} parameters: {by_part[part]:,}'
        for part in ('loss_predictor', 'feature_head', 'distill_head') if by_part[part]],
      f'trainable parameters: {total}',
      *_teacher_lines(cfg, frozen),
      f'FLOPs per image (train step, analytic): {per_image / 1e9:.2f} GFLOP',
      f'FLOPs per step (batch {cfg.batch_size}): {per_image * cfg.batch_size / 1e12:.3f} TFLOP',
  ]
  return '\n'.join(lines)


def _per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (the largest shard)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract_tree))


def memory_plan(cfg) -> dict[str, float]:
  """Compiles (without running) the train step on the config's mesh over the visible devices and
  returns per-device bytes: params, optimizer state, XLA temporaries, and their total."""
  from mim import train  # train imports the data stack; keep the table cheap
  parts = train.build_parts(cfg, total_steps=1000, warmup_steps=100)
  spec = parts.spec
  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh):
    abstract, shardings = train.state_shardings(parts, mesh)
    images = jax.ShapeDtypeStruct((cfg.batch_size, spec.image_size, spec.image_size, 3), np.float32,
                                  sharding=sharding.batch_sharding(mesh))
    frozen, frozen_shardings = train.frozen_shardings(parts, mesh) if parts.frozen else (None, None)
    compiled = train.jit_train_step(cfg, parts, mesh, shardings, frozen_shardings).lower(
        abstract, {'image': images}, *([frozen] if frozen else [])).compile()
  analysis = compiled.memory_analysis()
  plan = dict(
      devices=jax.device_count(), mesh=dict(mesh.shape),
      params=_per_device_bytes(abstract.params), opt_state=_per_device_bytes(abstract.opt_state),
      batch=_per_device_bytes(images), temporaries=analysis.temp_size_in_bytes,
      generated_code=analysis.generated_code_size_in_bytes,
      teacher=_per_device_bytes(frozen) if frozen else 0)
  # The state is donated: its outputs reuse its buffers, so state + batch + temporaries (+ a
  # frozen teacher's params) is the peak.
  plan['total'] = (plan['params'] + plan['opt_state'] + plan['batch'] + plan['temporaries']
                   + plan['teacher'])
  return plan


def format_memory_plan(plan: dict) -> str:
  gib = lambda b: f'{b / 2**30:8.3f} GiB'
  return '\n'.join([
      f'memory plan per device (compiled, not run) on {plan["devices"]} devices, mesh {plan["mesh"]}:',
      f'  params          {gib(plan["params"])}',
      f'  optimizer state {gib(plan["opt_state"])}',
      f'  batch           {gib(plan["batch"])}',
      *([f'  frozen teacher  {gib(plan["teacher"])}'] if plan.get('teacher') else []),
      f'  temporaries     {gib(plan["temporaries"])}',
      f'  total           {gib(plan["total"])}',
  ])


def scale_plan(cfg, mfu: float = 0.5) -> str:
  """Expected step time of the config's global batch on the named systems (mim/flops.SYSTEMS),
  from the analytic FLOPs and the datasheet bf16 peak at 100% and at `mfu`, with the per-device
  batch and the fully sharded (FSDP) params + AdamW moments per device against its memory."""
  spec = mae.spec_for_run(cfg)
  keep = masking.num_keep(spec.num_patches, cfg.masking.ratio)
  step_flops = flops_lib.train_flops_per_image(spec, keep, teacher.needed_signals(cfg),
                                               teacher.frozen_teacher(cfg)) * cfg.batch_size
  num_params = sum(r[2] for r in param_table(mae.abstract_params(spec)))
  ema = 1 if teacher.uses_ema(cfg) else 0
  lines = [f'expected step time for batch {cfg.batch_size} (analytic FLOPs at the bf16 datasheet '
           f'peak; at 100% / {100 * mfu:.0f}% MFU):']
  for name, (kind, devices, hbm_gib) in flops_lib.SYSTEMS.items():
    peak = flops_lib.table_peak(kind, 'bfloat16') * devices
    state_gib = (3 + ema) * 4 * num_params / devices / 2**30
    per_device = (f'{cfg.batch_size // devices}' if cfg.batch_size % devices == 0
                  else f'{cfg.batch_size / devices:.1f} (batch_size does not divide)')
    lines.append(f'  {name:8s} {devices:4d} x {kind:12s} {step_flops / peak * 1e3:9.1f} ms / '
                 f'{step_flops / peak / mfu * 1e3:9.1f} ms; {per_device} images per device; '
                 f'params + moments per device (FSDP) {state_gib:.3f} of {hbm_gib} GiB')
  return '\n'.join(lines)
