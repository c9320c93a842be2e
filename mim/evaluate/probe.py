"""Probes trained on a frozen encoder with the MAE linear-probe recipe, and their evaluation.

Recipe (methods.md §1.9): LARS (momentum 0.9, trust coefficient 0.001, no decay or trust ratio
for biases), lr = base_lr x batch / 256 with linear warmup then cosine to min_lr,
stepped per iteration, softmax cross-entropy. Two ways to feed the head (`probe.mode`):
  augment  the encoder runs inside every step on RandomResizedCrop(probe.crop_scale) + flip views
           of the train split (the MAE protocol);
  cached   the encoder runs once over the train split's center-crop views and the head trains on
           those features (fast; not the protocol's augmentation).
Either way the test split is streamed once through encoder + head (center crop). The head state
is replicated and the batch sharded over the mesh's batch axes, so BN sees global-batch
statistics.
"""
import contextlib
import functools
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from data import eval_subset
from data import pipeline
from data import sources
from mim import config as config_lib
from mim import optim
from mim import sharding
from mim.evaluate import features as features_lib
from mim.evaluate import heads
from mim.evaluate import lars
from mim.models import mae

MODES = {
    'augment': 'features on the fly under the train augmentation (RandomResizedCrop + flip)',
    'cached': 'cached center-crop features (fast mode)',
}


@flax.struct.dataclass
class ProbeState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def head_input(protocol: str, probe_cfg) -> str:
  """The encoder output a protocol's head reads (a name of features.POOLS)."""
  return probe_cfg.linear_pool if protocol == 'linear' else 'tokens'


def make_head(protocol: str, probe_cfg, num_classes: int) -> nn.Module:
  if protocol == 'linear':
    return heads.LinearHead(num_classes)
  return heads.AttentiveHead(num_classes, probe_cfg.num_queries, probe_cfg.value_divisor,
                             probe_cfg.attentive_use_cls)


