"""Fine-tuning pieces: layer-wise lr decay vs the official rule, mixup / cutmix label mixing."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim import config as config_lib
from mim.finetune import layer_decay
from mim.finetune import mixup
from mim.models import mae


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
