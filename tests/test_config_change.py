"""A changed config never discards checkpoints: a checkpoint that does not fit is explained and
left untouched, and `init_from_state` continues it under the new config in a new workdir."""
import hashlib
import os
import shutil

import pytest

from mim import checkpoint as ckpt_lib
from mim import paths
from tests import launch

RUN = ['--config.total_steps=40', '--config.checkpoint_every_steps=20']
CLIP = '--config.optim.grad_clip_norm=1.0'


def snapshot(root) -> dict[str, str]:
  """Every file under `root` (local or gs://) with the sha256 of its bytes."""
  return {name: hashlib.sha256(paths.read_bytes(os.path.join(root, name))).hexdigest()
          for name in paths.files_under(root)}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A 40-step run and the losses of its continuation to step 42 under the original config."""
  workdir = str(tmp_path_factory.mktemp('source') / 'run')
  launch.run(workdir, *RUN)
  continued = str(tmp_path_factory.mktemp('continued') / 'run')
  shutil.copytree(workdir, continued)
  launch.run(continued, '--config.total_steps=42', '--config.checkpoint_every_steps=20')
  return workdir, {r['step']: r['loss'] for r in launch.metrics(continued) if r['step'] > 40}


def test_changed_state_config_stops_and_touches_nothing(source, storage_gs_slow):
  workdir = f'{storage_gs_slow}/run'
  launch.copy_tree(source[0], workdir)
  before = snapshot(os.path.join(workdir, 'checkpoints'))
  out = launch.run(workdir, *RUN, CLIP, expect_rc=2)
  assert 'Traceback' not in out and 'does not fit this config' in out
  assert 'opt_state/0: present in checkpoint 40, absent in this config' in out
  assert 'optim.grad_clip_norm: 0.0 -> 1.0' in out      # the key that caused it
  assert f'--config.init_from={workdir}' in out           # the way out
  assert snapshot(os.path.join(workdir, 'checkpoints')) == before   # same files, same bytes
  assert paths.listdir(os.path.join(workdir, 'checkpoints')) == ['20', '40']
  # The original config still resumes at 40 and continues exactly.
  out = launch.run(workdir, '--config.total_steps=42', '--config.checkpoint_every_steps=20')
  assert f'Resumed from {workdir}/checkpoints/40' in out
  assert {r['step']: r['loss'] for r in launch.metrics(workdir) if r['step'] > 40} == source[1]


def test_init_from_state_continues_under_gradient_clipping(source, storage):
  """init_from another workdir's full state, both workdirs local or both on gs://."""
  workdir, init_from = f'{storage}/clipped', launch.on_storage(source[0], storage, 'source')
  out = launch.run(workdir, '--config.total_steps=42', CLIP, f'--config.init_from={init_from}',
                   '--config.init_from_state=True')
  assert 'restored step, params/decoder, params/encoder' in out
  assert 'started fresh: opt_state/1' in out and 'starting at step 40' in out
  losses = {r['step']: r['loss'] for r in launch.metrics(workdir)}
  assert sorted(losses) == [41, 42]
  # Step 41's loss is computed before its update: the same params and the same data position.
  assert losses[41] == source[1][41]
  saved = ckpt_lib.flat_signature(ckpt_lib.read_state_metadata(
      os.path.join(workdir, 'checkpoints', '42')))
  assert any(p.startswith('opt_state/1/0/mu/encoder/') for p in saved)   # the clipping chain


def test_transient_errors_are_raised_and_rename_nothing(source, tmp_path, monkeypatch):
  """An OSError that is not a missing file (a network filesystem hiccup) is retried, then raised
  as it is: never taken for corruption."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(source[0], workdir)
  calls = []

  def flaky(step_dir):
    calls.append(step_dir)
    raise OSError(5, 'Input/output error')

  monkeypatch.setattr(ckpt_lib, 'read_state_metadata', flaky)
  monkeypatch.setattr(ckpt_lib.time, 'sleep', lambda s: None)
  mngr = ckpt_lib.manager(os.path.join(workdir, 'checkpoints'))
  with pytest.raises(OSError, match='Input/output error'):
    ckpt_lib.restore_latest(mngr, None, lambda start: None)
  assert len(calls) == ckpt_lib.TRANSIENT_RETRIES
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40']
