"""Evaluation: class-balanced subsets, streamed eval batches, LARS, probes, `--mode=eval`."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl
from sklearn import datasets
from sklearn import linear_model
from sklearn import preprocessing

from data import eval_subset
from data import pipeline
from data import sources
from data import transforms
from mim import config as config_lib
from mim import optim
from mim import sharding
from mim import train
from mim.evaluate import features
from mim.evaluate import heads
from mim.evaluate import lars
from mim.evaluate import probe
from mim.evaluate import run
from tests import launch

DIGITS = config_lib.default_config().data
DIGITS.update(dict(name='digits', train_split='train', eval_split='test', num_workers=0,
                   flip=False))
TINY_MODEL = dict(variant='', image_size=16, patch_size=4, width=32, depth=2, num_heads=2,
                  decoder_width=16, decoder_depth=1, decoder_heads=2)
TIMING_KEYS = ('seconds', 'train_seconds')


def digits_arrays():
  d = datasets.load_digits()
  return d.data.astype(np.float32), d.target


# ----------------------------------------------------------------------------- subsets

def test_balanced_subset_counts_seed_and_description():
  _, y = digits_arrays()
  s = eval_subset.select(DIGITS, 'train', 500, seed=0)
  assert (np.bincount(s.labels) == 50).all() and s.num_classes == 10
  assert (np.diff(s.indices) > 0).all() and (y[s.indices] == s.labels).all()
  assert s.description == ('500 of 1437 records of digits[train], class-balanced (50-50 per class '
                           'over 10 classes), seed 0')
  np.testing.assert_array_equal(eval_subset.select(DIGITS, 'train', 500, seed=0).indices, s.indices)
  other = eval_subset.select(DIGITS, 'train', 500, seed=1).indices
  assert len(np.intersect1d(other, s.indices)) < 400
  # The remainder goes one each to 5 classes; size 0 or >= the split takes it all.
  counts = np.bincount(eval_subset.select(DIGITS, 'train', 505, seed=0).labels)
  assert sorted(counts) == [50] * 5 + [51] * 5
  whole = eval_subset.select(DIGITS, 'test', 0, seed=0)
  assert whole.description == 'all 360 records of digits[test]' and len(whole.indices) == 360


class _OpaqueSource(sources.Source):
  """A source that does not expose its labels: they must be read record by record."""

  def __init__(self, inner):
    self.inner, self.reads = inner, 0

  def __len__(self):
    return len(self.inner)

  def __getitem__(self, index):
    self.reads += 1
    return self.inner[index]


def test_balanced_subset_reads_labels_lazily_with_the_same_result(monkeypatch):
  inner = sources.make_source(DIGITS, 'train')
  opaque = _OpaqueSource(inner)
  monkeypatch.setattr(eval_subset.sources, 'make_source', lambda cfg, split: opaque)
  lazy = eval_subset.select(DIGITS, 'train', 100, seed=3, num_classes=10)
  monkeypatch.undo()
  known = eval_subset.select(DIGITS, 'train', 100, seed=3)
  np.testing.assert_array_equal(lazy.indices, known.indices)
  np.testing.assert_array_equal(lazy.labels, known.labels)
  assert opaque.reads < len(inner)  # stopped once every quota was full


def test_balanced_subset_fills_short_classes_from_the_rest():
  labels = np.array([0] * 3 + [1] * 50 + [2] * 50 + [3] * 50)
  idx, got = eval_subset.balanced_indices(lambda i: labels[i], len(labels), 40, 4, seed=0)
  counts = np.bincount(got, minlength=4)
  assert counts.sum() == 40 and counts[0] == 3 and counts[1:].min() >= 10
  np.testing.assert_array_equal(labels[idx], got)


@pytest.mark.parametrize('process_count', [2, 4])
def test_eval_batches_same_global_batches_for_any_process_count(process_count):
  indices = eval_subset.select(DIGITS, 'test', 50, seed=0).indices

  def global_batches(p_count):
    per_process = [list(pipeline.eval_batches(DIGITS, 'test', indices, image_size=8,
                                              batch_size=16, process_index=p,
                                              process_count=p_count)) for p in range(p_count)]
    return [{k: np.concatenate([parts[t][k] for parts in per_process]) for k in parts_keys}
            for t in range(len(per_process[0])) for parts_keys in [per_process[0][t].keys()]]

  one, many = global_batches(1), global_batches(process_count)
  assert len(one) == len(many) == 4  # 50 records in padded batches of 16
  for a, b in zip(one, many):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  flat = {k: np.concatenate([b[k] for b in one]) for k in one[0]}
  assert flat['valid'].tolist() == [1] * 50 + [0] * 14
  x, y = digits_arrays()
  np.testing.assert_array_equal(flat['label'][:50], y[1437:][indices])
  expected = transforms.normalize(np.repeat(np.rint(
      datasets.load_digits().images[1437:][indices] * 255 / 16).astype(np.uint8)[..., None], 3, -1),
      DIGITS.mean, DIGITS.std)
  np.testing.assert_allclose(flat['image'][:50], expected, atol=1e-6)


# ----------------------------------------------------------------------------- LARS

def _mae_lars_reference(params, grads_fn, lrs, wd, tc, momentum):
  """MAE util/lars.py in numpy: for ndim > 1, g += wd w; g *= tc |w| / |g| (1 if a norm is 0);
  mu = m mu + g; w -= lr mu."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for lr in lrs:
    grads = grads_fn(params)
    for k, w in params.items():
      g = grads[k]
      if w.ndim > 1:
        g = g + wd * w
        pn, gn = np.linalg.norm(w), np.linalg.norm(g)
        g = g * (tc * pn / gn if pn > 0 and gn > 0 else 1.0)
      mu[k] = momentum * mu[k] + g
      params[k] = w - lr * mu[k]
  return params


