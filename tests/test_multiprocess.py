"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1) match one process with 8 devices.

No warmup and a 10x lr, so the parameters move ~1e-3 per step, and the loss and grad_norm of
every step are compared too: a missing mean over processes or a gradient scale error shows in
grad_norm even where Adam's normalization hides it from the parameters."""
import os
import shutil
import socket

import jax
import numpy as np
import pytest

from mim import interop
from tests import launch

SHARDED = ['--config.total_steps=3', '--config.checkpoint_every_steps=3',
           '--config.optim.warmup_steps=0', '--config.optim.base_lr=1e-2',
           '--config.mesh.data=2', '--config.mesh.fsdp=-1', '--config.eval.knn=True']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def losses(workdir, key='loss'):
  return {r['step']: r[key] for r in launch.metrics(workdir) if 'loss' in r}  # not knn rows


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  single = str(tmp_path_factory.mktemp('single'))
  multi = str(tmp_path_factory.mktemp('multi'))
  port = free_port()
  procs = [launch.launch(multi, *SHARDED, f'--coordinator_address=127.0.0.1:{port}',
                         '--num_processes=2', f'--process_id={i}', devices=4) for i in range(2)]
  outs = [launch.finish(p) for p in procs]
  launch.run(single, *SHARDED, devices=8)
  return single, multi, outs


def test_two_processes_match_one(runs):
  single, multi, outs = runs
  assert 'on 8 device(s)' in outs[0]
  a, b = losses(single), losses(multi)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], atol=1e-5)
  ga, gb = losses(single, 'grad_norm'), losses(multi, 'grad_norm')
  np.testing.assert_allclose([gb[s] for s in (1, 2, 3)], [ga[s] for s in (1, 2, 3)], rtol=1e-5)
  _, pa = interop.load(single)
  _, pb = interop.load(multi)
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), pa, pb)
  # Params move ~2e-3 in 3 steps; Adam turns the rounding noise of gradients that are zero in
  # exact arithmetic (the key biases') into up to ~1e-4 (the grad_norm check is the sharp one).
  assert max(jax.tree.leaves(diffs)) <= 1e-4


def test_only_process_zero_writes(runs):
  _, multi, outs = runs
  assert 'step 3/3' in outs[0] and 'step 3/3' not in outs[1]
  assert 'kNN accuracy' in outs[0] and 'kNN accuracy' not in outs[1]   # computed by both
  assert os.listdir(os.path.join(multi, 'reconstructions')) == ['step_0000003.png']
  assert len([f for f in os.listdir(multi) if f.startswith('events.out')]) == 1


def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
  _, multi, _ = runs
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(multi, resumed)
  out = launch.run(resumed, *SHARDED, '--config.total_steps=5', devices=8)
  assert 'saved by another process count' in out
  assert sorted(losses(resumed)) == [1, 2, 3, 4, 5]
