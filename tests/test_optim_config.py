"""Optimizer schedule and decay mask against the official recipe; config validation errors."""
import math

import jax
import numpy as np
import pytest

from mim import config as config_lib
from mim import optim
from tests.test_model import VITB, abstract_params


def official_lr(it, iters_per_epoch, epochs, warmup_epochs, lr, min_lr=0.0):
  """util/lr_sched.py of facebookresearch/mae, evaluated per iteration."""
  epoch = it / iters_per_epoch
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) /
                                                       (epochs - warmup_epochs)))


def test_lr_schedule_matches_official_per_iteration():
  cfg = config_lib.default_config()
  iters_per_epoch, epochs, warmup_epochs = 10, 20, 4
  sched = optim.lr_schedule(cfg.optim, 4096, total_steps=iters_per_epoch * epochs,
                            warmup_steps=iters_per_epoch * warmup_epochs)
  peak = 1.5e-4 * 4096 / 256
  assert optim.peak_lr(cfg.optim, 4096) == pytest.approx(2.4e-3)
  for it in range(0, iters_per_epoch * epochs, 7):
    assert float(sched(it)) == pytest.approx(official_lr(it, iters_per_epoch, epochs, warmup_epochs, peak),
                                             rel=1e-5, abs=1e-10)


def test_weight_decay_mask_is_explicit():
  params = abstract_params(VITB, 49)
  mask = optim.decay_mask(params, config_lib.default_config().optim.weight_decay_regex)
  flat = {optim.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat['encoder/cls'] and flat['decoder/mask_token']      # decayed, as in the official code
  assert flat['encoder/embedding/kernel'] and flat['decoder/pred/kernel']
  assert not flat['encoder/embedding/bias']
  assert not flat['encoder/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/bias']
  assert not flat['encoder/Transformer/encoder_norm/scale']
  # Same decision as the official rule: decay iff ndim >= 2 (torch shapes) and not a bias.
  decayed = sum(int(np.prod(x.shape)) for x, d in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if d)
  assert decayed == 111_655_680 - 12 * (4 * 768 + 3 * 768 + 768 + 3072 + 768) - 8 * (4 * 512 + 3 * 512 + 512 + 2048 + 512) \
      - 768 - 2 * 768 - 512 - 2 * 512 - 768


def make_cfg(**overrides):
  cfg = config_lib.default_config()
  for key, value in overrides.items():
    section, _, leaf = key.rpartition('.')
    (cfg[section] if section else cfg)[leaf] = value
  return cfg


@pytest.mark.parametrize('overrides, message', [
    ({'model.patch_size': 15}, 'model.patch_size=15 must divide model.image_size=224'),
    ({'masking.ratio': 1.0}, 'masking.ratio=1.0 must be in (0, 1)'),
    ({'masking.ratio': 0.0}, 'masking.ratio=0.0 must be in (0, 1)'),
    ({'masking.name': 'randon'}, "Did you mean 'random'"),
    ({'model.variant': 'XL'}, "model.variant='XL' is not a ViT preset"),
    ({'batch_size': 0}, 'batch_size=0 must be positive'),
    ({'mesh.data': -1}, 'at most one -1'),
    ({'model.dtype': 'float16'}, "model.dtype='float16' must be one of ('float32', 'bfloat16', 'auto')"),
])
def test_bad_values_are_rejected_with_the_key(overrides, message):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(make_cfg(**overrides))
  assert message in str(e.value)


def test_unknown_key_suggests_near_match():
  cfg = config_lib.default_config()
  cfg.unlock()
  cfg.masking.ration = 0.5
  with pytest.raises(config_lib.ConfigError, match=r"Unknown config key 'masking.ration'. Did you mean 'ratio'"):
    config_lib.validate(cfg)


def test_batch_must_divide_devices():
  with pytest.raises(config_lib.ConfigError, match='not divisible by the device count 8'):
    config_lib.check_batch_divides(12, 8, 1)
  config_lib.check_batch_divides(16, 8, 2)


def test_shipped_configs_validate():
  import pathlib
  for path in sorted(pathlib.Path(__file__).parent.parent.glob('configs/*.py')):
    cfg = config_lib.load(str(path))
    if cfg.teacher.kind == 'frozen' and not cfg.teacher.weights:  # the user names the teacher
      with pytest.raises(config_lib.ConfigError, match='needs teacher.weights=PATH'):
        config_lib.validate(cfg)
      cfg.teacher.weights = 'TEACHER'
    config_lib.validate(cfg)


def test_auto_dtype_is_bfloat16_on_accelerators_only(monkeypatch):
  """The pod recipes compute in bf16 on GPU/TPU and in fp32 on CPU (where parity is tested)."""
  import pathlib
  from mim.models import mae
  cfg = config_lib.load(str(pathlib.Path(__file__).parent.parent / 'configs' / 'mae_vitb.py'))
  assert cfg.model.dtype == cfg.teacher.dtype == 'auto'
  assert mae.spec_from_config(cfg.model).dtype == 'float32'   # this CPU
  for backend, expected in (('gpu', 'bfloat16'), ('tpu', 'bfloat16'), ('cpu', 'float32')):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert mae.spec_from_config(cfg.model).dtype == expected
    params, images = mae.cast_for_compute({'w': np.ones(2, np.float32)}, np.ones(2, np.float32),
                                          'auto')
    assert params['w'].dtype == images.dtype == expected
  assert mae.resolve_dtype('float32') == 'float32' and mae.resolve_dtype('bfloat16') == 'bfloat16'
