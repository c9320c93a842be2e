"""Fine-tuning, MAE protocol (methods.md §1.8): one readable loop, sectioned like mim/train.py.

  python main.py --mode=finetune --config=configs/finetune_vitb.py --config.init_from=W_OR_WEIGHTS \
    --workdir=W2

config -> checks -> weights (`init_from`) -> mesh -> classifier + optimizer (created sharded) ->
restore or init -> labelled data (crop, flip, RandAugment, random erasing) -> jitted step (mixup /
cutmix with label smoothing, drop path, AdamW with layer-wise lr decay) -> loop (log, evaluate,
checkpoint) -> final top-1 on data.eval_split in W2/finetune.json.

The encoder comes from `init_from` (anything mim.interop.load reads: a pretraining workdir,
official MAE / timm / Hugging Face files; 'random' = a fresh init of config.model, the
from-scratch baseline). Its architecture comes with the weights; model.image_size (the fine-tuning
resolution: the sin-cos table is computed for any grid), model.remat and model.dtype come from
the config.
The pretrained final norm and decoder are dropped; fc_norm and the head start fresh.
A rerun of the same command resumes from W2's latest checkpoint (train state + data position);
each step's random key is fold_in(seed, step), so a resumed run repeats the same floats.
"""
import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

import data as data_lib
from data import augment as augment_lib
from data import eval_subset
from data import pipeline
from data import sources
from mim import checkpoint as ckpt_lib
from mim import config as config_lib
from mim import metrics as metrics_lib
from mim import optim
from mim import paths
from mim import preemption
from mim import sharding
from mim import train as train_lib
from mim.evaluate import features as features_lib
from mim.finetune import layer_decay
from mim.finetune import mixup
from mim.finetune import model as model_lib
from mim.models import mae

TrainState = train_lib.TrainState  # the same state as pretraining (no EMA)


@dataclasses.dataclass(frozen=True)
class Parts:
  """The pieces a run is built from, resolved from the config."""
  model: model_lib.Classifier
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int
  warmup_steps: int
  steps_per_epoch: int

  @property
  def spec(self) -> mae.ModelSpec:
    return self.model.spec

  @property
  def num_classes(self) -> int:
    return self.model.num_classes


# ------------------------------------------------------------------ checks and weights

def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Fine-tuning's own checks, on top of config.validate (before anything loads or compiles)."""
  config_lib.validate(cfg)
  if not cfg.init_from:
    raise config_lib.ConfigError(
        "--mode=finetune needs --config.init_from: a pretraining workdir, a weights file "
        "(official MAE .pth, timm, Hugging Face), or 'random' to train from scratch.")
  if cfg.init_from != 'random' and not paths.exists(cfg.init_from):
    raise config_lib.ConfigError(f'init_from={cfg.init_from!r} does not exist; give a pretraining '
                                 "workdir, a weights file, or 'random'.")
  if cfg.init_from_state:
    raise config_lib.ConfigError(
        'init_from_state=True continues a pretraining state; fine-tuning starts a new state '
        'from the encoder weights: set --config.init_from_state=False.')
  if mae.resolve_dtype(cfg.model.get('dtype', 'float32')) != 'float32':
    raise config_lib.ConfigError(
        f"model.dtype={cfg.model.dtype!r}: fine-tuning computes in float32 for now; set "
        "--config.model.dtype=float32.")
  if cfg.grad_accum_steps != 1:
    raise config_lib.ConfigError(
        f'grad_accum_steps={cfg.grad_accum_steps}: fine-tuning does not accumulate gradients '
        '(mixup pairs each image with the reversed batch); set it to 1 and use more devices, '
        'model.remat=True, or a lower batch_size (the lr follows batch / 256).')


def num_classes_of(cfg) -> int:
  """finetune.num_classes, else from the train split's labels or metadata."""
  if cfg.finetune.num_classes:
    return cfg.finetune.num_classes
  source = sources.make_source(cfg.data, cfg.data.train_split)
  n = eval_subset.num_classes_of(source, eval_subset.known_labels(source))
  if not n:
    raise config_lib.ConfigError(
        f'The number of classes of {cfg.data.name}[{cfg.data.train_split}] is unknown; set '
        '--config.finetune.num_classes.')
  return n