def schedule_lengths(probe_cfg, num_train: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) for `num_train` examples at probe.batch_size."""
  if num_train < probe_cfg.batch_size:
    raise config_lib.ConfigError(
        f'probe.batch_size={probe_cfg.batch_size} is larger than the {num_train} train examples; '
        'lower it.')
  steps_per_epoch = num_train // probe_cfg.batch_size
  total = max(1, int(round(probe_cfg.epochs * steps_per_epoch)))
  return total, min(total, int(round(probe_cfg.warmup_epochs * steps_per_epoch)))


def make_train_step(head: nn.Module, tx: optax.GradientTransformation, featurize: Callable):
  """(state, encoder params, inputs, labels, lr) -> (state, metrics); `featurize` maps the
  inputs (images, or cached features) to the head's input under stop_gradient."""

  def step(state: ProbeState, enc_params, inputs, labels, lr):
    x = featurize(enc_params, inputs)

    def loss_fn(params):
      logits, updates = head.apply({'params': params, 'batch_stats': state.batch_stats}, x,
                                   train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optim.apply_updates(state.params, updates, lr)
    return ProbeState(state.step + 1, params, batch_stats, opt_state), dict(loss=loss, lr=lr)

  return step


def _identity(_, x):
  return x


# Compiled once per (head, optimizer, input, mesh): repeated probes (online during pretraining,
# several runs in one process) reuse them. The lr is an argument, so the schedule is not baked in.
@functools.lru_cache(maxsize=16)
def _jitted_init(head: nn.Module, lars_args: tuple, example: jax.ShapeDtypeStruct, mesh: Mesh):
  tx = lars.lars(*lars_args)

  def init(rng):
    variables = head.init(rng, jnp.zeros(example.shape, example.dtype), train=False)
    return ProbeState(jnp.zeros((), jnp.int32), variables['params'], variables['batch_stats'],
                      tx.init(variables['params']))

  return jax.jit(init, out_shardings=sharding.replicated(mesh))


@functools.lru_cache(maxsize=16)
def _jitted_step(head: nn.Module, lars_args: tuple, featurize: Callable, mesh: Mesh):
  replicated = sharding.replicated(mesh)
  return jax.jit(make_train_step(head, lars.lars(*lars_args), featurize),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def _cached_batches(x: np.ndarray, y: np.ndarray, batch_size: int, total_steps: int, seed: int):
  """This process's rows of seeded per-epoch shuffles of cached features (every process holds
  them all), cut into global batches without remainder."""
  b, p = batch_size // jax.process_count(), jax.process_index()
  steps_per_epoch = len(x) // batch_size
  for step in range(total_steps):
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(x))
    rows = np.sort(order[i * batch_size:(i + 1) * batch_size][p * b:(p + 1) * b])
    yield {'x': x[rows], 'label': y[rows]}


def _augmented_batches(iterator, total_steps: int):
  for _ in range(total_steps):
    b = next(iterator)
    yield {'x': b['image'], 'label': b['label']}


def fit(head: nn.Module, probe_cfg, batches, total_steps: int, warmup_steps: int,
        example: jax.ShapeDtypeStruct, mesh: Mesh, *, seed: int, featurize: Callable = _identity,
        enc_params=None, what: str = 'probe') -> tuple[ProbeState, float]:
  """Trains `head` (replicated) for `total_steps` on `batches` of this process's parts of
  global batches {'x', 'label'}; `featurize(enc_params, x)` makes the head's input (`example`
  is its shape for one example). Returns the final state and the last step's loss."""
  pc = probe_cfg
  config_lib.check_batch_divides(pc.batch_size, mesh.size, jax.process_count())
  schedule = optim.lr_schedule(pc, pc.batch_size, total_steps, warmup_steps)
  lrs = np.asarray(jax.vmap(schedule)(jnp.arange(total_steps)), np.float32)
  lars_args = (pc.momentum, pc.trust_coefficient, pc.weight_decay)
  batch_sharding = sharding.batch_sharding(mesh)
  # XLA's CPU runtime can deadlock when consecutive programs with collectives overlap on a few
  # cores (simulated devices): there each step finishes before the next is dispatched.
  sync = mesh.devices.flat[0].platform == 'cpu'
  with sharding.use_mesh(mesh):
    state = _jitted_init(head, lars_args, example, mesh)(jax.random.key(seed))
    step_fn = _jitted_step(head, lars_args, featurize, mesh)
    progress = features_lib.Progress(what, total_steps, unit='steps')
    metrics = None
    for step, local in enumerate(batches, 1):
      batch = sharding.global_batch(local, batch_sharding)
      state, metrics = step_fn(state, enc_params, batch['x'], batch['label'], lrs[step - 1])
      if sync:
        jax.block_until_ready(state.step)
      if progress.enabled and (step % pc.log_every_steps == 0 or step == total_steps):
        m = jax.device_get(metrics)
        progress.update(step, f'loss {float(m["loss"]):.4f} | lr {float(m["lr"]):.3g}')
  return state, float(jax.device_get(metrics)['loss'])


def _info(probe_cfg, total_steps: int, warmup_steps: int, final_loss: float, t0: float) -> dict:
  pc = probe_cfg
  return dict(epochs=pc.epochs, steps=total_steps, warmup_steps=warmup_steps,
              batch_size=pc.batch_size, peak_lr=optim.peak_lr(pc, pc.batch_size),
              final_loss=final_loss, bn_statistics='global batch',
              train_seconds=round(time.perf_counter() - t0, 2))


def train_on_features(protocol: str, probe_cfg, x: np.ndarray, y: np.ndarray, num_classes: int,
                      mesh: Mesh, seed: int) -> tuple[nn.Module, ProbeState, dict]:
  """`protocol`'s head trained on cached features `x` (n, D) (attentive: tokens (n, 1+N, D))
  with labels `y`, every process holding them all. -> (head, state, info)."""
  t0 = time.perf_counter()
  total_steps, warmup_steps = schedule_lengths(probe_cfg, len(y))
  head = make_head(protocol, probe_cfg, num_classes)
  example = jax.ShapeDtypeStruct((1,) + x.shape[1:], jnp.float32)
  state, loss = fit(head, probe_cfg, _cached_batches(x, y, probe_cfg.batch_size, total_steps, seed),
                    total_steps, warmup_steps, example, mesh, seed=seed,
                    what=f'{protocol} probe (cached)')
  return head, state, _info(probe_cfg, total_steps, warmup_steps, loss, t0)


def train(cfg, protocol: str, model: mae.MAE, enc_params, mesh: Mesh,
          train_set: eval_subset.Subset) -> tuple[nn.Module, ProbeState, dict]:
  """Trains `protocol`'s head on the frozen encoder over `train_set` (records of
  cfg.data.train_split) in cfg.probe.mode; returns the head, its state and what was done."""
  pc = cfg.probe
  pool = head_input(protocol, pc)
  described = dict(mode=pc.mode, mode_description=MODES[pc.mode], train=train_set.description,
                   pool=pool, num_classes=train_set.num_classes)
  size = model.spec.image_size
  encode = features_lib.pooled_fn(model, pool)
  with sharding.use_mesh(mesh):
    example = jax.eval_shape(encode, enc_params, jnp.zeros((1, size, size, 3), jnp.float32))
  if pc.mode == 'cached':
    # Every process holds the whole cache: (n, D) floats, or (n, 1 + N, D) tokens (attentive).
    gib = len(train_set.indices) * example.size * 4 / 2 ** 30
    cached = features_lib.extract(cfg.data, cfg.data.train_split, train_set.indices, model,
                                  enc_params, mesh, pools=(pool,), batch_size=cfg.eval.batch_size,
                                  what=f'{protocol} probe: caching train features ({gib:.2f} GiB)')
    head, state, info = train_on_features(protocol, pc, cached[pool], cached['label'],
                                          train_set.num_classes, mesh, cfg.seed)
    return head, state, {**described, **info}

  t0 = time.perf_counter()
  total_steps, warmup_steps = schedule_lengths(pc, len(train_set.indices))
  head = make_head(protocol, pc, train_set.num_classes)
  data_cfg = cfg.data.copy_and_resolve_references()
  data_cfg.crop_scale = tuple(pc.crop_scale)
  source = eval_subset.SubsetSource(sources.make_source(cfg.data, cfg.data.train_split),
                                    train_set.indices)
  augmented = iter(pipeline.build_train_dataset(
      data_cfg, image_size=size, batch_size=pc.batch_size // jax.process_count(), seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), source=source))
  with contextlib.closing(augmented):  # stops grain's worker processes
    state, loss = fit(head, pc, _augmented_batches(augmented, total_steps), total_steps,
                      warmup_steps, example, mesh, seed=cfg.seed, featurize=encode,
                      enc_params=enc_params, what=f'{protocol} probe (augment)')
  return head, state, {**described, **_info(pc, total_steps, warmup_steps, loss, t0)}


@functools.lru_cache(maxsize=16)
def _predict_fn(head: nn.Module, featurize: Callable, top: int) -> Callable:
  def predict(both, x):
    p, head_variables = both
    _, ranked = jax.lax.top_k(head.apply(head_variables, featurize(p, x), train=False), top)
    return {'top': ranked}
  return predict


def _accuracy(head: nn.Module, state: ProbeState, featurize, params, batches, mesh: Mesh,
              total: int, what: str) -> dict[str, float]:
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  top = min(5, head.num_classes)
  out = features_lib.stream(_predict_fn(head, featurize, top), (params, variables), batches, mesh,
                            total=total, what=what)
  hits = out['top'] == out['label'][:, None]
  result = {'top1': float(hits[:, 0].mean()), 'num_test': int(len(hits))}
  if top == 5:
    result['top5'] = float(hits.any(axis=1).mean())
  return result


def accuracy_on_features(head: nn.Module, state: ProbeState, x: np.ndarray, y: np.ndarray,
                         mesh: Mesh, batch_size: int = 256) -> dict[str, float]:
  """Top-1 (and top-5 with 5+ classes) accuracy of the trained head on cached features."""
  return _accuracy(head, state, _identity, None, features_lib.host_batches(x, y, batch_size),
                   mesh, len(y), 'probe: test')


def evaluate(cfg, protocol: str, head: nn.Module, state: ProbeState, model: mae.MAE, enc_params,
             mesh: Mesh, test_set: eval_subset.Subset) -> dict[str, float]:
  """Top-1 (and top-5) accuracy of the trained head on `test_set` (records of
  cfg.data.eval_split), streamed once through encoder + head (center crop)."""
  encode = features_lib.pooled_fn(model, head_input(protocol, cfg.probe))
  batches = pipeline.eval_batches(cfg.data, cfg.data.eval_split, test_set.indices,
                                  image_size=model.spec.image_size,
                                  batch_size=cfg.eval.batch_size,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  return _accuracy(head, state, encode, enc_params, batches, mesh, len(test_set.indices),
                   f'{protocol} probe: test')
