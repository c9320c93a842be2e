"""MAE pretraining loop: one readable function, sectioned like a recipe.

config -> checks -> mesh -> model + optimizer (created sharded) -> restore or init -> data ->
jitted step -> loop (log, reconstruct, checkpoint) -> final save and evaluation.
"""
import contextlib
import functools
import os
import time
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

import data as data_lib
from mim import checkpoint as ckpt_lib
from mim import config as config_lib
from mim import flops as flops_lib
from mim import masking
from mim import metrics as metrics_lib
from mim import objectives
from mim import optim
from mim import paths
from mim import preemption
from mim import sharding
from mim import teacher as teacher_lib
from mim.evaluate import online
from mim.evaluate import reconstruction
from mim.models import mae


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. The RNG is not stored: each step's key is fold_in(seed, step)."""
  step: jax.Array
  params: Any
  opt_state: Any
  skipped_examples: jax.Array   # unreadable records replaced so far (all processes)
  nonfinite_updates: jax.Array  # steps whose loss or gradients were NaN/Inf (update not applied)
  # The EMA teacher (mim/teacher.py), only when the method consumes teacher outputs; None is an
  # empty subtree, so states without it keep the layout of earlier checkpoints.
  params_ema: Any = None


class TrainingStopped(RuntimeError):
  """Training cannot go on (NaN/Inf under nan_policy='stop'); the message names the step."""


class Parts(NamedTuple):
  """The pieces a run is built from, resolved from the config."""
  model: mae.MAE
  spec: mae.ModelSpec
  keep: int                                  # visible patches per image
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int
  steps_per_epoch: int
  teacher_signals: tuple[str, ...]           # what the teacher pass computes; () = no teacher
  ema: bool                                  # an EMA teacher in the state
  frozen: teacher_lib.Frozen | None          # a frozen teacher (its params: a step argument)


def build_parts(cfg: ml_collections.ConfigDict, total_steps: int, warmup_steps: int,
                steps_per_epoch: int = 1) -> Parts:
  spec = mae.spec_for_run(cfg)
  schedule = optim.lr_schedule(cfg.optim, cfg.batch_size, total_steps, warmup_steps)
  return Parts(mae.MAE(spec), spec, masking.num_keep(spec.num_patches, cfg.masking.ratio),
               optim.make_optimizer(cfg.optim), schedule, total_steps, steps_per_epoch,
               teacher_lib.needed_signals(cfg), teacher_lib.uses_ema(cfg),
               teacher_lib.frozen_teacher(cfg))


def schedule_lengths(cfg, num_train_examples: int) -> tuple[int, int, int]:
  """(total_steps, warmup_steps, steps_per_epoch); explicit step counts override epochs."""
  steps_per_epoch = max(num_train_examples // cfg.batch_size, 1)
  total = cfg.total_steps or int(round(cfg.total_epochs * steps_per_epoch))
  warmup = (cfg.optim.warmup_steps if cfg.optim.warmup_steps >= 0
            else int(round(cfg.optim.warmup_epochs * steps_per_epoch)))
  return total, min(warmup, total), steps_per_epoch


def init_params(parts: Parts, rng: jax.Array):
  """Freshly initialized params, still in their logical-partitioning boxes."""
  return parts.model.init(rng, *mae.example_inputs(parts.spec, parts.keep))['params']


def _init_boxed_state(parts: Parts, rng: jax.Array) -> TrainState:
  params = init_params(parts, rng)
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=parts.tx.init(params),
                    skipped_examples=zero, nonfinite_updates=zero,
                    params_ema=params if parts.ema else None)


def state_shardings(parts: Parts, mesh: Mesh) -> tuple[TrainState, Any]:
  """(abstract state carrying its shardings, the shardings) from the modules' logical axes.
  Call inside `sharding.use_mesh(mesh)`."""
  boxed = jax.eval_shape(functools.partial(_init_boxed_state, parts), jax.random.key(0))
  shardings = sharding.logical_to_shardings(mesh, boxed)
  return ckpt_lib.abstract_with_shardings(sharding.strip_boxes(boxed), shardings), shardings