def test_lars_matches_the_mae_formula_under_a_schedule():
  rng = np.random.default_rng(0)
  x, t = rng.normal(size=(32, 5)), rng.normal(size=(32, 3))
  params = {'kernel': rng.normal(size=(5, 3)), 'bias': rng.normal(size=(3,)),
            'zero_kernel': np.zeros((5, 3))}  # |w| = 0: trust ratio 1

  def loss(p):
    return ((jnp.asarray(x) @ (p['kernel'] + p['zero_kernel']) + p['bias'] - t) ** 2).mean()

  grads_np = lambda p: {k: np.asarray(v, np.float64) for k, v in jax.grad(loss)(
      jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), p)).items()}
  cfg = config_lib.default_config().probe
  cfg.update(base_lr=25.6, min_lr=0.0)
  schedule = optim.lr_schedule(cfg, 256, 12, 3)
  lrs = [float(schedule(i)) for i in range(12)]
  expected = _mae_lars_reference(params, grads_np, lrs, wd=0.05, tc=0.001, momentum=0.9)

  tx = lars.lars(0.9, 0.001, 0.05)
  p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  state = tx.init(p)
  for i in range(12):
    g = jax.grad(loss)(p)
    updates, state = tx.update(g, state, p)
    p = optim.apply_updates(p, updates, schedule(i))
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=1e-5, atol=1e-6)
  assert np.abs(expected['bias'] - params['bias']).max() > 1.0  # the bias moves at the full lr


# ----------------------------------------------------------------------------- probes

def _mesh(devices=None):
  return sharding.make_mesh(config_lib.default_config().mesh, devices)