def resolve_weights(cfg) -> tuple[ml_collections.ConfigDict, Any, str]:
  """(cfg with model.* of the weights, encoder params as numpy (None for 'random'), what they
  are). The final norm of a pretrained encoder is dropped (fc_norm replaces it)."""
  cfg = cfg.copy_and_resolve_references()
  if cfg.init_from == 'random':
    return cfg, None, f'random init (seed {cfg.seed})'
  from mim import interop  # pylint: disable=g-import-not-at-top  (torch only for .pth files)
  try:
    loaded_cfg, params = interop.load(cfg.init_from, cfg.model)
  except interop.InteropError as e:
    raise interop.InteropError(f'init_from={cfg.init_from!r}: {e}') from None
  keep = {k: cfg.model[k] for k in ('image_size', 'remat', 'dtype')}
  cfg.model.update({**loaded_cfg.model.to_dict(), **keep})
  encoder = dict(params['encoder'])
  encoder['Transformer'] = {k: v for k, v in encoder['Transformer'].items()
                            if k != 'encoder_norm'}
  return cfg, encoder, cfg.init_from


def build_parts(cfg, num_classes: int, total_steps: int, warmup_steps: int,
                steps_per_epoch: int) -> Parts:
  spec = mae.spec_from_config(cfg.model)
  model = model_lib.Classifier(spec, num_classes, cfg.finetune.drop_path,
                               cfg.finetune.head_init_std)
  abstract = sharding.strip_boxes(jax.eval_shape(
      lambda: model.init(jax.random.key(0), model_lib.example_images(spec)))['params'])
  # torch's AdamW decays by lr x wd per group, so the layer scale multiplies the decay too: it is
  # applied to the whole AdamW update (chained after it), and the step multiplies by the lr.
  scales = layer_decay.lr_multipliers(abstract, spec.depth, cfg.finetune.layer_decay)
  tx = optax.chain(optim.make_optimizer(cfg.optim), layer_decay.scale_by_layer(scales))
  schedule = optim.lr_schedule(cfg.optim, cfg.batch_size, total_steps, warmup_steps)
  return Parts(model, tx, schedule, total_steps, warmup_steps, steps_per_epoch)


# ------------------------------------------------------------------ state

def _init_boxed_state(parts: Parts, rng: jax.Array) -> TrainState:
  params = parts.model.init(rng, model_lib.example_images(parts.spec))['params']
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=parts.tx.init(params),
                    skipped_examples=zero, nonfinite_updates=zero)


def state_shardings(parts: Parts, mesh: Mesh) -> tuple[TrainState, Any]:
  """(abstract state carrying its shardings, the shardings); inside `sharding.use_mesh(mesh)`."""
  boxed = jax.eval_shape(functools.partial(_init_boxed_state, parts), jax.random.key(0))
  shardings = sharding.logical_to_shardings(mesh, boxed)
  return ckpt_lib.abstract_with_shardings(sharding.strip_boxes(boxed), shardings), shardings


def init_state(parts: Parts, shardings, seed: int, encoder) -> TrainState:
  """A fresh state, created sharded; with `encoder` (numpy) in place of the initialized one."""
  state = jax.jit(lambda rng: nn.unbox(_init_boxed_state(parts, rng)),
                  out_shardings=shardings)(jax.random.key(seed))
  if encoder is None:
    return state
  from mim import interop  # pylint: disable=g-import-not-at-top
  interop.check_compatible({'encoder': encoder}, state.params)  # names the tensor and shapes
  params = {**state.params, 'encoder': jax.device_put(encoder, shardings.params['encoder'])}
  # The optimizer state holds no copy of the params (zero moments), so only they change.
  return state.replace(params=params)


# ------------------------------------------------------------------ step functions

