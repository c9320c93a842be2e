"""End-to-end training on the embedded digits: outputs, loss, exact resume."""
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from mim import config as config_lib
from mim import sharding
from mim import train


def tiny_config(**overrides):
  c = config_lib.default_config()
  c.batch_size = 16
  c.total_steps = 6
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.reconstruction_every_steps = 3
  c.optim.warmup_steps = 2
  c.optim.base_lr = 1e-3
  c.model.update(dict(variant='', image_size=16, patch_size=4, width=32, depth=2, num_heads=2,
                      decoder_width=16, decoder_depth=1, decoder_heads=2))
  c.data.update(dict(name='digits', train_split='train', eval_split='test', num_workers=0))
  c.mesh.update(dict(data=-1, fsdp=1))
  c.eval.num_reconstructions = 4
  c.peak_tflops_per_device = 1.0   # MFU's peak given: no timed 2048^3 matmul per run
  c.update(overrides)
  return c


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('full'))
  state, metrics = train.train(tiny_config(), workdir)
  return workdir, state, metrics


def test_run_writes_all_outputs(full_run):
  workdir, state, _ = full_run
  assert int(state.step) == 6
  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in rows] == [2, 4, 6]
  for r in rows:
    assert {'loss', 'lr', 'img_per_sec', 'grad_norm', 'skipped_examples'} <= set(r)
    assert np.isfinite(r['loss']) and r['img_per_sec'] > 0
  assert rows[0]['lr'] > 0
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  assert sorted(os.listdir(os.path.join(workdir, 'reconstructions'))) == [
      'step_0000003.png', 'step_0000006.png']
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, events[0]))
  acc.Reload()
  assert [e.step for e in acc.Scalars('loss')] == [2, 4, 6]
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['width'] == 32


def test_resume_from_checkpoint_is_exact(full_run, tmp_path):
  """A run restarted from its step-3 checkpoint ends bitwise equal to the uninterrupted run."""
  workdir, state, _ = full_run
  resumed_dir = str(tmp_path / 'resumed')
  shutil.copytree(os.path.join(workdir, 'checkpoints', '3'),
                  os.path.join(resumed_dir, 'checkpoints', '3'))
  resumed, _ = train.train(tiny_config(), resumed_dir)
  assert int(resumed.step) == 6
  rows = read_jsonl(os.path.join(resumed_dir, 'metrics.jsonl'))
  assert [r['step'] for r in rows] == [4, 6]   # continues at the right step
  full_rows = {r['step']: r for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))}
  assert rows[-1]['loss'] == full_rows[6]['loss']
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rerun_of_finished_run_does_nothing_new(full_run):
  workdir, state, _ = full_run
  again, _ = train.train(tiny_config(), workdir)
  assert int(again.step) == 6
  assert [r['step'] for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))] == [2, 4, 6]


def test_longer_schedule_continues_from_latest(full_run, tmp_path):
  workdir, _, _ = full_run
  longer = str(tmp_path / 'longer')
  shutil.copytree(workdir, longer)
  state, _ = train.train(tiny_config(total_steps=8), longer)
  assert int(state.step) == 8
  assert [r['step'] for r in read_jsonl(os.path.join(longer, 'metrics.jsonl'))] == [2, 4, 6, 8]


