"""Weighted k-nearest-neighbour classification of frozen features (the DINO kNN protocol).

Features are L2-normalized; each query takes its k most cosine-similar bank features, which vote
for their label with weight exp(similarity / temperature) (DINO: k=20, T=0.07; also reported
k=10, 100, 200); the class with the largest total wins (ties go to the lowest class id). Runs on
the host in numpy, query batch by query batch, so any bank size fits memory.
"""
from typing import Sequence

import numpy as np

_SIMS_BUDGET = 2 ** 27  # similarities held at once (512 MB of float32) when batch_size is None


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                *, ks: Sequence[int] = (20,), temperature: float = 0.07,
                num_classes: int | None = None, batch_size: int | None = None,
                progress=None) -> dict[int, np.ndarray]:
  """{k: (n_test,) predicted labels} for every k of `ks` (one similarity pass for all of them).

  Queries are processed `batch_size` at a time (default: as many as keep batch * bank size under
  2**27 floats). `progress`, if given, is called with the number of queries done.
  """
  train = _l2_normalize(train_features)
  test = _l2_normalize(test_features)
  train_labels = np.asarray(train_labels).astype(np.int64)
  if num_classes is None:
    num_classes = int(train_labels.max()) + 1
  # A k beyond the bank's size votes with the whole bank.
  used = {k: min(k, len(train)) for k in ks}
  k_max = max(used.values())
  batch_size = batch_size or max(1, min(4096, _SIMS_BUDGET // max(len(train), 1)))

  preds = {k: np.empty(len(test), np.int64) for k in used}
  for start in range(0, len(test), batch_size):
    sims = test[start:start + batch_size] @ train.T
    n = len(sims)
    # argpartition finds the top k_max without sorting all similarities; sorting only those
    # gives every smaller k as a prefix.
    idx = np.argpartition(-sims, k_max - 1, axis=1)[:, :k_max]
    top = np.take_along_axis(sims, idx, axis=1)
    order = np.argsort(-top, axis=1, kind='stable')
    idx, top = np.take_along_axis(idx, order, axis=1), np.take_along_axis(top, order, axis=1)
    # Shifting by the row max scales a row's votes uniformly (same argmax) and avoids overflow.
    weights = np.exp((top - top[:, :1]) / temperature)
    flat = np.arange(n)[:, None] * num_classes + train_labels[idx]
    for k, m in used.items():
      # Scatter-add the votes of the m nearest into a flat (n, num_classes) table.
      votes = np.bincount(flat[:, :m].ravel(), weights=weights[:, :m].ravel(),
                          minlength=n * num_classes)
      preds[k][start:start + n] = votes.reshape(n, num_classes).argmax(axis=1)
    if progress is not None:
      progress(start + n)
  return preds


def knn_accuracies(train_features: np.ndarray, train_labels: np.ndarray,
                   test_features: np.ndarray, test_labels: np.ndarray, **kwargs
                   ) -> dict[int, float]:
  """{k: top-1 accuracy in [0, 1]}; keyword arguments as `knn_predict`."""
  test_labels = np.asarray(test_labels).astype(np.int64)
  preds = knn_predict(train_features, train_labels, test_features, **kwargs)
  return {k: float((p == test_labels).mean()) for k, p in preds.items()}


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, batch_size: int | None = None) -> float:
  """The weighted kNN top-1 accuracy in [0, 1] for one k."""
  (acc,) = knn_accuracies(train_features, train_labels, test_features, test_labels, ks=(k,),
                          temperature=temperature, num_classes=num_classes,
                          batch_size=batch_size).values()
  return acc
