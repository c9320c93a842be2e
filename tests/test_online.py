"""Online probes during pretraining: the ridge probe against scikit-learn, the probe steps in
metrics.jsonl / TensorBoard, throughput figures without probe time, one compilation."""
import json
import os
import time

import numpy as np
import pytest
import threadpoolctl
from sklearn import datasets
from sklearn import linear_model
from sklearn import preprocessing
from tensorboard.backend.event_processing import event_accumulator

from mim import config as config_lib
from mim import sharding
from mim import train
from mim.evaluate import features
from mim.evaluate import online
from mim.evaluate import ridge
from tests.test_train import tiny_config

PROBE_DELAY_S = 1.0


@pytest.mark.parametrize('alpha', [1.0, 100.0])
def test_ridge_matches_scikit_learn_ridge_classifier(alpha):
  d = datasets.load_digits()
  rng = np.random.default_rng(0)
  # Digits pixels (some constant), and a random projection with a large offset and scale.
  x = np.concatenate([d.data, d.data @ rng.normal(size=(64, 40)) * 30 + 500], axis=1)
  y = d.target
  tr, te = slice(None, 1437), slice(1437, None)
  scaler = preprocessing.StandardScaler().fit(x[tr])
  with threadpoolctl.threadpool_limits(1):
    reference = linear_model.RidgeClassifier(alpha=alpha).fit(scaler.transform(x[tr]), y[tr])
    theirs = reference.score(scaler.transform(x[te]), y[te])
    ours = ridge.ridge_accuracy(x[tr], y[tr], x[te], y[te], alpha=alpha)
    model = ridge.fit(x[tr], y[tr], alpha=alpha)
  assert abs(ours - theirs) <= 0.005, (ours, theirs)
  np.testing.assert_allclose(model.weight, reference.coef_.T, atol=1e-8)
  np.testing.assert_allclose(model.bias, reference.intercept_, atol=1e-8)
  assert theirs > 0.85


def test_every_steps_is_validated():
  c = tiny_config()
  c.eval.every_steps = -1
  with pytest.raises(config_lib.ConfigError, match='eval.every_steps=-1'):
    config_lib.validate(c)


def test_probes_at_their_steps_outside_the_throughput(tmp_path, monkeypatch):
  """Probes at steps 3 (not a multiple of log_every_steps) and 6 (the last), each made 1 s
  slower: every logged sec_per_step stays at training speed, and features compile once."""
  scores = online.OnlineProbe.scores

  def slow_scores(self, params):
    time.sleep(PROBE_DELAY_S)
    return scores(self, params)

  monkeypatch.setattr(online.OnlineProbe, 'scores', slow_scores)
  c = tiny_config(checkpoint_every_steps=100, reconstruction_every_steps=0)
  c.eval.update(dict(every_steps=3, batch_size=64, knn_max_train=200, knn_max_test=100))
  c.eval.num_reconstructions = 0
  train.train(c, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  # A probe step is a log step too: its row is timed before the probe runs.
  assert [(r['step'], 'loss' in r, 'knn' in r) for r in rows] == [
      (2, True, False), (3, True, False), (3, False, True), (4, True, False), (6, True, False),
      (6, False, True)]
  probes = [r for r in rows if 'knn' in r]
  assert set(probes[0]) == {'step', 'knn', 'linear', 'probe_seconds'}
  assert {'knn_random_init', 'linear_random_init'} <= set(probes[1])
  for r in probes:
    assert 0.1 < r['knn'] <= 1 and 0.1 < r['linear'] <= 1, r  # a tiny encoder; chance 0.1
    assert r['probe_seconds'] >= PROBE_DELAY_S
  # Step 3 is timed before its probe, 4 from the probe's end (step 2 includes compiling).
  for r in rows:
    if 'loss' in r and r['step'] > 2:
      assert r['sec_per_step'] < PROBE_DELAY_S / 2, r
  events = [f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents')]
  acc = event_accumulator.EventAccumulator(str(tmp_path / events[0]))
  acc.Reload()
  assert [e.step for e in acc.Scalars('knn')] == [3, 6]
  assert [e.step for e in acc.Scalars('linear')] == [3, 6]
  # Bank and queries, the trained and the random-init encoder: one compiled feature function.
  model = train.build_parts(c, 6, 2).model
  fn = features._jit_with_labels(features.encoder_fn(model, ('cls',)),  # pylint: disable=protected-access
                                 sharding.make_mesh(c.mesh))
  assert fn._cache_size() == 1  # pylint: disable=protected-access