def frozen_shardings(parts: Parts, mesh: Mesh) -> tuple[Any, Any]:
  """(abstract frozen-teacher params carrying their shardings, the shardings): placed by the
  same logical axes as the student's (FSDP on a pod). Call inside `sharding.use_mesh(mesh)`."""
  boxed = teacher_lib.abstract_frozen(parts.frozen)
  shardings = sharding.logical_to_shardings(mesh, boxed)
  return ckpt_lib.abstract_with_shardings(sharding.strip_boxes(boxed), shardings), shardings


def jit_init(parts: Parts, shardings):
  """rng -> the initial TrainState, created already sharded (never whole on one host)."""
  return jax.jit(lambda rng: nn.unbox(_init_boxed_state(parts, rng)), out_shardings=shardings)


def init_state(parts: Parts, shardings, seed: int) -> TrainState:
  return jit_init(parts, shardings)(jax.random.key(seed))


def params_from(cfg, params, param_shardings):
  """`params` with the parts found in `cfg.init_from` (any format mim.interop reads) replaced;
  an encoder-only file keeps the freshly initialized decoder."""
  from mim import interop  # numpy + safetensors; torch only for .pth files
  _, loaded = interop.load(cfg.init_from, cfg.model)
  # Heads this config has no use for (e.g. HPM's loss predictor, continuing as MAE) are left out.
  loaded = {k: v for k, v in loaded.items() if k in params}
  interop.check_compatible(loaded, params)  # names the tensor and both shapes
  loaded = jax.device_put(loaded, {k: param_shardings[k] for k in loaded})
  if jax.process_index() == 0:
    print(f'Initialized {" and ".join(sorted(loaded))} from {cfg.init_from}.', flush=True)
  return {**params, **loaded}