def make_train_step(cfg, parts: Parts):
  f = cfg.finetune
  base_key = jax.random.key(cfg.seed)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(base_key, state.step)
    images, targets, _ = mixup.mix_batch(
        jax.random.fold_in(rng, 0), batch['image'], batch['label'], parts.num_classes,
        mixup_alpha=f.mixup_alpha, cutmix_alpha=f.cutmix_alpha, switch_prob=f.mix_switch_prob,
        smoothing=f.label_smoothing)

    def loss_fn(params):
      logits = parts.model.apply({'params': params}, images,
                                 rngs={'dropout': jax.random.fold_in(rng, 1)})  # drop path
      return optax.softmax_cross_entropy(logits, targets).mean()  # SoftTargetCrossEntropy

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.tree.norm(grads)
    lr = parts.schedule(state.step)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)   # as pretraining: skip under a cond

    def update(params, opt_state):
      updates, opt_state = parts.tx.update(grads, opt_state, params)
      return optim.apply_updates(params, updates, lr), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda *s: s, state.params, state.opt_state)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        skipped_examples=state.skipped_examples + jnp.sum(batch['skipped']),
        nonfinite_updates=state.nonfinite_updates + (~finite).astype(jnp.int32))
    return new_state, dict(loss=loss, lr=lr, grad_norm=grad_norm, finite=finite)

  return train_step


@functools.lru_cache(maxsize=8)
def _predict_fn(model: model_lib.Classifier, top: int):
  """(params, images) -> {'top': the `top` best classes}; one object per model, so the streamed
  evaluations of a run share one compilation."""
  def predict(params, images):
    return {'top': jax.lax.top_k(model.apply({'params': params}, images), top)[1]}
  return predict


