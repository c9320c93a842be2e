"""Frozen-teacher distillation (MR-MAE, DMAE, MaskAlign, DTM): the teacher read from every weight
format, no gradient into it, each method's loss against numpy, DTM's morphing map against a
plain ToMe double loop, MaskAlign's alignment weights trained, the same step on every mesh,
bitwise resume, and the one-line errors for bad teachers."""
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mim import config as config_lib
from mim import interop
from mim import masking
from mim import morphing
from mim import sharding
from mim import teacher as teacher_lib
from mim import train
from mim.models import mae
from mim.models import vit
from tests import launch
from tests.test_train import tiny_config

TEACHER_MODEL = dict(variant='', image_size=16, patch_size=4, width=48, depth=3, num_heads=2)


def distill_config(method: str, weights: str = '', **overrides):
  """The tiny student of tests/test_train.py distilled from a 48-wide, 3-block teacher."""
  c = tiny_config(**overrides)
  c.model.depth = 4
  c.teacher.update(dict(weights=weights, model=TEACHER_MODEL))
  config_lib.add_distillation(c, method)
  if method == 'dtm':
    c.distill.morph_max_steps = 3
  return c


def teacher_model_config():
  c = config_lib.default_config()
  c.model.update(dict(TEACHER_MODEL, decoder_width=16, decoder_depth=1, decoder_heads=2))
  return c


@pytest.fixture(scope='module')
def teacher_workdir(tmp_path_factory):
  """A teacher trained 2 steps by train.train (our workdir format, with config.json)."""
  workdir = str(tmp_path_factory.mktemp('teacher'))
  cfg = tiny_config(total_steps=2, checkpoint_every_steps=2, reconstruction_every_steps=0)
  cfg.model.update(teacher_model_config().model)
  cfg.eval.num_reconstructions = 0
  train.train(cfg, workdir)
  return workdir


def block_outputs(params, images, spec) -> list[np.ndarray]:
  """Every block's patch tokens of a full ViT and the final normed output, by flax's
  capture_intermediates (independent of the taps under test)."""
  encoder = vit.Encoder(spec.patch_size, spec.width, spec.depth, spec.num_heads, spec.mlp_dim)
  out, state = encoder.apply({'params': params}, images, capture_intermediates=True)
  captured = state['intermediates']['Transformer']
  blocks = [np.asarray(captured[f'encoderblock_{i}']['__call__'][0][:, 1:])
            for i in range(spec.depth)]
  return blocks + [np.asarray(out[:, 1:])]


def numpy_layer_norm(x):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)


def test_teacher_features_equal_from_every_format(teacher_workdir, storage):
  """teacher.weights as our workdir, timm, HF and MAE files, on a local disk and on gs://."""
  file_cfg, params = interop.load(teacher_workdir)
  teacher_workdir = launch.on_storage(teacher_workdir, storage, 'teacher')
  paths = [teacher_workdir]
  paths += interop.save(file_cfg, params, 'timm', f'{storage}/vit')        # .safetensors, .npz
  paths += [interop.save(file_cfg, params, 'hf', f'{storage}/hf')[0].rsplit('/', 1)[0]]
  paths += interop.save(file_cfg, params, 'mae', f'{storage}/mae')        # .safetensors, .pth
  assert {os.path.splitext(p)[1] for p in paths} == {'', '.safetensors', '.npz', '.pth'}
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  spec = mae.spec_from_config(file_cfg.model)
  reference = block_outputs(params['encoder'], images, spec)
  for path in paths:
    cfg = distill_config('mrmae', path)
    cfg.distill.update(dict(teacher_layers=(0, -1), normalize='none'))
    frozen = teacher_lib.frozen_teacher(cfg)
    loaded = teacher_lib.load_frozen(cfg, frozen)
    feats = teacher_lib.make_teacher_pass(cfg, None)(loaded, images)['distill_targets']
    np.testing.assert_allclose(feats[:, 0], reference[0], atol=1e-5, err_msg=path)
    np.testing.assert_allclose(feats[:, 1], reference[-1], atol=1e-5, err_msg=path)  # normed output


