"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1) match one process with 8 devices."""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mim import interop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420
OVERRIDES = [
    '--config.batch_size=16', '--config.total_steps=3', '--config.log_every_steps=1',
    '--config.checkpoint_every_steps=3', '--config.reconstruction_every_steps=0',
    '--config.eval.knn=False', '--config.eval.num_reconstructions=4',
    '--config.optim.warmup_steps=1', '--config.model.image_size=16', '--config.model.width=32',
    '--config.model.depth=2', '--config.model.num_heads=2', '--config.model.decoder_width=16',
    '--config.model.decoder_depth=1', '--config.model.decoder_heads=2',
    '--config.mesh.data=2', '--config.mesh.fsdp=-1',
]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(workdir, devices, extra=(), process_id=None, num_processes=None, port=None):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             MIM_INIT_TIMEOUT_S='120')
  cmd = [sys.executable, 'main.py', '--config=configs/demo.py', f'--workdir={workdir}',
         *OVERRIDES, *extra]
  if process_id is not None:
    cmd += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num_processes}',
            f'--process_id={process_id}']
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(proc):
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f'process timed out:\n{out[-3000:]}')
  assert proc.returncode == 0, out[-3000:]
  return out


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  single = str(tmp_path_factory.mktemp('single'))
  multi = str(tmp_path_factory.mktemp('multi'))
  port = free_port()
  procs = [launch(multi, 4, process_id=i, num_processes=2, port=port) for i in range(2)]
  outs = [finish(p) for p in procs]
  finish(launch(single, 8))
  return single, multi, outs


def test_two_processes_match_one(runs):
  single, multi, outs = runs
  assert 'on 8 device(s)' in outs[0]
  a, b = losses(single), losses(multi)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], atol=1e-5)
  _, pa = interop.load(single)
  _, pb = interop.load(multi)
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), pa, pb)
  assert max(jax.tree.leaves(diffs)) <= 1e-5


def test_only_process_zero_writes(runs):
  _, multi, outs = runs
  assert 'step 3/3' in outs[0] and 'step 3/3' not in outs[1]
  assert len([f for f in os.listdir(multi) if f.startswith('events.out')]) == 1


def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
  _, multi, _ = runs
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(multi, resumed)
  out = finish(launch(resumed, 8, extra=['--config.total_steps=5']))
  assert 'saved by another process count' in out
  assert sorted(losses(resumed)) == [1, 2, 3, 4, 5]
