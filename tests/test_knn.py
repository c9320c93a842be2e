"""Tests for mim.evaluate.knn."""
import numpy as np
import pytest

from mim.evaluate.knn import knn_accuracies, knn_accuracy, knn_predict

# Test point (1, 0): its nearest neighbour (cosine 1.0) is class 0, but two class-1 points follow
# at cosine 0.8 and 0.6. Features are scaled arbitrarily: only directions matter.
_TRAIN = np.array([[3.0, 0.0], [0.4, -0.3], [1.2, 1.6], [-2.0, 0.0]])  # cos 1.0, 0.8, 0.6, -1.0
_LABELS = np.array([0, 1, 1, 0])
_TEST = np.array([[5.0, 0.0]])


@pytest.mark.parametrize("k,temperature,expected", [
    (1, 0.07, 0),  # Only the nearest neighbour votes.
    # k=3, T=1: class 0 gets e^1 = 2.72 < class 1 with e^0.8 + e^0.6 = 4.05.
    (3, 1.0, 1),
    # k=3, T=0.07: class 0 gets e^14.3 > class 1 with e^11.4 + e^8.6.
    (3, 0.07, 0),
    # k=4, T=1: class 0 gets e^1 + e^-1 = 3.09, still < 4.05.
    (4, 1.0, 1),
])
def test_hand_computed(k, temperature, expected):
  for label, acc in ((expected, 1.0), (1 - expected, 0.0)):
    assert knn_accuracy(_TRAIN, _LABELS, _TEST, np.array([label]), k=k,
                        temperature=temperature) == acc


def test_hand_computed_fraction():
  test = np.array([[5.0, 0.0], [0.0, 1.0], [-1.0, 0.1]])  # Predicted 1, 1, 0 with k=3, T=1.
  assert knn_accuracy(_TRAIN, _LABELS, test, np.array([1, 0, 0]), k=3,
                      temperature=1.0) == pytest.approx(2 / 3)


def test_separable_clusters():
  rng = np.random.default_rng(0)
  num_classes, dim = 5, 16
  centers = 10.0 * rng.normal(size=(num_classes, dim))
  train_labels = rng.integers(num_classes, size=500)
  test_labels = rng.integers(num_classes, size=200)
  train = centers[train_labels] + rng.normal(size=(500, dim))
  test = centers[test_labels] + rng.normal(size=(200, dim))
  assert knn_accuracy(train, train_labels, test, test_labels, batch_size=64) == 1.0


def test_random_labels_chance_level_and_batching():
  rng = np.random.default_rng(1)
  num_classes = 10
  train, test = rng.normal(size=(3000, 32)), rng.normal(size=(2000, 32))
  train_labels = rng.integers(num_classes, size=3000)
  test_labels = rng.integers(num_classes, size=2000)
  acc = knn_accuracy(train, train_labels, test, test_labels, num_classes=num_classes)
  assert abs(acc - 1 / num_classes) < 0.03
  # Batching only changes memory use, not the result.
  assert knn_accuracy(train, train_labels, test, test_labels, num_classes=num_classes,
                      batch_size=7) == acc


def test_small_temperature_does_not_overflow():
  # Unshifted, exp(sim / 0.005) is inf for all three neighbours, the classes tie and argmax would
  # return class 0; the nearest neighbour's class 1 must win.
  assert knn_accuracy(_TRAIN, 1 - _LABELS, _TEST, np.array([1]), k=3, temperature=0.005) == 1.0


def _sklearn_knn_accuracy(train, train_labels, test, test_labels, k, temperature):
  from sklearn import neighbors  # pylint: disable=g-import-not-at-top
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  # Cosine distance d = 1 - similarity, so the DINO vote weight exp(sim / T) is exp((1 - d) / T).
  clf = neighbors.KNeighborsClassifier(
      n_neighbors=k, metric='cosine', algorithm='brute',
      weights=lambda d: np.exp((1 - d) / temperature - 1 / temperature))
  # One thread: a spinning OpenMP pool would starve the simulated devices' collectives later.
  with threadpoolctl.threadpool_limits(1):
    return clf.fit(train, train_labels).score(test, test_labels)


@pytest.mark.parametrize('features', ['digits_pixels', 'random_projection'])
def test_matches_scikit_learn(features):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  x, y = digits.data.astype(np.float32), digits.target
  if features == 'random_projection':  # a stand-in for a random encoder's features
    x = np.tanh(x @ np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32) / 8)
  train, test = slice(None, 1437), slice(1437, None)
  ours = knn_accuracies(x[train], y[train], x[test], y[test], ks=(10, 20, 200), temperature=0.07)
  for k in (10, 20, 200):
    theirs = _sklearn_knn_accuracy(x[train], y[train], x[test], y[test], k, 0.07)
    assert abs(ours[k] - theirs) <= 0.005, (k, ours[k], theirs)


def test_several_k_equal_one_k_at_a_time():
  rng = np.random.default_rng(2)
  train, test = rng.normal(size=(300, 8)), rng.normal(size=(50, 8))
  labels = rng.integers(4, size=300)
  preds = knn_predict(train, labels, test, ks=(1, 5, 20, 500), temperature=0.1, batch_size=16)
  assert set(preds) == {1, 5, 20, 500}
  for k in (1, 5, 20, 500):  # k=500 > bank: the whole bank votes
    (alone,) = knn_predict(train, labels, test, ks=(k,), temperature=0.1).values()
    np.testing.assert_array_equal(preds[k], alone)
