"""Fine-tuning: layer-wise lr decay vs the official rule, mixup / cutmix label mixing, augmentation
determinism, the classifier head and drop path, and the loop end to end (accuracy, exact resume)."""
import collections
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim import config as config_lib
from mim.finetune import layer_decay
from mim.finetune import mixup
from mim.models import mae
from tests import launch


def _official_layer_id(name: str, num_layers: int) -> int:
  """MAE util/lr_decay.py's rule on timm parameter names, restated."""
  if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
    return 0
  if name.startswith('blocks.'):
    return int(name.split('.')[1]) + 1
  return num_layers


def test_layer_decay_matches_the_official_groups_for_vit_b():
  timm = pytest.importorskip('timm')
  decay, depth = 0.65, 12
  num_layers = depth + 1
  # MAE fine-tuning: global average pool -> fc_norm -> head; the final norm is removed.
  official = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=1000,
                               global_pool='avg', fc_norm=True)
  theirs = collections.Counter()
  for name, p in official.named_parameters():
    if name == 'pos_embed':  # a learnable table there, our fixed sin-cos constant here
      continue
    no_decay = p.ndim == 1 or name in ('cls_token', 'pos_embed')
    scale = decay ** (num_layers - _official_layer_id(name, num_layers))
    theirs[round(scale, 12), not no_decay] += p.numel()

  spec = mae.spec_from_config(config_lib.default_config().model)
  encoder = dict(mae.abstract_params(spec)['encoder'])
  transformer = {k: v for k, v in encoder['Transformer'].items() if k != 'encoder_norm'}
  width = spec.width
  params = {'encoder': {**encoder, 'Transformer': transformer},
            'fc_norm': {'scale': jnp.zeros(width), 'bias': jnp.zeros(width)},
            'head': {'kernel': jnp.zeros((width, 1000)), 'bias': jnp.zeros(1000)}}
  scales = layer_decay.lr_multipliers(params, depth, decay)
  decayed = layer_decay.weight_decay_mask(params)
  ours = collections.Counter()
  for s, d, p in zip(jax.tree.leaves(scales), jax.tree.leaves(decayed), jax.tree.leaves(params)):
    ours[round(s, 12), d] += int(np.prod(p.shape))
  assert ours == theirs
  assert len({s for s, _ in ours}) == num_layers + 1  # ids 0..13: embedding .. head
  assert scales['head']['kernel'] == 1.0
  block_11 = scales['encoder']['Transformer']['encoderblock_11']
  assert block_11['MlpBlock_0']['Dense_0']['kernel'] == decay
  assert scales['encoder']['embedding']['kernel'] == pytest.approx(decay ** 13)
  assert not decayed['encoder']['cls'] and decayed['encoder']['embedding']['kernel']


def test_scale_by_layer_multiplies_updates():
  params = {'a': jnp.ones(3), 'b': jnp.ones((2, 2))}
  tx = layer_decay.scale_by_layer({'a': 0.5, 'b': 2.0})
  updates, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_array_equal(updates['a'], 0.5 * np.ones(3))
  np.testing.assert_array_equal(updates['b'], 2.0 * np.ones((2, 2)))


_mix = mixup.mix_batch


def _constant_images(batch=8, size=16):
  return jnp.broadcast_to(jnp.arange(batch, dtype=jnp.float32)[:, None, None, None],
                          (batch, size, size, 3))


@pytest.mark.parametrize('mode', ['mixup', 'cutmix'])
def test_mixup_cutmix_label_mixing(mode):
  images, labels = _constant_images(), jnp.arange(8) % 5
  alphas = dict(mixup_alpha=0.8, cutmix_alpha=0.0) if mode == 'mixup' else dict(
      mixup_alpha=0.0, cutmix_alpha=1.0)
  for seed in range(4):
    mixed, targets, lam = _mix(jax.random.key(seed), images, labels, 5, smoothing=0.1, **alphas)
    lam = float(lam)
    expected = np.zeros((8, 5)) + 0.1 / 5
    for i in range(8):
      expected[i, labels[i]] += lam * 0.9
      expected[i, labels[7 - i]] += (1 - lam) * 0.9
    np.testing.assert_allclose(targets, expected, atol=1e-6)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    x = np.asarray(mixed)
    if mode == 'mixup':  # image i is the constant i: lam * i + (1 - lam) * (7 - i)
      np.testing.assert_allclose(x[:, 0, 0, 0], lam * np.arange(8) + (1 - lam) * np.arange(8)[::-1],
                                 atol=1e-5)
    else:  # lam is the fraction of each image left unpasted
      own = (x[0] == 0).all(-1).mean()
      assert own == pytest.approx(lam) and set(np.unique(x[0])) <= {0.0, 7.0}


