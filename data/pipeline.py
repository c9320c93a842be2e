"""grain pipelines: the infinite, per-process training stream and in-memory eval splits."""
import os

import grain
import numpy as np

from data import sources
from data import transforms


def build_train_dataset(cfg, *, image_size: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Infinite stream of this process's batches of normalized f32 'image' (b, S, S, 3) and i32
  'label' and 'skipped' (b,), where skipped counts the unreadable records replaced by the example.

  Every epoch is a new global shuffle of which process p takes positions p, p + P, p + 2P, ... (the
  remainder of len % P is left out of that epoch), so processes never read each other's examples
  (but for the stand-in of an unreadable record, which is simply the next record of the source).
  Augmentations are seeded by (seed, epoch, position in the global order). Batches are formed before
  the multiprocess split, so the stream is the same for every cfg.num_workers; only the iterator
  state's layout differs.
  """
  source = sources.make_source(cfg, cfg.train_split)
  per_process = len(source) // process_count
  if not per_process:
    raise sources.DataError(f'Train split {cfg.train_split!r} has {len(source)} examples, fewer '
                            f'than the {process_count} processes')
  crop = transforms.RandomResizedCrop(image_size, cfg.crop_scale, cfg.crop_ratio, cfg.flip)
  ds = (grain.MapDataset.source(source)
        .seed(seed)
        .shuffle()  # Reshuffles every epoch: repeat() passes the epoch on in the index.
        .random_map(crop)
        [process_index:per_process * process_count:process_count]
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .map(transforms.Normalize(cfg.mean, cfg.std))
        .to_iter_dataset(_read_options(cfg.num_workers, elements_per_thread=1)))
  if cfg.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return ds


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
  return transforms.normalize(images[:k], cfg.mean, cfg.std), labels[:k]


def _read_options(num_workers: int, elements_per_thread: int) -> grain.ReadOptions:
  # Threads decode in parallel within each process (PIL and numpy release the GIL), with the cores
  # split between worker processes. Train elements are whole batches: keep few of them buffered.
  cpus = len(os.sched_getaffinity(0))
  threads = max(1, min(16, cpus // max(1, num_workers)))
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=threads * elements_per_thread + 2)
