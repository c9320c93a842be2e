"""grain pipelines: the per-process training stream; streamed and in-memory eval splits."""
import os

import grain
import numpy as np

from data import sources
from data import transforms


def build_train_dataset(cfg, *, image_size: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        start_batch: int = 0, source: sources.Source | None = None,
                        augment: grain.transforms.RandomMap | None = None) -> grain.IterDataset:
  """Infinite stream of this process's batches of normalized f32 'image' (b, S, S, 3) and i32
  'label' and 'skipped' (b,), where skipped is 1 for an example that stands in for an unreadable
  record.

  Every epoch is a new global shuffle cut into global batches of b * process_count positions;
  process p reads the p-th slice of b positions of each (the remainder of an epoch that does not
  fill a global batch is left out), so processes never read each other's examples and the global
  batch, assembled in process order, is the same for every process count. Augmentations are
  seeded by (seed, epoch, position in the global order). Batches are formed before the
  multiprocess split, so the stream is the same for every cfg.num_workers; only the iterator
  state's layout differs. `start_batch` skips that many batches without reading them (resuming
  when no iterator state fits, e.g. after a change of process count). `source` replaces the
  records of cfg.train_split (e.g. a probe's class-balanced subset of it). `augment` (e.g.
  data.augment.FinetuneAugment) runs on each cropped uint8 example, seeded the same way, and
  returns it normalized (the batch-level normalization is then skipped).
  """
  source = sources.make_source(cfg, cfg.train_split) if source is None else source
  if len(source) < batch_size * process_count:
    raise sources.DataError(
        f'Train split {cfg.train_split!r} has {len(source)} examples, fewer than one global batch '
        f'({batch_size} x {process_count} processes); lower batch_size or add data.')
  crop = transforms.RandomResizedCrop(image_size, cfg.crop_scale, cfg.crop_ratio, cfg.flip)
  ds = (grain.MapDataset.source(source)
        .seed(seed)
        .shuffle()  # Reshuffles every epoch: repeat() passes the epoch on in the index.
        .random_map(crop))
  if augment is not None:  # a later random_map draws from its own stream (grain seeds by depth)
    ds = ds.random_map(augment)
  ds = (GlobalBatchShard(ds, batch_size, process_index, process_count)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        [start_batch:])
  if augment is None:
    ds = ds.map(transforms.Normalize(cfg.mean, cfg.std))
  ds = ds.to_iter_dataset(_read_options(cfg.num_workers, elements_per_thread=1))
  if cfg.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return ds


class GlobalBatchShard(grain.MapDataset):
  """Process p's share of every global batch: local position j of an epoch reads global position
  (j // b) * b * P + p * b + j % b (b = local batch, P = processes). Later epochs are passed on as
  parent positions epoch * len(parent) + ..., so reshuffling and augmentation see the epoch."""

  def __init__(self, parent: grain.MapDataset, local_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._b, self._p, self._n = local_batch, process_index, process_count
    self._parent_length = len(parent)
    self._length = len(parent) // (local_batch * process_count) * local_batch

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, j = divmod(index, self._length)
    k, r = divmod(j, self._b)
    return self._parent[epoch * self._parent_length + (k * self._n + self._p) * self._b + r]

  def __str__(self) -> str:
    return f'GlobalBatchShard(batch={self._b}, process={self._p}/{self._n})'


def load_eval_split(cfg, split: str, *, image_size: int, max_examples: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The first `max_examples` (default all) readable examples of `split`, in order, as normalized
  float32 (n, S, S, 3) images (see transforms.eval_resize) and int32 (n,) labels.

  Unreadable records are left out (not replaced by their neighbour), so n can be smaller.
  """
  source = sources.make_source(cfg, split)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  ds = (grain.MapDataset.source(source)[:n]
        .filter(lambda ex: ex['skipped'] == 0)
        .map(transforms.EvalResize(image_size))
        .to_iter_dataset(_read_options(0, elements_per_thread=8)))
  images = np.empty((n, image_size, image_size, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  k = 0
  for k, ex in enumerate(ds, 1):
    images[k - 1], labels[k - 1] = ex['image'], ex['label']
  if k == 0:  # e.g. eval.num_reconstructions=0
    return np.zeros((0, image_size, image_size, 3), np.float32), labels[:0]
  return transforms.normalize(images[:k], cfg.mean, cfg.std), labels[:k]


def eval_batches(cfg, split: str, indices: np.ndarray, *, image_size: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """This process's part of fixed-size batches over the records `indices` of `split`, in order:
  normalized f32 'image' (b, S, S, 3) of the eval view (transforms.eval_resize), i32 'label' and
  i32 'valid' (b,), b = batch_size / process_count. Streams: only a few batches are in memory.

  The global order is `indices` padded to a multiple of batch_size; global batch t holds positions
  t * batch_size + [0, batch_size), and process p reads the p-th slice of b of each, so the
  batches assembled in process order are the same for every process count. 'valid' is 0 for the
  padding (black images, never read) and for unreadable records (their stand-ins).
  """
  b = batch_size // process_count
  global_batches = -(-len(indices) // batch_size)
  positions = (np.arange(global_batches)[:, None] * batch_size + process_index * b
               + np.arange(b)[None]).ravel()
  rows = _EvalRows(sources.make_source(cfg, split), np.asarray(indices), positions, image_size)
  return (grain.MapDataset.source(rows)
          .map(transforms.EvalResize(image_size))
          .batch(b)
          .map(transforms.Normalize(cfg.mean, cfg.std))
          .to_iter_dataset(_read_options(0, elements_per_thread=1)))


class _EvalRows:
  """Record indices[positions[j]], or a black padding image past the end of `indices`."""

  def __init__(self, source, indices: np.ndarray, positions: np.ndarray, image_size: int):
    self._source, self._indices, self._positions = source, indices, positions
    self._blank = {'image': np.zeros((image_size, image_size, 3), np.uint8),
                   'label': np.int32(0), 'valid': np.int32(0)}

  def __len__(self) -> int:
    return len(self._positions)

  def __getitem__(self, j: int) -> dict[str, np.ndarray]:
    k = self._positions[j]
    if k >= len(self._indices):
      return self._blank
    ex = self._source[self._indices[k]]
    return {'image': ex['image'], 'label': ex['label'], 'valid': np.int32(ex['skipped'] == 0)}


def _read_options(num_workers: int, elements_per_thread: int) -> grain.ReadOptions:
  # Threads decode in parallel within each process (PIL and numpy release the GIL), with the cores
  # split between worker processes. Train elements are whole batches: keep few of them buffered.
  cpus = len(os.sched_getaffinity(0))
  threads = max(1, min(16, cpus // max(1, num_workers)))
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=threads * elements_per_thread + 2)