def test_linear_probe_matches_logistic_regression_on_digits():
  x, y = digits_arrays()
  tr, te = slice(None, 1437), slice(1437, None)
  scaler = preprocessing.StandardScaler().fit(x[tr])
  with threadpoolctl.threadpool_limits(1):  # spinning OpenMP threads starve the CPU devices
    reference = linear_model.LogisticRegression(max_iter=5000).fit(scaler.transform(x[tr]), y[tr])
  theirs = reference.score(scaler.transform(x[te]), y[te])
  pc = config_lib.default_config().probe
  pc.update(batch_size=128, base_lr=12.8)  # peak lr 6.4, as the reference recipe's
  head, state, info = probe.train_on_features('linear', pc, x[tr], y[tr], 10, _mesh(), seed=0)
  ours = probe.accuracy_on_features(head, state, x[te], y[te], _mesh())
  assert info['steps'] == 90 * (1437 // 128) and info['warmup_steps'] == 10 * (1437 // 128)
  assert abs(ours['top1'] - theirs) <= 0.005, (ours, theirs)
  assert theirs > 0.85


def test_attentive_head_parameter_count_and_slices():
  width, m, d_out, classes = 32, 8, 2, 10
  head = heads.AttentiveHead(classes, m, d_out)
  tokens = jax.random.normal(jax.random.key(0), (4, 17, width))
  variables = head.init(jax.random.key(1), tokens, train=False)
  count = sum(v.size for v in jax.tree.leaves(variables['params']))
  assert count == heads.attentive_param_count(width, m, d_out, classes)
  assert count == 8 * 32 + 32 * 16 + 17 * 10
  assert 'batch_stats' in variables and heads.check_attentive(32, 8, 2) is None
  assert 'multiple' in heads.check_attentive(32, 5, 1)
  # Query m pools only value channels [2m, 2m + 2): its attention logits move nothing else.
  pooled = lambda q: jnp.einsum('bmn,bnmc->bmc', jax.nn.softmax(
      jnp.einsum('md,bnd->bmn', q * width ** -0.5, tokens[:, 1:]), -1),
      (tokens[:, 1:] @ variables['params']['value']['kernel']).reshape(4, 16, m, 2)).reshape(4, -1)
  q = variables['params']['queries']
  jac = jax.jit(jax.jacobian(pooled))(q)  # (4, 16 channels, m, width)
  touched = np.abs(np.asarray(jac)).sum(axis=(0, 3)) > 0
  np.testing.assert_array_equal(touched, np.kron(np.eye(m), np.ones((2, 1))).astype(bool))


def _eval_config(**probe_overrides):
  c = config_lib.default_config()
  c.model.update(TINY_MODEL)
  c.data.update(DIGITS)
  c.mesh.update(dict(data=-1, fsdp=1))
  c.init_from = 'random'
  c.eval.update(dict(protocols=('knn', 'linear', 'attentive'), knn_pool='both', batch_size=64,
                     knn_max_train=1000, knn_max_test=0))
  c.probe.update(dict(mode='cached', batch_size=128, epochs=30, warmup_epochs=3, base_lr=12.8,
                      num_queries=8, max_train_examples=0, log_every_steps=10 ** 6))
  c.probe.update(probe_overrides)
  return c


def _without_timings(results):
  return {p: {k: v for k, v in r.items() if k not in TIMING_KEYS} for p, r in results.items()}


def test_eval_is_deterministic_across_runs_and_device_counts(tmp_path):
  cfg = _eval_config(epochs=10, warmup_epochs=1)
  cfg.eval.protocols = ('knn', 'linear')
  first = run.evaluate(cfg, str(tmp_path / 'first'))
  again = run.evaluate(cfg, str(tmp_path / 'again'))
  assert _without_timings(again) == _without_timings(first)
  # One device: the same sharded computations on a (1, 1, 1) mesh; float sums may differ in the
  # last bits, so the features agree to 1e-5 and the accuracies to one example of 360.
  one_device = jax.devices()[:1]
  one = run.evaluate(cfg, str(tmp_path / 'one'), devices=one_device)
  assert one['knn']['accuracy'] == first['knn']['accuracy']
  assert abs(one['linear']['top1'] - first['linear']['top1']) <= 1 / 360
  feats = []
  for mesh in (_mesh(), _mesh(one_device)):  # compiled above already
    model, params, _ = run.load_encoder(cfg, None, mesh)
    feats.append(features.extract(DIGITS, 'test', np.arange(100), model, params, mesh,
                                  pools=('cls', 'avg'), batch_size=cfg.eval.batch_size))
  for k in ('cls', 'avg', 'label'):
    np.testing.assert_allclose(feats[0][k], feats[1][k], atol=1e-5)


def test_augment_mode_encodes_augmented_views_every_step(tmp_path):
  cfg = _eval_config(mode='augment', epochs=10, warmup_epochs=1, crop_scale=(0.5, 1.0))
  cfg.eval.protocols = ('linear',)
  result = run.evaluate(cfg, str(tmp_path))['linear']
  assert result['mode'] == 'augment' and 'RandomResizedCrop' in result['mode_description']
  assert result['steps'] == 10 * (1437 // 128) and result['top1'] > 0.2, result  # chance: 0.1


def test_prenorm_pools_read_the_last_block_output():
  cfg = _eval_config()
  mesh = _mesh()
  model, params, _ = run.load_encoder(cfg, None, mesh)
  images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  with sharding.use_mesh(mesh):
    out, tokens = jax.jit(lambda p, x: (
        features.encoder_outputs(model, p, x, ('cls', 'cls_prenorm', 'avg_prenorm')),
        model.apply({'params': p}, x, method=type(model).encode)))(params, images)
  # Applying the final LayerNorm to the pre-norm cls token gives the cls feature.
  scale = params['encoder']['Transformer']['encoder_norm']
  x = out['cls_prenorm']
  normed = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(normed * scale['scale'] + scale['bias'], out['cls'], atol=1e-5)
  np.testing.assert_allclose(out['cls'], tokens[:, 0], atol=1e-6)
  assert out['avg_prenorm'].shape == (8, 32)


# ----------------------------------------------------------------------------- main.py

def _main_eval(init_from: str, workdir: str, *overrides: str) -> dict[str, dict]:
  """Runs `main.py --mode=eval` (configs/eval_demo.py, 2 devices); returns the json results."""
  out = launch.run_checked(
      [sys.executable, 'main.py', '--mode=eval', '--config=configs/eval_demo.py',
       f'--config.init_from={init_from}', f'--workdir={workdir}', '--config.eval.batch_size=64',
       '--config.probe.num_queries=8', *overrides], devices=2)
  files = sorted(os.listdir(os.path.join(workdir, 'eval')))
  assert files == ['attentive.json', 'knn.json', 'linear.json']
  lines = out.splitlines()
  assert f'Evaluating {init_from} (ViT 32x2, patch 4, 16 px) on 2 device(s)' in out
  assert sum(l.startswith('knn ') for l in lines) == 6  # cls and avg, k = 10, 20, 200
  assert any(l.startswith('linear probe: top-1 ') for l in lines)
  assert any(l.startswith('attentive probe: top-1 ') for l in lines)
  results = {}
  for name in files:
    with open(os.path.join(workdir, 'eval', name)) as f:
      results[name[:-len('.json')]] = json.load(f)
  assert {r['weights'] for r in results.values()} == {init_from}
  return results


def test_main_eval_on_a_weights_file_beats_chance(tmp_path):
  from mim import interop  # pylint: disable=g-import-not-at-top
  cfg = _eval_config()
  _, params, _ = run.load_encoder(cfg, None, _mesh())
  weights, _ = interop.save(cfg, jax.tree.map(np.asarray, params), 'timm', str(tmp_path / 'vit'))
  # A timm file stores no head count, and width 32 is not a standard ViT: the config gives it.
  results = _main_eval(weights, str(tmp_path / 'out'), '--config.model.width=32',
                       '--config.model.num_heads=2', '--config.eval.knn_max_train=1000',
                       '--config.probe.epochs=30', '--config.probe.warmup_epochs=3')
  knn = results['knn']
  assert set(knn['accuracy']) == {'cls', 'avg'}
  assert set(knn['accuracy']['cls']) == {'k10', 'k20', 'k200'}
  assert knn['bank'].startswith('1000 of 1437 records of digits[train], class-balanced (100-100')
  assert knn['queries'] == 'all 360 records of digits[test]'
  assert knn['accuracy']['avg']['k20'] > 0.4  # a random tiny encoder; chance: 0.1
  for protocol in ('linear', 'attentive'):
    r = results[protocol]
    assert r['mode'] == 'cached' and 'fast mode' in r['mode_description']
    assert r['steps'] == 30 * (1437 // 128) and r['num_test'] == 360
    assert r['top1'] > 0.5, r


@pytest.mark.slow
def test_main_eval_on_a_workdir_checkpoint(tmp_path):
  pretrain = str(tmp_path / 'pretrain')
  c = config_lib.default_config()
  c.model.update(TINY_MODEL)
  c.data.update(DIGITS)
  c.update(batch_size=16, total_steps=2, log_every_steps=1, checkpoint_every_steps=2)
  c.eval.num_reconstructions = 2
  c.mesh.update(dict(data=-1, fsdp=1))
  train.train(c, pretrain)
  results = _main_eval(pretrain, str(tmp_path / 'out'), '--config.probe.epochs=3',
                       '--config.probe.warmup_epochs=1')
  assert results['linear']['steps'] == 3 * (1437 // 128)


def test_main_eval_errors_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--mode=eval', '--config=configs/eval_demo.py',
       f'--workdir={tmp_path}', '--config.eval.protocols=("knn", "linaer")'],
      cwd=launch.ROOT, capture_output=True, text=True, timeout=launch.TIMEOUT_S)
  assert proc.returncode == 2 and "eval.protocols has 'linaer'" in proc.stderr, proc.stderr