def test_mix_batch_is_a_function_of_the_key():
  images, labels = _constant_images(), jnp.arange(8)
  draws = [_mix(jax.random.key(s), images, labels, 8) for s in (0, 0, 1)]
  for a, b in zip(draws[0], draws[1]):
    np.testing.assert_array_equal(a, b)
  assert float(draws[0][2]) != float(draws[2][2])
  # With both alphas, about half the batches use cutmix (the values then stay 0..7 integers).
  cut = [bool(np.all(np.mod(_mix(jax.random.key(s), images, labels, 8)[0], 1) == 0))
         for s in range(40)]
  assert 10 <= sum(cut) <= 30


def test_random_erasing_is_seeded_and_bounded():
  from data import augment  # pylint: disable=g-import-not-at-top
  image = np.zeros((32, 32, 3), np.float32)
  runs = [[augment.random_erasing(image, np.random.default_rng([seed, i])) for i in range(200)]
          for seed in (0, 0, 1)]
  for a, b in zip(runs[0], runs[1]):
    np.testing.assert_array_equal(a, b)
  assert any((a != b).any() for a, b in zip(runs[0], runs[2]))
  erased = [(x != 0).any(-1).mean() for x in runs[0]]
  hit = [e for e in erased if e > 0]
  assert 0.15 < len(hit) / len(erased) < 0.35  # probability 0.25
  assert min(hit) >= 0.015 and max(hit) <= 1 / 3 + 0.02  # area 2%..33% (rounded box sides)
  assert all(x.dtype == np.float32 for x in runs[0])


def test_rand_augment_is_seeded_and_uses_every_op():
  from data import augment  # pylint: disable=g-import-not-at-top
  rng0 = np.random.default_rng(0)
  image = rng0.integers(0, 256, (24, 24, 3)).astype(np.uint8)
  runs = [[augment.rand_augment(image, np.random.default_rng([seed, i])) for i in range(30)]
          for seed in (0, 0, 1)]
  for a, b in zip(runs[0], runs[1]):
    np.testing.assert_array_equal(a, b)
  assert all(x.shape == image.shape and x.dtype == np.uint8 for x in runs[0])
  changed = sum((x != image).any() for x in runs[0])
  assert 15 <= changed <= 30  # two ops at probability 0.5: 3/4 of the images change
  assert any((a != b).any() for a, b in zip(runs[0], runs[2]))
  for name in augment.RAND_AUGMENT_OPS:  # each op runs at full magnitude on its own
    out = augment._OPS[name](augment.Image.fromarray(image), 1.0, np.random.default_rng(0))
    assert np.asarray(out).shape == image.shape, name


# ------------------------------------------------------------------ the classifier and drop path

def _tiny_spec(**overrides):
  m = config_lib.default_config().model
  m.update(dict(variant='', image_size=16, patch_size=4, width=32, depth=3, num_heads=2,
                **overrides))
  return mae.spec_from_config(m)


@pytest.fixture(scope='module')
def classifier():
  """(Classifier with 7 classes on the tiny spec, its params); init is jitted (eager flax
  dispatches op by op) and shared: compiling an init takes seconds."""
  from mim.finetune import model as model_lib  # pylint: disable=g-import-not-at-top
  spec = _tiny_spec()
  clf = model_lib.Classifier(spec, num_classes=7)
  params = jax.jit(clf.init)(jax.random.key(0), model_lib.example_images(spec))['params']
  return clf, jax.tree.map(np.asarray, flax_unbox(params))


def flax_unbox(tree):
  from mim import sharding  # pylint: disable=g-import-not-at-top
  return sharding.strip_boxes(tree)