def test_partial_teacher_runs_and_loads_only_its_first_blocks(teacher_workdir):
  cfg = distill_config('dmae', teacher_workdir)
  frozen = teacher_lib.frozen_teacher(cfg)
  assert (frozen.blocks, frozen.layers) == (2, (1,))      # 3/4 of 3 blocks, rounded
  loaded = teacher_lib.load_frozen(cfg, frozen)
  assert sorted(loaded['Transformer']) == ['encoderblock_0', 'encoderblock_1']  # no final norm
  images = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  _, params = interop.load(teacher_workdir)
  raw = block_outputs(params['encoder'], images, teacher_lib.frozen_teacher(cfg).spec)[1]
  feats = teacher_lib.make_teacher_pass(cfg, None)(loaded, images)['distill_targets'][:, 0]
  unit = raw / np.linalg.norm(raw, axis=-1, keepdims=True)       # DMAE: unit-length targets
  np.testing.assert_allclose(feats, unit, atol=1e-5)


# ------------------------------------------------------------------------------- DTM morphing
def numpy_tome_groups(x: np.ndarray, steps: int, per_step: int) -> list[set]:
  """ToMe bipartite soft matching as DTM's code runs it, with Python lists: the groups."""
  seq = [[i] for i in range(len(x))]
  for _ in range(steps):
    r = min(per_step, (len(seq) - 1) // 2)
    if r <= 0:
      continue
    feats = np.stack([x[g].mean(0) for g in seq])
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    a, b = seq[0::2], seq[1::2]
    scores = np.full((len(a), len(b)), -np.inf)
    for i in range(1, len(a)):   # A's first token is protected
      for j in range(len(b)):
        scores[i, j] = feats[2 * i] @ feats[2 * j + 1]
    best, dst = scores.max(1), scores.argmax(1)
    merged = set(np.argsort(-best, kind='stable')[:r].tolist())
    for i in merged:
      b[dst[i]] = b[dst[i]] + a[i]
    seq = [g for i, g in enumerate(a) if i not in merged] + b
  return sorted(map(frozenset, seq), key=min)


def partition(groups: np.ndarray) -> list[set]:
  return sorted((frozenset(np.flatnonzero(groups == g).tolist()) for g in np.unique(groups)), key=min)


@pytest.mark.parametrize('num_tokens', [16, 15])
def test_morph_groups_match_a_numpy_double_loop(num_tokens):
  rng = np.random.default_rng(num_tokens)
  x = rng.standard_normal((6, num_tokens, 8)).astype(np.float32)
  steps = np.array([1, 2, 3, 4, 3, 0])
  per_step = np.array([3, 2, 1, 4, 7, 5])          # 7: more than one step can merge (capped)
  groups = np.asarray(morphing.morph_groups(jnp.asarray(x), jnp.asarray(steps),
                                            jnp.asarray(per_step), max_steps=4))
  for b in range(len(x)):
    assert partition(groups[b]) == numpy_tome_groups(x[b], steps[b], per_step[b]), b
  assert len(np.unique(groups[-1])) == num_tokens                    # 0 steps: no merging
  assert len(np.unique(groups[0])) == num_tokens - 3
  # The aggregation replaces each token by its group's mean.
  agg = np.asarray(morphing.aggregate(jnp.asarray(x)[:, None], jnp.asarray(groups)))[:, 0]
  for b in range(len(x)):
    for g in partition(groups[b]):
      np.testing.assert_allclose(agg[b, sorted(g)], np.broadcast_to(
          x[b, sorted(g)].mean(0), (len(g), 8)), atol=1e-6)


def test_morph_schedule_draws_per_sample_or_per_batch():
  k, r = morphing.draw_schedule(jax.random.key(0), 256, 196, 14, per_sample=True)
  k, r = np.asarray(k), np.asarray(r)
  assert k.min() >= 1 and k.max() <= 14 and len(np.unique(k)) > 5
  assert r.min() >= 0 and (r * k).max() <= 196      # r = floor(n / k): at most n merged
  k, r = morphing.draw_schedule(jax.random.key(0), 8, 196, 14, per_sample=False)
  assert len(np.unique(np.asarray(k))) == 1 and len(np.unique(np.asarray(r))) == 1


# ------------------------------------------------------------------------------- the losses
def random_teacher(cfg):
  frozen = teacher_lib.frozen_teacher(cfg)
  params = teacher_lib.frozen_encoder(frozen).init(jax.random.key(7), jnp.zeros((1, 16, 16, 3)))
  return frozen, sharding.strip_boxes(params['params'])


def step_pieces(cfg, seed=0):
  """Params, teacher params, images, signals, a mask and the model's outputs for one batch."""
  parts = train.build_parts(cfg, total_steps=10, warmup_steps=0)
  frozen, teacher_params = random_teacher(cfg)
  params = sharding.strip_boxes(train.init_params(parts, jax.random.key(seed)))
  images = jax.random.normal(jax.random.key(seed + 1), (4, 16, 16, 3))
  signals = teacher_lib.make_teacher_pass(cfg, parts.model)(teacher_params, images,
                                                            jax.random.key(3))
  masker = masking.make_masker(cfg.masking, parts.spec.grid, 10)
  mask = masker(jax.random.key(4), 4, 0, signals)
  return parts, frozen, params, teacher_params, images, signals, mask


def numpy_smooth_l1(d, beta):
  return np.where(np.abs(d) < beta, 0.5 * d ** 2 / beta, np.abs(d) - 0.5 * beta)


@pytest.mark.parametrize('method', config_lib.DISTILL_METHODS)
def test_each_method_loss_matches_numpy(method):
  cfg = distill_config(method)
  parts, frozen, params, teacher_params, images, signals, mask = step_pieces(cfg)
  outputs, state = parts.model.apply({'params': params}, images, mask.ids_keep, mask.ids_restore,
                                     capture_intermediates=True)
  from mim import objectives
  terms = objectives.terms(cfg, outputs, images, mask, signals, patch_size=4)
  got = float(terms['distill'][0] / terms['distill'][1])
  # The reference: teacher blocks by capture_intermediates, the student's head by hand.
  teacher = block_outputs(teacher_params, images, frozen.spec) if frozen.blocks == 3 else None
  if teacher is None:   # DMAE's partial teacher: its blocks are the full model's first ones
    full = teacher_lib.frozen_encoder(frozen)
    _, st = full.apply({'params': teacher_params}, images, capture_intermediates=True)
    teacher = [np.asarray(st['intermediates']['Transformer'][f'encoderblock_{i}']['__call__'][0][:, 1:])
               for i in range(frozen.blocks)]
  captured = state['intermediates']
  head = jax.tree.map(np.asarray, params['distill_head'])
  keep = np.asarray(mask.ids_keep)
  student_blocks = [np.asarray(captured['encoder']['Transformer'][f'encoderblock_{i}']['__call__'][0][:, 1:])
                    for i in range(4)]
  visible = lambda x: np.take_along_axis(x, keep[..., None], axis=1)
  if method == 'mrmae':    # the encoder's output (visible) -> linear head; LayerNorm'd teacher output; MSE
    student = np.asarray(captured['encoder']['__call__'][0][0][:, 1:])   # (tokens, taps)
    pred = student @ head['head_0']['kernel'] + head['head_0']['bias']
    want = np.mean((pred - visible(numpy_layer_norm(teacher[-1]))) ** 2)
  elif method == 'dmae':   # block 2 of 4 (0-based) -> linear; teacher block 1 of 2; L1 of unit vectors
    pred = student_blocks[2] @ head['head_0']['kernel'] + head['head_0']['bias']
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    want = np.mean(np.abs(unit(pred) - visible(unit(teacher[1]))))
  elif method == 'maskalign':  # all 4 raw blocks mixed by W into the teacher's 3 (raw, LN'd); 2 x smooth-L1
    w = head['align_weights']
    assert w.shape == (3, 4)
    np.testing.assert_allclose(w, 0.01 + np.eye(3, 4, 1))   # the init: diagonal of the last 3
    losses = []
    for t in range(3):
      mixed = sum(w[t, s] * student_blocks[s] for s in range(4))
      pred = mixed @ head[f'head_{t}']['kernel'] + head[f'head_{t}']['bias']
      losses.append(numpy_smooth_l1(pred - visible(numpy_layer_norm(teacher[t])), 1.0).mean())
    want = np.mean(losses)
    assert 'pixels' not in outputs and 'decoder' not in params
  else:                    # decoder output (all 16) -> linear; morphed both sides; smooth-L1 beta 2
    hidden = np.asarray(captured['decoder']['Transformer']['__call__'][0][:, 1:])
    pred = hidden @ head['head_0']['kernel'] + head['head_0']['bias']
    groups = np.asarray(signals['morph_groups'])
    assert groups.shape == (4, 2, 16)
    losses = []
    for branch in range(2):
      agg_p, agg_t = np.zeros_like(pred), np.zeros_like(teacher[-1])
      for b in range(4):
        for g in partition(groups[b, branch]):
          idx = sorted(g)
          agg_p[b, idx], agg_t[b, idx] = pred[b, idx].mean(0), teacher[-1][b, idx].mean(0)
      losses.append(numpy_smooth_l1(agg_p - agg_t, 2.0).mean())
    want = np.mean(losses)
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_no_gradient_reaches_the_teacher_and_it_is_not_in_the_state():
  cfg = distill_config('dtm')
  parts = train.build_parts(cfg, total_steps=10, warmup_steps=0)
  _, teacher_params = random_teacher(cfg)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with sharding.use_mesh(mesh):
    _, shardings = train.state_shardings(parts, mesh)
    state = train.init_state(parts, shardings, 0)
  step = train.make_train_step(cfg, parts)
  batch = {'image': jax.random.normal(jax.random.key(0), (16, 16, 16, 3))}
  loss_and_step = lambda tp: (lambda out: (out[1]['loss'], out))(step(state, batch, tp))
  (_, (new_state, metrics)), grads = jax.jit(jax.value_and_grad(loss_and_step, has_aux=True))(
      teacher_params)   # one compile: the step and its gradient with respect to the teacher
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) == 0.0
  assert float(metrics['distill_loss']) > 0 and new_state.params_ema is None
  assert set(new_state.params) == {'encoder', 'decoder', 'distill_head'}
  assert 'ema_momentum' not in metrics


