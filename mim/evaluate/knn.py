"""Weighted k-nearest-neighbour classification of frozen features (the DINO kNN protocol)."""
import numpy as np


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, batch_size: int = 1024) -> float:
  """Returns the weighted kNN top-1 accuracy in [0, 1].

  Features are L2-normalized; each test feature takes its k most cosine-similar training features,
  which vote for their label with weight exp(similarity / temperature); the class with the largest
  total wins (ties go to the lowest class id). Test features are processed `batch_size` at a time,
  so peak memory is about batch_size * len(train_features) floats.
  """
  train = _l2_normalize(train_features)
  test = _l2_normalize(test_features)
  train_labels = np.asarray(train_labels).astype(np.int64)
  test_labels = np.asarray(test_labels).astype(np.int64)
  if num_classes is None:
    num_classes = int(train_labels.max()) + 1
  k = min(k, len(train))

  correct = 0
  for start in range(0, len(test), batch_size):
    sims = test[start:start + batch_size] @ train.T
    n = len(sims)
    # argpartition finds the top k without sorting all similarities; their order does not matter.
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(sims, idx, axis=1)
    # Shifting by the row max scales a row's votes uniformly (same argmax) and avoids overflow.
    weights = np.exp((top - top.max(axis=1, keepdims=True)) / temperature)
    # Scatter-add the votes into a flat (n, num_classes) table.
    flat = np.arange(n)[:, None] * num_classes + train_labels[idx]
    votes = np.bincount(flat.ravel(), weights=weights.ravel(), minlength=n * num_classes)
    pred = votes.reshape(n, num_classes).argmax(axis=1)
    correct += int((pred == test_labels[start:start + batch_size]).sum())
  return correct / len(test)
