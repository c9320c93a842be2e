"""Frozen-encoder features, streamed: fixed-size batches of a split through `MAE.encode` (all
patches, no masking), with only the pooled outputs kept on the host.

Pools: 'cls' (token 0) and 'avg' (mean of the patch tokens) after the encoder's final norm, as the
MAE linear probe and our kNN read them; 'cls_prenorm' / 'avg_prenorm' the same before it (the
efficient-probing benchmark's kNN of MAE ViT-B, 35.6%, reads the cls token before the final norm;
after it, 16.1%); 'tokens' every token after the norm (B, 1+N, D), for attentive probes.
"""
import functools
import time
from typing import Callable, Iterable

import jax
import numpy as np
from jax.sharding import Mesh

from data import pipeline
from mim import metrics as metrics_lib
from mim import sharding
from mim.models import mae

POOLS = ('cls', 'avg', 'cls_prenorm', 'avg_prenorm', 'tokens')


def pool_names(pool: str) -> tuple[str, ...]:
  """'both' -> ('cls', 'avg'); any other name of POOLS -> (name,)."""
  return ('cls', 'avg') if pool == 'both' else (pool,)


def _pool(tokens: jax.Array, name: str) -> jax.Array:
  if name.startswith('cls'):
    return tokens[:, 0]
  if name.startswith('avg'):
    return tokens[:, 1:].mean(axis=1)
  return tokens


def encoder_outputs(model: mae.MAE, params, images: jax.Array, pools: tuple[str, ...]
                    ) -> dict[str, jax.Array]:
  """{pool: output} of the frozen encoder on all patches of `images` (gradients stopped)."""
  raw = None
  if any(p.endswith('_prenorm') for p in pools):
    # The final norm's input is the last block's output: captured, so vit.py needs no option.
    last_block = f'encoderblock_{model.spec.depth - 1}'
    tokens, state = model.apply(
        {'params': params}, images, method=mae.MAE.encode, mutable=['intermediates'],
        capture_intermediates=lambda mdl, method: mdl.name == last_block and method == '__call__')
    (raw,) = jax.tree.leaves(state['intermediates'])
  else:
    tokens = model.apply({'params': params}, images, method=mae.MAE.encode)
  out = {p: _pool(raw if p.endswith('_prenorm') else tokens, p) for p in pools}
  return jax.tree.map(jax.lax.stop_gradient, out)


@functools.lru_cache(maxsize=32)
def encoder_fn(model: mae.MAE, pools: tuple[str, ...]) -> Callable:
  """(params, images) -> encoder_outputs; one function object per (model, pools), so its
  compilations are reused by every `stream` over it."""
  return lambda params, images: encoder_outputs(model, params, images, pools)


@functools.lru_cache(maxsize=32)
def pooled_fn(model: mae.MAE, pool: str) -> Callable:
  """(params, images) -> the one output `pool` (cached as `encoder_fn`)."""
  return lambda params, images: encoder_outputs(model, params, images, (pool,))[pool]


class Progress:
  """Prints `what: done/total | x/s | ETA` on process 0 at most every `every_s` seconds."""

  def __init__(self, what: str, total: int, unit: str = 'examples', every_s: float = 10.0):
    self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
    self.enabled = jax.process_index() == 0
    self.t0 = self.t_last = time.perf_counter()

  def update(self, done: int, extra: str = '') -> None:
    now = time.perf_counter()
    if not self.enabled or (now - self.t_last < self.every_s and done < self.total):
      return
    self.t_last = now
    rate = done / max(now - self.t0, 1e-9)
    eta = (f'ETA {metrics_lib.format_duration((self.total - done) / rate)}' if done < self.total
           else f'done in {metrics_lib.format_duration(now - self.t0)}')
    print(f'{self.what}: {done}/{self.total} {self.unit} | {rate:.1f} {self.unit}/s | {eta}'
          + (f' | {extra}' if extra else ''), flush=True)


def stream(fn: Callable, params, batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, *,
           total: int, what: str) -> dict[str, np.ndarray]:
  """Host arrays of `fn(params, batch)`'s outputs over the valid rows of every batch, in order.

  `batches` are this process's parts of global batches ('image', 'label', 'valid'); the global
  batch is sharded over the mesh's batch axes and the outputs come back replicated, so every
  process holds all of them. The input pipeline reads ahead in its own threads; each batch's
  outputs are fetched before the next is dispatched (two independent programs with collectives
  in flight can deadlock XLA's CPU runtime).
  """
  with sharding.use_mesh(mesh):
    jitted = _jit_with_labels(fn, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    progress = Progress(what, total)
    chunks, done = [], 0
    for local in batches:
      host = jax.device_get(jitted(params, sharding.global_batch(local, batch_sharding)))
      keep = host.pop('valid').astype(bool)
      chunks.append({k: v[keep] for k, v in host.items()})
      done += int(keep.sum())
      progress.update(done)
  if not chunks:
    raise ValueError(f'{what}: no batches')
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


@functools.lru_cache(maxsize=32)
def _jit_with_labels(fn: Callable, mesh: Mesh):
  def run(p, batch):
    return {**fn(p, batch['image']), 'label': batch['label'], 'valid': batch['valid']}
  return jax.jit(run, out_shardings=sharding.replicated(mesh))


def extract(data_cfg, split: str, indices: np.ndarray, model: mae.MAE, params, mesh: Mesh, *,
            pools: tuple[str, ...], batch_size: int, what: str = '') -> dict[str, np.ndarray]:
  """{pool: (n, ...) features, 'label': (n,)} of the records `indices` of `split` (eval view),
  streamed in global batches of `batch_size` (padded: one compilation)."""
  batches = pipeline.eval_batches(data_cfg, split, indices, image_size=model.spec.image_size,
                                  batch_size=batch_size, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  return stream(encoder_fn(model, tuple(pools)), params, batches, mesh, total=len(indices),
                what=what or f'features {data_cfg.name}[{split}]')


def host_batches(image: np.ndarray, label: np.ndarray, batch_size: int):
  """This process's parts of padded global batches ('image', 'label', 'valid') over host arrays
  that every process holds whole (cached features): the input `stream` takes."""
  b, p = batch_size // jax.process_count(), jax.process_index()
  for start in range(0, len(label), batch_size):
    rows = np.arange(start + p * b, start + (p + 1) * b)
    valid = rows < len(label)
    rows = np.where(valid, rows, 0)
    yield {'image': image[rows], 'label': label[rows], 'valid': valid.astype(np.int32)}