def test_maskalign_alignment_weights_receive_gradients():
  cfg = distill_config('maskalign')
  parts, _, params, _, images, signals, mask = step_pieces(cfg)
  from mim import objectives

  def loss(p):
    out = parts.model.apply({'params': p}, images, mask.ids_keep, mask.ids_restore)
    num, den = objectives.terms(cfg, out, images, mask, signals, patch_size=4)['distill']
    return num / den

  grads = jax.grad(loss)(params)
  w = np.asarray(grads['distill_head']['align_weights'])
  assert w.shape == (3, 4) and np.all(np.abs(w) > 0), w


# ------------------------------------------------------------------------------- meshes
def run_sgd_steps(cfg, devices, teacher_params, steps=2):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  cfg.optim.base_lr = 0.5 * 256 / cfg.batch_size
  parts = train.build_parts(cfg, total_steps=10, warmup_steps=0)._replace(tx=optax.sgd(1.0))
  images = np.random.default_rng(0).standard_normal((steps, cfg.batch_size, 16, 16, 3)).astype(np.float32)
  with sharding.use_mesh(mesh):
    _, shardings = train.state_shardings(parts, mesh)
    _, t_shardings = train.frozen_shardings(parts, mesh)
    state = train.init_state(parts, shardings, cfg.seed)
    placed = jax.device_put(teacher_params, t_shardings)
    step = train.jit_train_step(cfg, parts, mesh, shardings, t_shardings)
    norms, losses = [], []
    for x in images:
      state, m = step(state, sharding.global_batch({'image': x}, sharding.batch_sharding(mesh)), placed)
      norms.append(float(m['grad_norm']))
      losses.append(float(m['loss']))
  return losses, norms, jax.device_get(state.params), placed


