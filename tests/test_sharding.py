"""One code path for every mesh: the same loss, gradient norm and parameters on 1 device and on
8-device meshes, and under gradient accumulation and remat.

The steps run plain SGD (lr 0.5, no warmup) through the real train step, so the parameters move
by lr * grad (~1e-2) and a gradient scale error shows in them: Adam would normalize it away
(and amplify the rounding noise of gradients that are zero in exact arithmetic, such as the key
biases'). A scale error also shows directly in grad_norm, compared at every step.
"""
import jax
import numpy as np
import optax
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


def run_steps(cfg, devices) -> dict:
  mesh = sharding.make_mesh(cfg.mesh, devices)
  cfg.optim.base_lr = 0.5 * 256 / cfg.batch_size   # lr 0.5
  parts = train.build_parts(cfg, total_steps=10, warmup_steps=0)._replace(tx=optax.sgd(1.0))
  rng = np.random.default_rng(0)
  batches = rng.standard_normal((STEPS, cfg.batch_size, 16, 16, 3)).astype(np.float32)
  with sharding.use_mesh(mesh):
    _, shardings = train.state_shardings(parts, mesh)
    state = train.init_state(parts, shardings, cfg.seed)
    initial = jax.device_get(state.params)
    step = train.jit_train_step(cfg, parts, mesh, shardings)
    losses, grad_norms = [], []
    for images in batches:
      state, metrics = step(state, sharding.global_batch({'image': images},
                                                         sharding.batch_sharding(mesh)))
      losses.append(float(metrics['loss']))
      grad_norms.append(float(metrics['grad_norm']))
  return dict(losses=losses, grad_norms=grad_norms, initial=initial,
              params=jax.device_get(state.params), state=state)


def max_abs_diff(a, b) -> list[float]:
  return jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b))


def assert_same_run(run: dict, reference: dict):
  np.testing.assert_allclose(run['losses'], reference['losses'], rtol=0, atol=1e-5)
  np.testing.assert_allclose(run['grad_norms'], reference['grad_norms'], rtol=1e-5)
  assert max(max_abs_diff(run['params'], reference['params'])) <= 1e-5
  # Most tensors move by 1e-3 or more, 100x the tolerance (the key biases do not: their gradients
  # are zero in exact arithmetic).
  assert np.median(max_abs_diff(run['params'], run['initial'])) > 1e-3


@pytest.fixture(scope='module')
def single_device():
  return run_steps(sharded_config(1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)])
def test_mesh_matches_single_device(single_device, mesh_shape):
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 simulated CPU devices'
  run = run_steps(sharded_config(*mesh_shape), jax.devices())
  assert_same_run(run, single_device)
  state = run['state']
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
  cfg = sharded_config(8, 1, 1)
  cfg.grad_accum_steps = 2
  cfg.model.remat = True
  assert_same_run(run_steps(cfg, jax.devices()), single_device)
