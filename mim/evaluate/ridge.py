"""Closed-form ridge classifier on frozen features: the online probes' fast linear probe.

The estimator of scikit-learn's `RidgeClassifier(alpha)` on standardized features: targets one-hot
in {-1, 1}; features and targets centered on the train set, so the intercept is not penalized;
W = (Xc^T Xc + alpha I)^-1 Xc^T Yc, b = mean(Y) - mean(X) W; the class is argmax(X W + b).
Standardizing first (the train mean and std; constant features keep scale 1) makes alpha mean
the same for any feature scale (cls after the final norm, pre-norm tokens, raw pixels).
One D x D solve in float64 on the host: no training loop, no lr, deterministic; seconds for a
10k x 1024 bank.
"""
from typing import NamedTuple

import numpy as np


class Ridge(NamedTuple):
  mean: np.ndarray    # (D,) train feature mean
  scale: np.ndarray   # (D,) train feature std (1 where constant)
  weight: np.ndarray  # (D, C) on standardized features
  bias: np.ndarray    # (C,)


def fit(x: np.ndarray, y: np.ndarray, *, alpha: float = 1.0, num_classes: int | None = None
        ) -> Ridge:
  """The ridge classifier of (n, D) features `x` and (n,) integer labels `y`."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y).astype(np.int64)
  num_classes = num_classes or int(y.max()) + 1
  mean = x.mean(axis=0)
  scale = x.std(axis=0)
  scale[scale == 0] = 1.0
  xs = (x - mean) / scale  # centered too: the intercept stays out of the penalty
  targets = -np.ones((len(y), num_classes))
  targets[np.arange(len(y)), y] = 1.0
  t_mean = targets.mean(axis=0)
  gram = xs.T @ xs
  gram[np.diag_indices_from(gram)] += alpha
  weight = np.linalg.solve(gram, xs.T @ (targets - t_mean))
  return Ridge(mean, scale, weight, t_mean)


def predict(model: Ridge, x: np.ndarray) -> np.ndarray:
  """(n,) predicted labels; ties go to the lowest class id."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return (((x - model.mean) / model.scale) @ model.weight + model.bias).argmax(axis=1)


def ridge_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                   test_features: np.ndarray, test_labels: np.ndarray, *, alpha: float = 1.0,
                   num_classes: int | None = None) -> float:
  """Top-1 accuracy in [0, 1] of the ridge classifier fit on the train features."""
  model = fit(train_features, train_labels, alpha=alpha, num_classes=num_classes)
  return float((predict(model, test_features) == np.asarray(test_labels)).mean())