# dtm is slow: maskalign runs the same frozen-teacher pass on every mesh by default
@pytest.mark.parametrize('method', ['maskalign', pytest.param('dtm', marks=pytest.mark.slow)])
def test_one_device_a_mesh_and_grad_accumulation_take_the_same_step(method):
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 simulated CPU devices'

  def config(data, fsdp, tensor, accum=1):
    c = distill_config(method, grad_accum_steps=accum)
    c.model.update(dict(width=32, num_heads=2, decoder_width=16, decoder_heads=2))
    c.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
    return c

  _, teacher_params = random_teacher(config(1, 1, 1))
  ref = run_sgd_steps(config(1, 1, 1), jax.devices()[:1], teacher_params)
  for shape, accum in (((2, 2, 2), 1), ((8, 1, 1), 2)):
    got = run_sgd_steps(config(*shape, accum), jax.devices(), teacher_params)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5, err_msg=str(shape))
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, err_msg=str(shape))
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got[2], ref[2]))
    assert max(diffs) <= 1e-5, (shape, max(diffs))
  kernel = got[3]['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']
  assert len(kernel.sharding.device_set) == 8    # the teacher is placed like the params


# ------------------------------------------------------------------------------- runs
def test_resume_is_bitwise_and_a_changed_teacher_file_stops_it(teacher_workdir, tmp_path):
  weights = interop.save(*interop.load(teacher_workdir), 'timm', str(tmp_path / 'teacher'))[0]
  cfg = lambda: distill_config('mrmae', weights, total_steps=6, checkpoint_every_steps=2,
                               reconstruction_every_steps=0, max_to_keep=5)
  resumed = str(tmp_path / 'resumed')
  state_a, _ = train.train(cfg(), resumed)   # the uninterrupted run, then cut back to step 2
  for step in ('4', '6'):       # as if the run had died right after its step-2 checkpoint
    shutil.rmtree(os.path.join(resumed, 'checkpoints', step))
  state_b, _ = train.train(cfg(), resumed)
  assert int(state_b.step) == 6
  flat_a = flax.traverse_util.flatten_dict(jax.device_get(state_a.params))
  flat_b = flax.traverse_util.flatten_dict(jax.device_get(state_b.params))
  assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
  with open(os.path.join(resumed, 'config.json')) as f:
    assert teacher_lib.weights_digest(weights) in f.read()
  # The teacher file changes: the resume stops before anything is touched.
  file_cfg, params = interop.load(weights, teacher_model_config().model)
  params['encoder']['cls'] = params['encoder']['cls'] + 1
  interop.save(file_cfg, params, 'timm', str(tmp_path / 'teacher'))
  before = sorted(os.listdir(os.path.join(resumed, 'checkpoints')))
  with pytest.raises(teacher_lib.TeacherError, match='changed since this run started'):
    train.train(cfg(), resumed)
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints'))) == before