def make_train_step(cfg, parts: Parts):
  model, spec = parts.model, parts.spec
  base_key = jax.random.key(cfg.seed)
  masker = masking.make_masker(cfg.masking, spec.grid, parts.total_steps,
                               steps_per_epoch=parts.steps_per_epoch)
  teacher_pass = teacher_lib.make_teacher_pass(cfg, model)
  momentum = teacher_lib.momentum_schedule(cfg.teacher, parts.steps_per_epoch)
  accum = cfg.grad_accum_steps

  def loss_fn(params, images, mask: masking.Mask, signals, weights):
    compute_params, compute_images = mae.cast_for_compute(params, images, spec.dtype)
    outputs = model.apply({'params': compute_params}, compute_images, mask.ids_keep,
                          mask.ids_restore)
    outputs = {k: v.astype(jnp.float32) for k, v in outputs.items()}  # the loss in float32
    with jax.named_scope('loss'):  # named scopes group the step's ops in bench/step_profile.py
      terms = objectives.terms(cfg, outputs, images, mask, signals, patch_size=spec.patch_size)
    return objectives.total(terms, weights), terms

  def loss_and_grads(params, images, mask, signals, weights):
    """(loss, {term: (numerator, denominator)}, grads)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (loss, terms), grads = grad_fn(params, images, mask, signals, weights)
      return loss, terms, grads
    # Micro-batch j holds rows j, j + accum, ...: the reshape stays local to each device's
    # shard, and the scan keeps only one micro-batch's activations alive. Every sample masks the
    # same number of patches, so the pixel and feature terms' denominators are equal over
    # micro-batches and the mean of micro-batch losses is the full-batch loss (HPM's pair count
    # is equal too unless losses tie). The logged terms add numerators and denominators.
    split = lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)

    def micro_step(total, xs):
      (loss, terms), grads = grad_fn(params, *xs, weights)
      return jax.tree.map(jnp.add, total, (loss, terms, grads)), None

    xs = jax.tree.map(split, (images, mask, signals))
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: (jnp.zeros(()), loss_fn(params, *jax.tree.map(lambda x: x[0], xs), weights)[1],
                 params)))
    (loss, terms, grads), _ = jax.lax.scan(micro_step, zeros, xs)
    return loss / accum, terms, jax.tree.map(lambda g: g / accum, grads)

  def train_step(state: TrainState, batch: dict[str, jax.Array], frozen_params=None):
    images = batch['image']
    rng = jax.random.fold_in(base_key, state.step)
    # One teacher pass serves every consumer (masking signals, feature and distillation targets).
    with jax.named_scope('teacher'):
      signals = teacher_pass(teacher_lib.teacher_params(state, frozen_params), images,
                             jax.random.fold_in(rng, 1))   # {} without a teacher
    with jax.named_scope('masking'):
      mask = masker(jax.random.fold_in(rng, 0), images.shape[0], state.step, signals)
    weights = objectives.term_weights(cfg.targets, state.step, parts.steps_per_epoch)
    loss, terms, grads = loss_and_grads(state.params, images, mask, signals, weights)
    lr = parts.schedule(state.step)  # by the step counter, whatever updates were skipped
    tau = momentum(state.step)
    # A NaN/Inf step never reaches the state: the update runs under a cond, so a skipped step
    # keeps params and moments as they are without a second copy of the state (a select would
    # hold both); the host stops the run or goes on according to nan_policy.

    def update(params, opt_state, params_ema):
      updates, opt_state = parts.tx.update(grads, opt_state, params)
      params = optim.apply_updates(params, updates, lr)
      if params_ema is not None:  # the EMA follows the updated params
        params_ema = teacher_lib.ema_update(params_ema, params, tau)
      return params, opt_state, params_ema

    with jax.named_scope('optimizer'):
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      params, opt_state, params_ema = jax.lax.cond(
          finite, update, lambda *s: s, state.params, state.opt_state, state.params_ema)
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state,
        skipped_examples=state.skipped_examples + jnp.sum(batch.get('skipped', 0)),
        nonfinite_updates=state.nonfinite_updates + (~finite).astype(jnp.int32),
        params_ema=params_ema)
    metrics = dict(loss=loss, lr=lr, grad_norm=grad_norm, finite=finite)
    if len(terms) > 1 or parts.teacher_signals:
      metrics.update({f'{k}_loss': num / jnp.maximum(den, 1) for k, (num, den) in terms.items()})
    if parts.ema:
      metrics['ema_momentum'] = tau
    return new_state, metrics

  return train_step


def jit_train_step(cfg, parts: Parts, mesh: Mesh, shardings, teacher_shardings=None):
  """The step jitted with explicit shardings and the state donated; with a frozen teacher it
  takes the teacher's params (placed by `teacher_shardings`) as a third argument."""
  frozen = (teacher_shardings,) if parts.frozen else ()
  return jax.jit(make_train_step(cfg, parts),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)) + frozen,
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def make_predict_fn(cfg, parts: Parts):
  """(params, images) -> (pred, mask) with a fixed masking key, for reconstruction grids."""
  model, spec = parts.model, parts.spec
  masker = masking.make_masker(cfg.masking, spec.grid, parts.total_steps,
                               steps_per_epoch=parts.steps_per_epoch)
  # The model as its own teacher here (an EMA teacher's signals only steer the masking).
  teacher_pass = teacher_lib.make_teacher_pass(cfg, model) if parts.ema else lambda *_: {}

  def predict(params, images):
    mask = masker(jax.random.key(cfg.seed + 1), images.shape[0], signals=teacher_pass(params, images))
    pred = model.apply({'params': params}, images, mask.ids_keep, mask.ids_restore)['pixels']
    return pred, mask.mask

  return predict


