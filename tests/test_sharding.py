"""One code path for every mesh: the same loss and parameters on 1 device and on 8-device meshes."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mim import sharding
from mim import train
from tests.test_train import tiny_config

STEPS = 3


def sharded_config(data, fsdp, tensor):
  # Widths divisible by fsdp=4 and heads by tensor=2, batch by data*fsdp.
  cfg = tiny_config()
  cfg.model.update(dict(width=32, num_heads=2, decoder_width=16, decoder_heads=2))
  cfg.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
  return cfg


def run_steps(cfg, devices):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  parts = train.build_parts(cfg, total_steps=10, warmup_steps=2)
  rng = np.random.default_rng(0)
  batches = rng.standard_normal((STEPS, cfg.batch_size, 16, 16, 3)).astype(np.float32)
  with sharding.use_mesh(mesh):
    _, shardings = train.state_shardings(parts, mesh)
    state = train.init_state(parts, shardings, cfg.seed)
    step = train.jit_train_step(cfg, parts, mesh, shardings)
    losses = []
    for images in batches:
      state, metrics = step(state, sharding.global_batch({'image': images},
                                                         sharding.batch_sharding(mesh)))
      losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params), state


@pytest.fixture(scope='module')
def single_device():
  return run_steps(sharded_config(1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)])
def test_mesh_matches_single_device(single_device, mesh_shape):
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 simulated CPU devices'
  ref_losses, ref_params, _ = single_device
  losses, params, state = run_steps(sharded_config(*mesh_shape), jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
  assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs
  # The parameters really are sharded as the logical rules say.
  kernel = state.params['encoder']['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']
  expected = P('fsdp', 'tensor')
  assert kernel.sharding.spec == expected
  assert len(kernel.sharding.device_set) == 8


def test_mesh_shape_fill_and_errors():
  cfg = sharded_config(2, -1, 1)
  assert sharding.mesh_shape(cfg.mesh, 8) == (2, 4, 1)
  with pytest.raises(ValueError, match='needs 6 devices, but 8 are available'):
    sharding.mesh_shape(sharded_config(2, 3, 1).mesh, 8)
  with pytest.raises(ValueError, match='do not divide'):
    sharding.mesh_shape(sharded_config(3, -1, 1).mesh, 8)


def test_grad_accumulation_and_remat_give_the_same_step(single_device):
  """Micro-batching (grad_accum_steps) and block remat change memory, not the numbers."""
  ref_losses, ref_params, _ = single_device
  cfg = sharded_config(8, 1, 1)
  cfg.grad_accum_steps = 2
  cfg.model.remat = True
  losses, params, _ = run_steps(cfg, jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
  assert max(jax.tree.leaves(diffs)) <= 1e-5