# ------------------------------------------------------------------------------- bad input
def test_bad_teachers_are_one_line_errors_before_compiling(teacher_workdir, tmp_path):
  cfg = distill_config('mrmae', str(tmp_path / 'missing.safetensors'))
  with pytest.raises(teacher_lib.TeacherError, match='does not exist') as e:
    teacher_lib.resolve_digest(cfg)
  assert '\n' not in str(e.value)
  cfg = distill_config('mrmae', teacher_workdir)
  cfg.teacher.model.patch_size = 8                         # a 2x2 grid for a 4x4 student
  with pytest.raises(config_lib.ConfigError, match='teacher.resample=True'):
    config_lib.validate(cfg)
  cfg.teacher.resample = True
  config_lib.validate(cfg)
  cfg = distill_config('mrmae', teacher_workdir)
  cfg.distill.teacher_layers = (5,)
  with pytest.raises(config_lib.ConfigError, match='block 5, but blocks 0..2 run'):
    config_lib.validate(cfg)
  cfg = distill_config('dmae', teacher_workdir)
  cfg.distill.teacher_layers = (2,)                        # teacher.blocks=2 runs 0 and 1 only
  with pytest.raises(config_lib.ConfigError, match='with teacher.blocks=2'):
    config_lib.validate(cfg)
  cfg = distill_config('mrmae', teacher_workdir)
  cfg.teacher.model.width = 64                             # the file holds a 48-wide ViT
  with pytest.raises(teacher_lib.TeacherError, match=r"has shape \(48,\), but the model needs \(64,\)|"
                     r'shape .*48.*64') as e:
    teacher_lib.load_frozen(cfg, teacher_lib.frozen_teacher(cfg))
  assert '\n' not in str(e.value)


def test_resampled_teacher_runs_on_its_own_grid():
  cfg = distill_config('mrmae', 'unused.safetensors')
  cfg.teacher.update(dict(resample=True, model=dict(image_size=32, patch_size=4)))   # 8x8 grid
  config_lib.validate(cfg)
  frozen, params = random_teacher(cfg)
  assert frozen.spec.grid == (8, 8)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  feats = teacher_lib.make_teacher_pass(cfg, None)(params, images)['distill_targets']
  assert feats.shape == (2, 1, 16, 48)    # on the student's 4x4 grid


def test_flops_count_the_blocks_that_run(teacher_workdir):
  from mim import flops
  cfg = distill_config('dmae', teacher_workdir)
  parts = train.build_parts(cfg, total_steps=10, warmup_steps=0)
  full = teacher_lib.frozen_teacher(distill_config('mrmae', teacher_workdir))
  t = full.spec
  per_block = flops.transformer_flops(17, 48, 1, 192)
  assert flops.frozen_teacher_flops(full, 16) - flops.frozen_teacher_flops(parts.frozen, 16) == per_block
  with_teacher = flops.train_flops_per_image(parts.spec, parts.keep, parts.teacher_signals, parts.frozen)
  student_only = flops.train_flops_per_image(parts.spec, parts.keep)
  assert with_teacher - student_only == flops.frozen_teacher_flops(parts.frozen, 16)
  assert flops.frozen_teacher_flops(parts.frozen, 16) == (
      2 * 16 * 48 * t.patch_dim + 2 * per_block)