def initial_state(cfg, parts: Parts, shardings, abstract_state, make_data_iter):
  """(state, data iterator) for a workdir without checkpoints: fresh, or from `init_from` (its
  params; with `init_from_state`, every entry of its newest train state that fits this config,
  with its step and data position)."""
  state = init_state(parts, shardings, cfg.seed)
  if not cfg.init_from:
    return state, make_data_iter(0)
  if not cfg.init_from_state:
    params = params_from(cfg, state.params, shardings.params)
    # A teacher starts as a copy of the loaded params (e.g. HPM continuing an MAE run).
    return state.replace(params=params, params_ema=params if parts.ema else None
                         ), make_data_iter(0)
  from mim.interop import ours
  step_dir = ours.find_step_dir(cfg.init_from)
  if step_dir is None:
    raise ckpt_lib.CheckpointError(
        f'init_from={cfg.init_from!r} holds no checkpoint of ours; init_from_state=True needs '
        'a workdir or its checkpoints/ directory (other formats carry params only).')
  source = ckpt_lib.manager(os.path.dirname(step_dir))
  step = int(os.path.basename(step_dir))
  try:
    state, restored, fresh = ckpt_lib.restore_fitting(step_dir, abstract_state, state)
  except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
    if ckpt_lib.is_transient(e):
      raise
    raise ckpt_lib.CheckpointError(
        f'Cannot read {step_dir} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); point '
        'init_from at an earlier one of its checkpoints/<step> directories.') from None
  if 'params/encoder' not in restored:
    raise ckpt_lib.CheckpointError(
        f'{step_dir} shares no encoder parameters with this config (restored only '
        f'{restored or "nothing"}); check model.* against {cfg.init_from}/config.json.')
  if state.params_ema is not None and any(g.startswith('params_ema') for g in fresh):
    state = state.replace(params_ema=state.params)  # no teacher saved: it starts as the params
  data_iter, _ = ckpt_lib.restore_data_iter(source, step, make_data_iter)
  if jax.process_index() == 0:
    print(f'Initialized the {"full " if not fresh else ""}train state from {step_dir}'
          + (f': restored {", ".join(restored)}; started fresh: {", ".join(fresh)}' if fresh else '')
          + '.', flush=True)
  return state, data_iter