def evaluate(cfg, parts: Parts, params, mesh: Mesh, test_set: eval_subset.Subset
             ) -> dict[str, float]:
  """Top-1 (and top-5 with 5+ classes) on `test_set` of data.eval_split (resize + center crop),
  streamed in padded batches of eval.batch_size."""
  top = min(5, parts.num_classes)
  batches = pipeline.eval_batches(cfg.data, cfg.data.eval_split, test_set.indices,
                                  image_size=parts.spec.image_size, batch_size=cfg.eval.batch_size,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  out = features_lib.stream(_predict_fn(parts.model, top), params, batches, mesh,
                            total=len(test_set.indices), what='fine-tune eval')
  hits = out['top'] == out['label'][:, None]
  result = {'eval_top1': float(hits[:, 0].mean())}
  if top == 5:
    result['eval_top5'] = float(hits.any(axis=1).mean())
  return result


# ------------------------------------------------------------------ the run

def finetune(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[TrainState, dict[str, Any]]:
  """Runs (or resumes) fine-tuning in `workdir`; returns the final state and the result (what
  `workdir/finetune.json` holds; {} when the run was stopped early or had finished already)."""
  # ---------------------------------------------------------------- checks (before compiling)
  check_config(cfg)
  config_lib.check_batch_divides(cfg.batch_size, jax.device_count(), jax.process_count())
  if cfg.eval.batch_size % jax.device_count():
    raise config_lib.ConfigError(
        f'eval.batch_size={cfg.eval.batch_size} is not divisible by the device count '
        f'{jax.device_count()}; use a multiple of it.')
  num_train = data_lib.check_source(cfg.data, cfg.data.train_split)
  num_classes = num_classes_of(cfg)
  test_set = eval_subset.select(cfg.data, cfg.data.eval_split, 0, cfg.eval.subset_seed,
                                num_classes)
  cfg, encoder, weights = resolve_weights(cfg)
  config_lib.validate(cfg)  # the architecture of the weights, at the config's resolution
  total_steps, warmup_steps, steps_per_epoch = train_lib.schedule_lengths(cfg, num_train)
  parts = build_parts(cfg, num_classes, total_steps, warmup_steps, steps_per_epoch)
  spec, f = parts.spec, cfg.finetune
  eval_every = int(round(f.eval_every_epochs * steps_per_epoch))
  peak_lr = optim.peak_lr(cfg.optim, cfg.batch_size)
  is_main = jax.process_index() == 0
  paths.makedirs(workdir)

  # ---------------------------------------------------------------- mesh, sharded state
  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh):
    abstract_state, shardings = state_shardings(parts, mesh)

    # -------------------------------------------------------------- restore or init, data
    augment = augment_lib.FinetuneAugment(
        cfg.data.mean, cfg.data.std, num_ops=f.rand_augment_ops,
        magnitude=f.rand_augment_magnitude, magnitude_std=f.rand_augment_std,
        erasing=f.random_erasing)

    def make_data_iter(start_batch: int):
      return iter(data_lib.build_train_dataset(
          cfg.data, image_size=spec.image_size, batch_size=cfg.batch_size // jax.process_count(),
          seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
          start_batch=start_batch, augment=augment))

    mngr = ckpt_lib.manager(os.path.join(workdir, 'checkpoints'), cfg.max_to_keep,
                            cfg.keep_every_steps, remove_unfinished=True)
    latest, state, train_iter, iter_restored = ckpt_lib.restore_latest(
        mngr, abstract_state, make_data_iter, config=cfg.to_dict())
    if is_main:
      paths.write_text(os.path.join(workdir, 'config.json'), cfg.to_json_best_effort(indent=2))
    if latest is None:
      state = init_state(parts, shardings, cfg.seed, encoder)
      if is_main and encoder is not None:
        print(f'Initialized the encoder from {weights} (its final norm and any decoder dropped; '
              'fc_norm and head fresh).', flush=True)
    elif is_main:
      print(f'Resumed from {mngr.directory}/{latest}'
            + ('' if iter_restored else f' (the data stream restarts at batch {latest})') + '.',
            flush=True)
    encoder = None  # the host copy is not needed any more
    start_step = int(state.step)

    # -------------------------------------------------------------- step function
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(make_train_step(cfg, parts), in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, sharding.replicated(mesh)),
                         donate_argnums=(0,))

    def check_pending(pending: list) -> dict[str, float]:
      """Host-side NaN policy over the steps since the last call; the newest step's metrics."""
      host = jax.device_get(pending)
      for step_number, m in host:
        if not m['finite'] and cfg.nan_policy == 'stop':
          raise train_lib.TrainingStopped(
              f'The loss or gradients became NaN/Inf at step {step_number} (loss '
              f'{float(m["loss"])}); that update was not applied. The last good checkpoint is '
              f'step {mngr.latest_step()} in {mngr.directory}. Lower optim.base_lr, set '
              'optim.grad_clip_norm, or use --config.nan_policy=skip.')
      last = {k: float(v) for k, v in host[-1][1].items() if k != 'finite'}
      last['skipped_examples'], last['nonfinite_updates'] = map(
          int, jax.device_get((state.skipped_examples, state.nonfinite_updates)))
      return last

    def run_eval(step: int) -> dict[str, float]:
      result = {**evaluate(cfg, parts, state.params, mesh, test_set),
                'epoch': step / steps_per_epoch}
      writer.write(step, result)
      if is_main:
        top5 = f', top-5 {100 * result["eval_top5"]:.2f}%' if 'eval_top5' in result else ''
        print(f'eval at step {step} (epoch {result["epoch"]:.1f}): top-1 '
              f'{100 * result["eval_top1"]:.2f}%{top5} on {test_set.description}', flush=True)
      return result

    # -------------------------------------------------------------- loop
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=latest)
    pending: list = []
    t_last, step_last, t_start = time.perf_counter(), start_step, time.perf_counter()
    last_metrics: dict[str, float] = {}
    result: dict[str, Any] = {}
    if is_main:
      print(f'Fine-tuning ViT {spec.width}x{spec.depth} (patch {spec.patch_size}, '
            f'{spec.image_size} px, {num_classes} classes) from {weights}: {total_steps} steps '
            f'({total_steps / steps_per_epoch:g} epochs, warmup {warmup_steps}) of batch '
            f'{cfg.batch_size}, peak lr {peak_lr:.3g}, layer decay '
            f'{f.layer_decay}, drop path {f.drop_path}, on {jax.device_count()} device(s), mesh '
            f'{dict(mesh.shape)}; starting at step {start_step}.', flush=True)
    with preemption.StopRequest() as stop, mngr, writer, contextlib.closing(train_iter):
      for step in range(start_step + 1, total_steps + 1):
        local = next(train_iter)
        batch = sharding.global_batch(
            {k: local[k] for k in ('image', 'label', 'skipped')}, batch_sharding)
        state, step_metrics = train_step(state, batch)
        pending.append((step, step_metrics))
        log_now = step % cfg.log_every_steps == 0 or step == total_steps
        save_now = step % cfg.checkpoint_every_steps == 0 or step == total_steps
        eval_now = eval_every > 0 and step % eval_every == 0 and step != total_steps
        stopping = stop.requested(agree=log_now or save_now)
        log_now, save_now = log_now or stopping, save_now or stopping
        if not (log_now or save_now or eval_now):
          continue
        last_metrics, pending = check_pending(pending), []
        if log_now:
          now = time.perf_counter()
          sec_per_step = (now - t_last) / (step - step_last)
          last_metrics.update(sec_per_step=sec_per_step, img_per_sec=cfg.batch_size / sec_per_step)
          writer.write(step, last_metrics)
          if is_main:
            print(f'step {step}/{total_steps} (epoch {step / steps_per_epoch:.1f}) | loss '
                  f'{last_metrics["loss"]:.4f} | lr {last_metrics["lr"]:.2e} | '
                  f'{last_metrics["img_per_sec"]:.1f} img/s | ETA '
                  f'{metrics_lib.format_duration(sec_per_step * (total_steps - step))}', flush=True)
          t_last, step_last = now, step
        if eval_now:
          run_eval(step)
          t_last, step_last = time.perf_counter(), step  # evaluation time is not training time
        if save_now:
          ckpt_lib.save(mngr, step, state, train_iter, cfg.to_dict())
        if stopping:
          mngr.wait_until_finished()
          if is_main:
            print(preemption.stopped_message(stop, step, mngr.directory), flush=True)
          break
      batch = local = None  # may alias grain's shared memory: free it now, not at exit

      # ------------------------------------------------------------ final evaluation
      if int(state.step) == total_steps and start_step < total_steps:
        final = run_eval(total_steps)
        result = dict(
            protocol='finetune (MAE)', weights=weights, data=cfg.data.name,
            model=dict(width=spec.width, depth=spec.depth, num_heads=spec.num_heads,
                       patch_size=spec.patch_size, image_size=spec.image_size),
            num_classes=num_classes, top1=final['eval_top1'], top5=final.get('eval_top5'),
            test=test_set.description, num_test=int(len(test_set.indices)),
            steps=total_steps, epochs=total_steps / steps_per_epoch, warmup_steps=warmup_steps,
            batch_size=cfg.batch_size, peak_lr=peak_lr,
            final_loss=last_metrics.get('loss'), recipe=cfg.finetune.to_dict(),
            evaluations=_evaluations(workdir) if is_main else [],
            seconds_this_run=round(time.perf_counter() - t_start, 2))
        if is_main:
          paths.write_text(os.path.join(workdir, 'finetune.json'), json.dumps(result, indent=2))
    if is_main and int(state.step) == total_steps:
      print(f'Done in {metrics_lib.format_duration(time.perf_counter() - t_start)}; '
            f'{os.path.join(workdir, "finetune.json")}', flush=True)
  return state, result


def _evaluations(workdir: str) -> list[dict]:
  """Every evaluation of the run so far (also those before a resume), from metrics.jsonl."""
  rows = [json.loads(line) for line in paths.read_text(os.path.join(workdir, 'metrics.jsonl'))
          .splitlines() if line.strip()]
  return [r for r in rows if 'eval_top1' in r]