def test_classifier_head_shapes_and_names(classifier):
  clf, params = classifier
  assert set(params) == {'encoder', 'fc_norm', 'head'}
  assert params['fc_norm']['scale'].shape == params['fc_norm']['bias'].shape == (32,)
  assert params['head']['kernel'].shape == (32, 7) and params['head']['bias'].shape == (7,)
  assert 0 < params['head']['kernel'].std() < 1e-4 and not params['head']['bias'].any()  # 2e-5
  np.testing.assert_array_equal(params['fc_norm']['scale'], 1.0)
  # The encoder is the pretrained one's tree without its final norm, so init_from fills it.
  pretrained = dict(mae.abstract_params(clf.spec)['encoder'])
  pretrained['Transformer'] = {k: v for k, v in pretrained['Transformer'].items()
                               if k != 'encoder_norm'}
  assert jax.tree.map(lambda a: a.shape, params['encoder']) == jax.tree.map(
      lambda a: a.shape, pretrained)
  # The recipes' weight-decay regex is layer_decay's rule (kernels only: no cls, norms, biases).
  from mim import optim  # pylint: disable=g-import-not-at-top
  regex = config_lib.load('configs/finetune_vitb.py').optim.weight_decay_regex
  assert optim.decay_mask(params, regex) == layer_decay.weight_decay_mask(params)
  logits = jax.eval_shape(clf.apply, {'params': params}, jnp.ones((2, 16, 16, 3)))
  assert logits.shape == (2, 7)


def test_drop_path_formula():
  from mim.models import vit  # pylint: disable=g-import-not-at-top
  x = jnp.broadcast_to(jnp.arange(1.0, 4.0)[None, :, None], (20000, 3, 2))
  rate = 0.25
  y = np.asarray(vit.drop_path(x, rate, jax.random.key(0)))
  kept = (y != 0).all(axis=(1, 2))
  assert ((y == 0).all(axis=(1, 2)) | kept).all()   # a whole sample is dropped or kept
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
  assert kept.mean() == pytest.approx(1 - rate, abs=0.01)
  np.testing.assert_allclose(y.mean(axis=0), np.asarray(x[0]), rtol=0.02)  # E[y] = x


def test_drop_path_in_the_encoder_train_vs_eval(classifier):
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from mim.models import vit  # pylint: disable=g-import-not-at-top
  plain, params = classifier
  dropping = plain.clone(drop_path=0.5)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  params = {**params, 'head': {**params['head'], 'kernel': np.ones_like(params['head']['kernel'])}}
  rng = {'dropout': jax.random.key(2)}
  # Pretraining's encoder takes no rng: with drop_path 0 it ignores one (it also keeps its
  # final norm, left out here to reuse the classifier's encoder params).
  s = plain.spec
  encoders = [vit.Encoder(s.patch_size, s.width, s.depth, s.num_heads, s.mlp_dim, drop_path=rate,
                          final_norm=False) for rate in (0.0, 0.3)]
  # One compilation for every case.
  outputs = jax.jit(lambda p: (
      plain.apply({'params': p}, images), dropping.apply({'params': p}, images),
      plain.apply({'params': p}, images, rngs=rng), dropping.apply({'params': p}, images, rngs=rng),
      encoders[0].apply({'params': p['encoder']}, images, rngs=rng),
      encoders[1].apply({'params': p['encoder']}, images)))(params)
  reference, eval_mode, rate_zero, train_mode, enc_rate_zero, enc_eval = map(np.asarray, outputs)
  # Identity in eval (no rng) and at rate 0 (with an rng); active in train.
  np.testing.assert_array_equal(eval_mode, reference)
  np.testing.assert_array_equal(rate_zero, reference)
  assert not np.allclose(train_mode, reference)
  np.testing.assert_array_equal(enc_rate_zero, enc_eval)
  # Rates rise linearly over the blocks, 0 at the first (timm's linspace(0, rate, depth)).
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.EncoderBlock) and context.method_name == '__call__':
      rates.append(context.module.drop_path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: dropping.apply({'params': params}, images, rngs=rng))
  assert rates == pytest.approx([0.0, 0.25, 0.5])


