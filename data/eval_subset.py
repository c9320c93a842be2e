"""Seeded, class-balanced subsets of a split, for evaluation banks and probe training sets.

The first N records of a split are not a sample: image folders are sorted by class, so the first
10,000 ImageNet files cover about 8 classes. A subset here is a function of (labels, size, seed):
each class gets size // C records (the first size % C classes of a seeded class order one more),
taken in the order of a seeded permutation of the split; a class with too few records gives all
it has and the shortfall is filled from the rest of the permutation. Labels come from the source
without decoding images where it holds them (digits, npz, image folders); otherwise (TFDS) the
records are read in permutation order only until every quota is filled.
"""
import concurrent.futures
import dataclasses
import os

import numpy as np

from data import npz
from data import sources

_LABEL_CHUNK = 1024  # records whose labels are read at a time when the source must decode them


@dataclasses.dataclass(frozen=True)
class Subset:
  """Record indices of a split (ascending, so files are read in storage order) and their labels
  (None for a whole split whose source does not hold them: the records carry them)."""
  indices: np.ndarray
  labels: np.ndarray | None
  num_classes: int
  description: str   # what was taken, for the output: 'all 360 records' or '... seed 0'


def known_labels(source: sources.Source) -> np.ndarray | None:
  """All labels of `source` when it holds them without decoding images, else None."""
  # Sources keep their labels private; reading them here, inside the data package, avoids
  # decoding every image of a split just to learn its classes.
  if isinstance(source, (sources.ArraySource, sources.FolderSource)):
    return np.asarray(source._labels, np.int64)  # pylint: disable=protected-access
  if isinstance(source, sources.NpzSource):
    key = source._prefix + 'labels'  # pylint: disable=protected-access
    return np.concatenate([np.asarray(npz.load(f, key), np.int64)
                           for f in source._files])  # pylint: disable=protected-access
  return None


def num_classes_of(source: sources.Source, labels: np.ndarray | None = None) -> int | None:
  """The number of classes: max label + 1 of known labels, or the TFDS ClassLabel size."""
  if labels is not None and len(labels):
    return int(labels.max()) + 1
  info = getattr(getattr(source, '_source', None), 'dataset_info', None)
  label = info.features['label'] if info is not None else None
  return getattr(label, 'num_classes', None)


def class_quotas(size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
  """size // C per class, plus one for the first size % C classes of a seeded class order."""
  quotas = np.full(num_classes, size // num_classes, np.int64)
  quotas[rng.permutation(num_classes)[:size % num_classes]] += 1
  return quotas


def balanced_indices(label_of, num_records: int, size: int, num_classes: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(indices ascending, their labels) of a class-balanced subset of `size` records.

  `label_of(positions)` returns the labels of those record indices; it is called on consecutive
  chunks of a seeded permutation, and no more chunks are read once every class quota is full.
  """
  rng = np.random.default_rng(seed)
  order = rng.permutation(num_records)
  quotas = class_quotas(size, num_classes, rng)
  counts = np.zeros(num_classes, np.int64)
  taken, seen_labels, end = [], [], 0
  while end < num_records and (counts < quotas).any():
    chunk = order[end:end + max(_LABEL_CHUNK, size)]
    labels = np.asarray(label_of(chunk), np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
      raise sources.DataError(f'labels must lie in [0, {num_classes}); found {labels.min()} to '
                              f'{labels.max()}')
    # A record is taken while its class is under quota: its rank among the chunk's records of
    # the same class (in permutation order), offset by what earlier chunks took.
    by_class = np.argsort(labels, kind='stable')
    starts = np.searchsorted(labels[by_class], labels[by_class])
    rank = np.empty(len(labels), np.int64)
    rank[by_class] = np.arange(len(labels)) - starts
    take = rank + counts[labels] < quotas[labels]
    taken.append(take)
    seen_labels.append(labels)
    counts += np.bincount(labels[take], minlength=num_classes)
    end += len(chunk)
  take, labels = np.concatenate(taken), np.concatenate(seen_labels)
  # Classes too small for their quota: the first records not taken, in permutation order.
  short = size - int(take.sum())
  if short > 0:
    take[np.flatnonzero(~take)[:short]] = True
  picked = order[:end][take]
  ascending = np.argsort(picked)
  return picked[ascending], labels[take][ascending]


def select(cfg, split: str, size: int, seed: int, num_classes: int = 0) -> Subset:
  """The class-balanced subset of `size` records of `split` (all records if size <= 0 or size
  >= the split). `num_classes` = 0 takes it from the data."""
  source = sources.make_source(cfg, split)
  n = len(source)
  labels = known_labels(source)
  num_classes = num_classes or num_classes_of(source, labels)
  if size <= 0 or size >= n:
    if not num_classes:  # neither held by the source nor in its metadata: read them all
      labels = _read_labels(source, np.arange(n))
      num_classes = int(labels.max()) + 1
    return Subset(np.arange(n), labels, num_classes, f'all {n} records of {cfg.name}[{split}]')
  if not num_classes:
    raise sources.DataError(f'The number of classes of {cfg.name}[{split}] is unknown; set '
                            'probe.num_classes.')
  label_of = ((lambda idx: labels[idx]) if labels is not None
              else (lambda idx: _read_labels(source, idx)))
  indices, subset_labels = balanced_indices(label_of, n, size, num_classes, seed)
  per_class = np.bincount(subset_labels, minlength=num_classes)
  return Subset(indices, subset_labels, num_classes,
                f'{len(indices)} of {n} records of {cfg.name}[{split}], class-balanced '
                f'({per_class.min()}-{per_class.max()} per class over {num_classes} classes), '
                f'seed {seed}')


def _read_labels(source: sources.Source, indices: np.ndarray) -> np.ndarray:
  # Decoding releases the GIL (PIL, tfds): threads read in parallel.
  with concurrent.futures.ThreadPoolExecutor(min(16, len(os.sched_getaffinity(0)))) as pool:
    return np.fromiter(pool.map(lambda i: source[i]['label'], indices.tolist()), np.int64,
                       count=len(indices))


class SubsetSource(sources.Source):
  """The records `indices` of `source`, as a source of their own (for the train pipeline)."""

  def __init__(self, source: sources.Source, indices: np.ndarray):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._source[self._indices[index]]