def test_skipped_nan_updates_keep_the_lr_schedule():
  """Under nan_policy=skip the lr applied at step s is schedule(s) whatever was skipped before.

  Adam's first applied update is -lr * g / (|g| + eps) ~ -lr * sign(g) per element (no weight
  decay), so the median |delta p| / lr of that step measures the applied lr. Were the lr taken
  from the optimizer's own count (which skipped steps do not advance), steps 0-2 being skipped
  would make step 3 apply schedule(0) = 0 and move nothing."""
  from mim import sharding
  cfg = tiny_config(nan_policy='skip')
  cfg.optim.update(dict(weight_decay=0.0, warmup_steps=6))
  parts = train.build_parts(cfg, total_steps=10, warmup_steps=6)
  mesh = sharding.make_mesh(cfg.mesh)
  images = np.random.default_rng(0).standard_normal((16, 16, 16, 3)).astype(np.float32)
  bad = {0, 1, 2, 5}
  with sharding.use_mesh(mesh):
    _, shardings = train.state_shardings(parts, mesh)
    state = train.init_state(parts, shardings, cfg.seed)
    step = train.jit_train_step(cfg, parts, mesh, shardings)
    for s in range(7):
      before = jax.device_get(state.params)
      x = np.where(s in bad, np.nan, images).astype(np.float32)
      state, m = step(state, sharding.global_batch({'image': x}, sharding.batch_sharding(mesh)))
      after = jax.device_get(state.params)
      np.testing.assert_allclose(float(m['lr']), parts.schedule(s), rtol=1e-6)  # logged = applied
      delta = np.concatenate([np.abs(a - b).ravel() for a, b in
                              zip(jax.tree.leaves(after), jax.tree.leaves(before))])
      if s in bad:
        assert not bool(m['finite']) and delta.max() == 0
      elif s == 3:  # the first update Adam applies
        np.testing.assert_allclose(np.median(delta) / float(parts.schedule(s)), 1.0, rtol=1e-3)
  assert int(state.nonfinite_updates) == len(bad)
  assert int(state.opt_state[0].count) == 7 - len(bad)   # moments saw only the applied updates


def test_bfloat16_compute_stays_close_to_float32():
  """model.dtype='bfloat16' computes the step in bf16 (its dots are bf16 in the compiled step:
  catches a cast that silently promotes back to fp32) while params, moments and the loss stay
  fp32, and one step's loss and gradient norm stay within bf16's precision of the fp32 step's."""
  results = {}
  for dtype in ('float32', 'bfloat16'):
    cfg = tiny_config()
    cfg.model.dtype = dtype
    parts = train.build_parts(cfg, total_steps=6, warmup_steps=2)
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.use_mesh(mesh):
      _, shardings = train.state_shardings(parts, mesh)
      state = train.init_state(parts, shardings, cfg.seed)
      images = jax.device_put(jax.random.normal(jax.random.key(1), (cfg.batch_size, 16, 16, 3)),
                              sharding.batch_sharding(mesh))
      step = train.jit_train_step(cfg, parts, mesh, shardings)
      hlo = step.lower(state, {'image': images}).as_text()
      state, metrics = step(state, {'image': images})
    results[dtype] = metrics
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert metrics['loss'].dtype == jnp.float32
    assert ('bf16' in hlo) == (dtype == 'bfloat16')
  f32, bf16 = results['float32'], results['bfloat16']
  np.testing.assert_allclose(float(bf16['loss']), float(f32['loss']), rtol=2e-2)
  np.testing.assert_allclose(float(bf16['grad_norm']), float(f32['grad_norm']), rtol=5e-2)
  assert float(bf16['loss']) != float(f32['loss'])


def test_reconstruction_grids_stay_out_of_the_throughput(tmp_path, monkeypatch):
  """A grid at step 3 made 1 s slower: the next logged sec_per_step (step 4) is still the
  training speed (without the timer restart it would include half of that second)."""
  from mim.evaluate import reconstruction
  draw = reconstruction.save_reconstruction_grid

  def slow_draw(*args, **kwargs):
    time.sleep(1.0)
    return draw(*args, **kwargs)

  monkeypatch.setattr(reconstruction, 'save_reconstruction_grid', slow_draw)
  train.train(tiny_config(checkpoint_every_steps=100), str(tmp_path))
  rows = [r for r in read_jsonl(tmp_path / 'metrics.jsonl') if 'sec_per_step' in r]
  assert [r['step'] for r in rows] == [2, 4, 6]
  assert os.path.exists(tmp_path / 'reconstructions' / 'step_0000003.png')
  assert all(r['sec_per_step'] < 0.3 for r in rows[1:]), rows
