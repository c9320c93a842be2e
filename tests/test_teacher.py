"""Teacher-driven MIM: EMA schedules and update, the teacher pass, HPM's loss ranking and mask,
data2vec targets and AttMask against direct numpy formulas; resume and meshes with the teacher on."""
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mim import config as config_lib
from mim import masking
from mim import objectives
from mim import teacher
from mim import train
from tests.test_sharding import assert_same_run, run_steps, sharded_config
from tests.test_train import read_jsonl, tiny_config


def teacher_cfg(**kw) -> ml_collections.ConfigDict:
  c = config_lib.default_config().teacher
  c.update(kw)
  return c


def test_momentum_schedules_match_their_formulas():
  spe = 10  # steps per epoch
  hpm = teacher.momentum_schedule(teacher_cfg(momentum_per_epoch=True), spe)
  for step in (0, 9, 10, 555, 999, 1000, 5000):
    epoch = step // spe
    expected = 0.999 + min(epoch, 100) / 100 * (0.9999 - 0.999)   # HPM, set per epoch
    np.testing.assert_allclose(float(hpm(step)), expected, rtol=1e-7)
  boot = teacher.momentum_schedule(teacher_cfg(
      momentum=((0, 0.999), (100, 0.9999), (400, 0.99999))), spe)
  for step, expected in ((0, 0.999), (500, 0.99945), (1000, 0.9999), (2500, 0.999945),
                         (4000, 0.99999), (9000, 0.99999)):
    np.testing.assert_allclose(float(boot(step)), expected, rtol=1e-7)
  constant = teacher.momentum_schedule(teacher_cfg(momentum=((0, 0.9998),)), spe)
  assert float(constant(12345)) == np.float32(0.9998)
  cosine = teacher.momentum_schedule(teacher_cfg(momentum=((0, 0.996), (1000, 1.0)),
                                                 momentum_unit='steps', momentum_shape='cosine'), spe)
  for step in (0, 250, 500, 1000, 2000):
    t = min(step, 1000) / 1000   # DINO / iBOT: 1 - (1 - tau_0) (cos(pi t) + 1) / 2
    np.testing.assert_allclose(float(cosine(step)), 1 - 0.004 * (math.cos(math.pi * t) + 1) / 2,
                               rtol=1e-7)


def test_ema_update_formula():
  ema, params = {'a': jnp.full((3,), 2.0)}, {'a': jnp.arange(3.0)}
  out = teacher.ema_update(ema, params, jnp.float32(0.9))
  np.testing.assert_allclose(out['a'], 0.9 * 2.0 + 0.1 * np.arange(3.0), rtol=1e-6)


def numpy_loss_rank(pred, losses, mask):
  num, den = 0.0, 0
  for b in range(pred.shape[0]):
    idx = np.flatnonzero(mask[b])
    for i in idx:
      for j in idx:
        if losses[b, j] == losses[b, i]:
          continue
        p = 1 / (1 + np.exp(-(pred[b, j] - pred[b, i])))
        num -= np.log(p + 1e-6) if losses[b, j] > losses[b, i] else np.log(1 - p + 1e-6)
        den += 1
  return num / den, den


def test_loss_rank_term_matches_a_double_loop_with_ties():
  rng = np.random.default_rng(0)
  pred = rng.standard_normal((3, 12)).astype(np.float32)
  losses = rng.integers(0, 4, (3, 12)).astype(np.float32)   # many ties
  mask = (rng.random((3, 12)) < 0.7).astype(np.float32)
  num, den = objectives.loss_rank_term(jnp.asarray(pred), jnp.asarray(losses), jnp.asarray(mask))
  expected, expected_den = numpy_loss_rank(pred, losses, mask)
  assert int(den) == expected_den
  np.testing.assert_allclose(float(num / den), expected, rtol=1e-5)


def test_data2vec_targets_match_numpy():
  rng = np.random.default_rng(1)
  blocks = [rng.standard_normal((2, 5, 8)).astype(np.float32) * (i + 1) + i for i in range(3)]

  def ln(x):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)

  expected = ln(np.mean([ln(b) for b in blocks], axis=0))
  np.testing.assert_allclose(objectives.feature_targets([jnp.asarray(b) for b in blocks]),
                             expected, rtol=1e-5, atol=1e-5)


def test_smooth_l1_matches_torch_definition():
  d = np.array([[[-3.0, -1.0, 0.5, 2.5]]], np.float32)
  num, den = objectives.feature_term(jnp.asarray(d), jnp.zeros_like(d), jnp.ones((1, 1)),
                                     kind='smooth_l1', beta=2.0)
  expected = np.mean([3 - 1, 0.5 * 1 / 2, 0.5 * 0.25 / 2, 2.5 - 1])
  np.testing.assert_allclose(float(num / den), expected, rtol=1e-6)