def train(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[TrainState, dict[str, float]]:
  """Runs (or resumes) pretraining in `workdir`; returns the final state and metrics.

  SIGTERM/SIGINT end the run after the current step with a checkpoint (a normal return)."""
  # ---------------------------------------------------------------- checks (before compiling)
  config_lib.validate(cfg)
  config_lib.check_batch_divides(cfg.batch_size // cfg.grad_accum_steps, jax.device_count(),
                                 jax.process_count())
  num_train = data_lib.check_source(cfg.data, cfg.data.train_split)
  total_steps, warmup_steps, steps_per_epoch = schedule_lengths(cfg, num_train)
  parts = build_parts(cfg, total_steps, warmup_steps, steps_per_epoch)
  spec = parts.spec
  if parts.frozen:  # recorded in config.json and every checkpoint's config
    cfg.teacher.weights_sha256 = teacher_lib.resolve_digest(cfg)
  is_main = jax.process_index() == 0
  paths.makedirs(workdir)

  # ---------------------------------------------------------------- mesh, sharded state
  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh):
    abstract_state, shardings = state_shardings(parts, mesh)

    # -------------------------------------------------------------- restore or init, data
    def make_data_iter(start_batch: int):
      return iter(data_lib.build_train_dataset(
          cfg.data, image_size=spec.image_size, batch_size=cfg.batch_size // jax.process_count(),
          seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
          start_batch=start_batch))

    mngr = ckpt_lib.manager(os.path.join(workdir, 'checkpoints'), cfg.max_to_keep,
                            cfg.keep_every_steps, remove_unfinished=True)
    teacher_args, teacher_shardings = (), None   # the frozen teacher: read once, never saved
    if parts.frozen:
      if mngr.latest_step() is not None:  # a changed teacher file stops the resume
        teacher_lib.check_weights_unchanged(cfg, ckpt_lib.read_saved_config(
            os.path.join(str(mngr.directory), str(mngr.latest_step()))))
      _, teacher_shardings = frozen_shardings(parts, mesh)
      teacher_args = (jax.device_put(teacher_lib.load_frozen(cfg, parts.frozen), teacher_shardings),)
    latest, state, train_iter, iter_restored = ckpt_lib.restore_latest(
        mngr, abstract_state, make_data_iter, config=cfg.to_dict())
    if is_main:  # only once the checkpoints are known to fit (export and init_from read it)
      paths.write_text(os.path.join(workdir, 'config.json'), cfg.to_json_best_effort(indent=2))
    if latest is None:
      state, train_iter = initial_state(cfg, parts, shardings, abstract_state, make_data_iter)
    elif is_main:
      print(f'Resumed from {mngr.directory}/{latest}'
            + ('' if iter_restored else ' (saved by another process count: the data stream '
               f'restarts at batch {latest} of the new layout)') + '.', flush=True)
    start_step = int(state.step)

    # -------------------------------------------------------------- step functions
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jit_train_step(cfg, parts, mesh, shardings, teacher_shardings)
    # Every process runs the evaluation computations (SPMD); only process 0 writes files.
    predict = jax.jit(make_predict_fn(cfg, parts), out_shardings=sharding.replicated(mesh))
    probe = online.OnlineProbe(cfg, parts.model, mesh, total_steps)  # kNN + ridge, eval.every_steps
    vis_images, _ = data_lib.load_eval_split(cfg.data, cfg.data.eval_split,
                                             image_size=spec.image_size,
                                             max_examples=cfg.eval.num_reconstructions)

    def save_reconstructions(step: int):
      if not len(vis_images) or not spec.decoder:
        return
      pred, mask = predict(state.params, vis_images)
      if not is_main:
        return
      path = os.path.join(workdir, 'reconstructions', f'step_{step:07d}.png')
      reconstruction.save_reconstruction_grid(
          path, vis_images, np.asarray(pred), np.asarray(mask), patch_size=spec.patch_size,
          mean=cfg.data.mean, std=cfg.data.std, norm_pix=cfg.targets.norm_pix)

    def check_pending(pending: list) -> dict[str, float]:
      """Host-side checks of the (step, metrics) since the last call and of the state's
      counters; returns the newest step's metrics."""
      host = jax.device_get(pending)
      for step_number, m in host:
        if not m['finite'] and cfg.nan_policy == 'stop':
          raise TrainingStopped(
              f'The loss or gradients became NaN/Inf at step {step_number} (loss '
              f'{float(m["loss"])}, grad norm {float(m["grad_norm"])}). That update was not applied '
              f'and nothing after it is saved; the last good checkpoint is step '
              f'{mngr.latest_step()} in {mngr.directory}. Lower optim.base_lr, set '
              'optim.grad_clip_norm, or use --config.nan_policy=skip to skip such updates.')
      step_number, newest = host[-1]
      last = {k: float(v) for k, v in newest.items() if k != 'finite'}
      last['skipped_examples'], last['nonfinite_updates'] = map(
          int, jax.device_get((state.skipped_examples, state.nonfinite_updates)))
      seen = step_number * cfg.batch_size
      if last['skipped_examples'] > cfg.data.max_skipped_fraction * seen:
        raise data_lib.DataError(
            f'{last["skipped_examples"]} unreadable examples skipped out of {seen} read by '
            f'step {step_number}, more than data.max_skipped_fraction='
            f'{cfg.data.max_skipped_fraction}. Check the warnings naming the files, fix or remove '
            'them, or raise the threshold.')
      return last

    # -------------------------------------------------------------- loop
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=latest)
    flops_per_step = flops_lib.train_flops_per_image(
        spec, parts.keep, parts.teacher_signals, parts.frozen) * cfg.batch_size
    peak = flops_lib.total_peak_flops(jax.devices(), spec.dtype, cfg.peak_tflops_per_device)
    pending: list = []
    t_last, step_last, t_start = time.perf_counter(), start_step, time.perf_counter()
    last_metrics: dict[str, float] = {}
    if is_main:
      print(f'Training {total_steps} steps (warmup {warmup_steps}) of batch {cfg.batch_size} on '
            f'{jax.device_count()} device(s), mesh {dict(mesh.shape)}; starting at step {start_step}.',
            flush=True)
    # Closing the manager waits for in-flight async saves, also when an error ends the run.
    # Closing the data iterator stops grain's worker processes (and frees their shared memory).
    with preemption.StopRequest() as stop, mngr, writer, contextlib.closing(train_iter):
      for step in range(start_step + 1, total_steps + 1):
        local = next(train_iter)
        batch = sharding.global_batch({'image': local['image'], 'skipped': local['skipped']},
                                      batch_sharding)
        if batch['image'].shape[0] != cfg.batch_size:
          raise data_lib.DataError(f'The global batch has {batch["image"].shape[0]} examples, '
                                   f'not batch_size={cfg.batch_size}: processes read unequal shards.')
        state, step_metrics = train_step(state, batch, *teacher_args)
        pending.append((step, step_metrics))
        log_now = step % cfg.log_every_steps == 0 or step == total_steps or probe.due(step)
        save_now = step % cfg.checkpoint_every_steps == 0 or step == total_steps
        draw_now = (cfg.reconstruction_every_steps and step % cfg.reconstruction_every_steps == 0
                    and step != total_steps)  # the final grid is drawn after the loop
        stopping = stop.requested(agree=log_now or save_now)
        log_now, save_now = log_now or stopping, save_now or stopping
        if not (log_now or save_now or draw_now):
          continue
        # Logged values are the step's own (not window means), so a resumed run logs the
        # same sequence as one that never stopped.
        last_metrics, pending = check_pending(pending), []
        if log_now:
          now = time.perf_counter()
          sec_per_step = (now - t_last) / (step - step_last)
          last_metrics.update(sec_per_step=sec_per_step, img_per_sec=cfg.batch_size / sec_per_step,
                              gflops_per_sec=flops_per_step / sec_per_step / 1e9)
          if peak:
            last_metrics['mfu'] = flops_per_step / sec_per_step / peak
          writer.write(step, last_metrics)
          if is_main:
            terms = ''.join(f' ({k[:-5]} {v:.4f})' for k, v in last_metrics.items()
                            if k.endswith('_loss'))
            print(f'step {step}/{total_steps} | loss {last_metrics["loss"]:.4f}{terms} | '
                  f'lr {last_metrics["lr"]:.2e} | {last_metrics["img_per_sec"]:.1f} img/s | '
                  f'{last_metrics["gflops_per_sec"]:.1f} GFLOP/s'
                  + (f' | MFU {100 * last_metrics["mfu"]:.1f}%' if peak else '')
                  + f' | ETA {metrics_lib.format_duration(sec_per_step * (total_steps - step))}',
                  flush=True)
          t_last, step_last = now, step
        if draw_now:
          save_reconstructions(step)
          t_last, step_last = time.perf_counter(), step  # drawing is not training time
        if save_now:
          ckpt_lib.save(mngr, step, state, train_iter, cfg.to_dict())
        if probe.due(step) and not stopping:  # after the save: a probe never costs a checkpoint
          last_metrics.update(probe(state.params, step, writer))
          t_last, step_last = time.perf_counter(), step  # probe time is not training time
        if stopping:
          mngr.wait_until_finished()
          if is_main:
            print(preemption.stopped_message(stop, step, mngr.directory), flush=True)
          break

      # The arrays of the last batch may alias grain's shared memory, which is freed by a
      # background thread once unreferenced: drop them now, not at exit (a leak warning).
      batch = local = None
      # ------------------------------------------------------------ final reconstructions
      # (The final kNN / ridge probe ran at the last step of the loop: online.OnlineProbe.)
      if int(state.step) == total_steps and start_step < total_steps:
        save_reconstructions(total_steps)
    if is_main and int(state.step) == total_steps:
      print(f'Done in {metrics_lib.format_duration(time.perf_counter() - t_start)}; '
            f'workdir {workdir}', flush=True)
  return state, last_metrics