def test_init_from_a_weights_file_fills_the_encoder(tmp_path):
  """A timm export of a tiny MAE: the architecture comes from the file (not the config's depth and
  patch; its resolution is kept), the final norm is dropped, every other tensor kept as saved."""
  from mim import interop  # pylint: disable=g-import-not-at-top
  from mim.finetune import model as model_lib  # pylint: disable=g-import-not-at-top
  from mim.finetune import train as finetune_train  # pylint: disable=g-import-not-at-top
  cfg = tiny_finetune_config()
  cfg.model.update(dict(patch_size=4, depth=3, width=48, num_heads=3, decoder_width=16,
                        decoder_heads=2))
  spec = mae.spec_from_config(cfg.model)
  rng = np.random.default_rng(0)
  saved = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                       mae.abstract_params(spec))
  interop.save(cfg, saved, 'timm', str(tmp_path / 'vit'))
  cfg.init_from = str(tmp_path / 'vit.safetensors')
  # The file's architecture wins (timm files store no head counts: the config's width gives them).
  cfg.model.update(dict(depth=2, patch_size=8, image_size=32))
  resolved, encoder, weights = finetune_train.resolve_weights(cfg)
  assert (resolved.model.depth, resolved.model.num_heads, resolved.model.patch_size) == (3, 3, 4)
  assert resolved.model.image_size == 32 and weights == cfg.init_from
  assert 'encoder_norm' not in encoder['Transformer']
  expected = {**saved['encoder'], 'Transformer': {
      k: v for k, v in saved['encoder']['Transformer'].items() if k != 'encoder_norm'}}
  jax.tree.map(np.testing.assert_array_equal, encoder, expected)
  clf = model_lib.Classifier(mae.spec_from_config(resolved.model), 10)
  shapes = flax_unbox(jax.eval_shape(clf.init, jax.random.key(0),
                                     model_lib.example_images(clf.spec)))['params']
  interop.check_compatible({'encoder': encoder}, shapes)


# ------------------------------------------------------------------ the loop, end to end

def tiny_finetune_config(**overrides):
  """configs/finetune_demo.py on a 2-block ViT from scratch: 150 steps of 32 at 16 px, 4 patches of
  8 (which learn digits fastest from scratch), one RandAugment op."""
  c = config_lib.load('configs/finetune_demo.py')
  c.total_steps = 150
  c.log_every_steps = 10
  c.checkpoint_every_steps = 75
  c.optim.update(dict(base_lr=0.08, warmup_steps=9))
  c.model.update(dict(image_size=16, patch_size=8, width=32, depth=2, num_heads=2))
  c.finetune.update(dict(rand_augment_ops=1, eval_every_epochs=1.0))  # 44 steps of 32 an epoch
  c.init_from = 'random'
  c.update(overrides)
  return c


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory):
  from mim.finetune import train as finetune_train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('finetune'))
  state, result = finetune_train.finetune(tiny_finetune_config(), workdir)
  return workdir, state, result


def test_finetune_beats_chance_and_writes_its_outputs(finetuned):
  workdir, state, result = finetuned
  assert int(state.step) == 150
  with open(os.path.join(workdir, 'finetune.json')) as fh:
    saved = json.load(fh)
  assert saved['top1'] == result['top1'] and saved['num_test'] == 360
  assert result['top1'] > 0.5, result   # chance: 10%
  assert [e['step'] for e in saved['evaluations']] == [44, 88, 132, 150]
  rows = launch.metrics(workdir)
  assert [r['step'] for r in rows if 'loss' in r] == list(range(10, 151, 10))
  assert all(r['img_per_sec'] > 0 and np.isfinite(r['loss']) for r in rows if 'loss' in r)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['150', '75']