def masking_cfg(name, **params):
  c = config_lib.default_config().masking
  c.name = name
  c[name].update(params)
  return c


def test_alpha_follows_its_formula_by_step_and_by_epoch():
  from mim.masks import teacher_guided
  params = ml_collections.ConfigDict(teacher_guided.HARD_PATCHES_DEFAULTS)
  for step in (0, 250, 1000):
    ctx = masking.MaskContext(1, (4, 4), 4, step, 1000, {}, 10)
    np.testing.assert_allclose(float(teacher_guided.alpha(ctx, params)), 0.5 * step / 1000)
  params.per_epoch = True
  for step in (0, 9, 10, 995):   # official: 0.5 * (epoch + 1) / epochs, 100 epochs
    ctx = masking.MaskContext(1, (4, 4), 4, step, 1000, {}, 10)
    np.testing.assert_allclose(float(teacher_guided.alpha(ctx, params)),
                               0.5 * (step // 10 + 1) / 100, rtol=1e-6)


def test_hard_patches_masks_the_predicted_hardest_and_the_rest_at_random():
  grid, total = (14, 14), 100   # 49 visible, 147 masked
  masker = masking.make_masker(masking_cfg('hard_patches'), grid, total)
  rng = np.random.default_rng(0)
  predicted = jnp.asarray(rng.permutation(196)[None].repeat(8, 0) + rng.random((8, 196)),
                          jnp.float32)
  hardest = np.argsort(-np.asarray(predicted), axis=1)
  step = 60                       # alpha = 0.3: floor(147 * 0.3) = 44 hardest always masked
  others = []
  for seed in range(3):
    m = np.asarray(masker(jax.random.key(seed), 8, step, {'predicted_loss': predicted}).mask)
    np.testing.assert_array_equal(m.sum(1), 147)
    for b in range(8):
      assert m[b, hardest[b, :44]].all()
    others.append(m[0, hardest[0, 44:]])
  assert not np.array_equal(others[0], others[1])   # the rest of the masked set is random
  # At step 0 (alpha 0) it is plain random masking: the hardest are not favoured.
  m0 = np.asarray(masker(jax.random.key(0), 8, 0, {'predicted_loss': predicted}).mask)
  assert m0[np.arange(8)[:, None], hardest[:, :44]].mean() < 0.95


def test_attmask_selects_most_least_attended_and_hints():
  grid = (4, 4)                                   # 4 visible, 12 masked
  attention = jnp.asarray(np.random.default_rng(2).random((5, 16)), jnp.float32)
  order = np.argsort(-np.asarray(attention), axis=1)
  for mode, masked in (('high', order[:, :12]), ('low', order[:, 4:])):
    m = np.asarray(masking.make_masker(masking_cfg('attention', mode=mode), grid, 10)(
        jax.random.key(0), 5, 0, {'cls_attention': attention}).mask)
    np.testing.assert_array_equal(m.sum(1), 12)
    for b in range(5):
      assert set(np.flatnonzero(m[b])) == set(masked[b])
  grid = (10, 10)                      # 25 visible; hints: 7 of the top 10 revealed (0.1 * 75)
  attention = jnp.asarray(np.random.default_rng(3).random((6, 100)), jnp.float32)
  order = np.argsort(-np.asarray(attention), axis=1)
  m = np.asarray(masking.make_masker(masking_cfg('attention', mode='hints'), grid, 10)(
      jax.random.key(1), 6, 0, {'cls_attention': attention}).mask)
  np.testing.assert_array_equal(m.sum(1), 75)
  for b in range(6):
    top10 = set(order[b, :10])
    shown = top10 - set(np.flatnonzero(m[b]))
    assert len(shown) == 7
    assert set(order[b, :75]) - top10 <= set(np.flatnonzero(m[b]))   # the rest as 'high'


def test_teacher_pass_attention_and_no_gradient_to_the_teacher():
  cfg = tiny_config()
  cfg.masking.name = 'attention'
  cfg.model.feature_head = True
  cfg.targets.update(dict(feature_weight=1.0, feature_top_k=2))
  parts = train.build_parts(cfg, total_steps=10, warmup_steps=0)
  assert parts.teacher_signals == ('cls_attention', 'feature_targets')
  params = jax.device_get(train.nn.unbox(train.init_params(parts, jax.random.key(0))))
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)
  teacher_pass = teacher.make_teacher_pass(cfg, parts.model)
  signals = teacher_pass(params, images)
  att = np.asarray(signals['cls_attention'])
  assert att.shape == (4, 16) and (att > 0).all() and (att.sum(1) < 1).all()
  assert signals['feature_targets'].shape == (4, 16, 32)

  def student_loss(params_ema):
    s = teacher_pass(params_ema, images)
    mask = masking.make_masker(cfg.masking, parts.spec.grid, 10)(jax.random.key(0), 4, 0, s)
    out = parts.model.apply({'params': params}, images, mask.ids_keep, mask.ids_restore)
    terms = objectives.terms(cfg, out, images, mask, s, patch_size=4)
    return objectives.total(terms, objectives.term_weights(cfg.targets, 0, 1))

  grads = jax.grad(student_loss)(params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) == 0.0


def hpm_config(**kw):
  cfg = tiny_config(**kw)
  cfg.masking.name = 'hard_patches'
  cfg.model.loss_predictor = True
  cfg.targets.loss_pred_weight = 1.0
  cfg.teacher.update(dict(momentum=((0.0, 0.9),), momentum_unit='steps'))
  return cfg


def test_hpm_run_resumes_bitwise_with_the_ema_in_the_checkpoint(tmp_path):
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  state, _ = train.train(hpm_config(), full)
  assert state.params_ema is not None
  rows = read_jsonl(os.path.join(full, 'metrics.jsonl'))
  assert {'pixel_loss', 'loss_pred_loss', 'ema_momentum'} <= set(rows[-1])
  shutil.copytree(os.path.join(full, 'checkpoints', '3'), os.path.join(resumed, 'checkpoints', '3'))
  again, _ = train.train(hpm_config(), resumed)
  last = read_jsonl(os.path.join(resumed, 'metrics.jsonl'))[-1]
  assert (last['loss'], last['loss_pred_loss']) == (rows[-1]['loss'], rows[-1]['loss_pred_loss'])
  for a, b in zip(jax.tree.leaves((state.params, state.params_ema)),
                  jax.tree.leaves((again.params, again.params_ema))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # An MAE checkpoint does not fit HPM (new head, EMA): explained, nothing touched.
  with pytest.raises(train.ckpt_lib.CheckpointMismatch, match='params_ema'):
    train.train(tiny_config(), full)


def teacher_sharded(data, fsdp, tensor, method):
  cfg = sharded_config(data, fsdp, tensor)
  if method == 'hpm':
    cfg.masking.name = 'hard_patches'
    cfg.model.loss_predictor = True
    cfg.targets.loss_pred_weight = 1.0
    cfg.masking.hard_patches.alpha_start = 0.3   # hard patches from step 0
  else:
    cfg.masking.name = 'attention'
    cfg.model.feature_head = True
    cfg.targets.update(dict(feature_weight=1.0, feature_top_k=2))
  cfg.teacher.update(dict(momentum=((0.0, 0.5),), momentum_unit='steps'))
  return cfg


# attmask_data2vec is slow: hpm runs the same teacher pass and EMA on every mesh by default
@pytest.mark.parametrize('method', ['hpm', pytest.param('attmask_data2vec', marks=pytest.mark.slow)])
def test_teacher_methods_match_across_meshes_and_accumulation(method):
  reference = run_steps(teacher_sharded(1, 1, 1, method), jax.devices()[:1])
  assert_same_run(run_steps(teacher_sharded(2, 2, 2, method), jax.devices()), reference)
  cfg = teacher_sharded(8, 1, 1, method)
  cfg.grad_accum_steps = 2
  assert_same_run(run_steps(cfg, jax.devices()), reference)
  ema = reference['state'].params_ema
  assert ema is not None and max(
      float(np.abs(np.asarray(a) - np.asarray(b)).max())
      for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(reference['params']))) > 0


def test_bf16_teacher_pass_is_close_and_hpm_weights_export(tmp_path):
  from mim import interop
  cfg = hpm_config()
  parts = train.build_parts(cfg, total_steps=10, warmup_steps=0)
  params = jax.device_get(train.nn.unbox(train.init_params(parts, jax.random.key(0))))
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)
  fp32 = teacher.make_teacher_pass(cfg, parts.model)(params, images)['predicted_loss']
  cfg.teacher.dtype = 'bfloat16'
  bf16 = teacher.make_teacher_pass(cfg, parts.model)(params, images)['predicted_loss']
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, fp32, atol=0.05 * float(jnp.abs(fp32).max()))
  # The MAE part exports as before; the loss predictor has no PyTorch counterpart.
  written = interop.save(cfg, params, 'mae', str(tmp_path / 'hpm'))
  _, loaded = interop.load(written[0], cfg.model)
  assert sorted(loaded) == ['decoder', 'encoder']
  np.testing.assert_array_equal(loaded['decoder']['pred']['kernel'], params['decoder']['pred']['kernel'])