def test_finetune_resume_is_exact(finetuned, tmp_path):
  """Killed after step 100 (checkpoint 75 committed, metrics logged up to 100): the rerun repeats
  steps 76-150 with the same floats (mixup, drop path, augmentation included) and reaches the same
  evaluations."""
  from mim.finetune import train as finetune_train  # pylint: disable=g-import-not-at-top
  workdir, state, result = finetuned
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(os.path.join(workdir, 'checkpoints', '75'),
                  os.path.join(resumed, 'checkpoints', '75'))
  with open(os.path.join(resumed, 'metrics.jsonl'), 'w') as fh:
    fh.writelines(json.dumps(r) + '\n' for r in launch.metrics(workdir) if r['step'] <= 100)
  state2, result2 = finetune_train.finetune(tiny_finetune_config(), resumed)
  full, again = launch.metrics(workdir), launch.metrics(resumed)
  assert [r['step'] for r in again] == [r['step'] for r in full]
  for a, b in zip(full, again):
    for key in ('loss', 'grad_norm', 'lr', 'eval_top1', 'eval_top5'):
      assert a.get(key) == b.get(key), (a, b)
  assert result2['top1'] == result['top1'] and result2['evaluations'] == result['evaluations']
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state2.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('override, message', [
    (dict(init_from=''), 'needs --config.init_from'),
    (dict(init_from='/nonexistent/w'), "init_from='/nonexistent/w' does not exist"),
    (dict(grad_accum_steps=2), 'grad_accum_steps=2'),
    (dict(finetune=dict(layer_decay=0.0)), 'finetune.layer_decay=0.0'),
    (dict(finetune=dict(drop_path=1.0)), 'finetune.drop_path=1.0'),
    (dict(finetune=dict(rand_augment_magnitude=12.0)), 'rand_augment_magnitude=12.0'),
])
def test_finetune_config_errors_name_the_key(override, message, tmp_path):
  from mim.finetune import train as finetune_train  # pylint: disable=g-import-not-at-top
  cfg = tiny_finetune_config()
  for key, value in override.items():
    if isinstance(value, dict):
      cfg[key].update(value)
    else:
      cfg[key] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace('.', r'\.')):
    finetune_train.finetune(cfg, str(tmp_path))
  assert not os.listdir(tmp_path)   # nothing written before the checks


FINETUNE_CLI = [
    '--mode=finetune', '--config=configs/finetune_demo.py', '--config.init_from=random',
    '--config.total_steps=150', '--config.log_every_steps=1', '--config.checkpoint_every_steps=20',
    '--config.optim.base_lr=0.08', '--config.optim.warmup_steps=9', '--config.model.image_size=16',
    '--config.model.patch_size=8', '--config.model.width=32', '--config.model.depth=2',
    '--config.model.num_heads=2', '--config.finetune.rand_augment_ops=1',
    '--config.finetune.eval_every_epochs=1.0',
]


@pytest.mark.slow
def test_finetune_sigkill_then_rerun_is_bitwise_exact(tmp_path):
  """A real process killed at a random logged step (after a checkpoint) and rerun with the same
  command logs the same losses and evaluations as an uninterrupted one."""
  import random  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from tests import launch  # pylint: disable=g-import-not-at-top

  def start(workdir):
    return launch.start([sys.executable, 'main.py', f'--workdir={workdir}', *FINETUNE_CLI], 2)

  reference, killed = str(tmp_path / 'reference'), str(tmp_path / 'killed')
  launch.finish(start(reference))
  seed = int(os.environ.get('MIM_FAULT_SEED', random.SystemRandom().randrange(10**6)))
  kill_after = random.Random(seed).randint(30, 140)
  proc = start(killed)
  deadline = time.time() + launch.TIMEOUT_S
  while len(launch.metrics(killed)) < kill_after or not launch.committed_steps(killed):
    assert proc.poll() is None, f'MIM_FAULT_SEED={seed}: the run ended before the kill'
    assert time.time() < deadline, f'MIM_FAULT_SEED={seed}: no progress'
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  out = launch.finish(start(killed))
  assert 'Resumed from' in out
  a, b = launch.metrics(reference), launch.metrics(killed)
  keys = ('step', 'loss', 'grad_norm', 'eval_top1', 'eval_top5')
  assert [[r.get(k) for k in keys] for r in b] == [[r.get(k) for k in keys] for r in a], seed
  with open(os.path.join(reference, 'finetune.json')) as f1, open(
      os.path.join(killed, 'finetune.json')) as f2:
    assert json.load(f1)['top1'] == json.load(f2)['top1']
