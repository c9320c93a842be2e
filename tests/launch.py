"""Runs main.py in subprocesses (real processes for kill/preemption and multi-host tests)."""
import json
import os
import subprocess
import sys

import pytest

from mim import paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420


def xla_flags(devices: int) -> str:
  """The tests' XLA flags: `devices` simulated CPU devices, LLVM at -O0 (XLA's backend level 0)
  and the classic IR emitter for fused ops instead of XLA CPU's newer fusion emitters. The tests
  compile far more than they compute: -O0 takes a third off the in-process tests and a quarter off
  a tiny main.py run; the classic emitter halves a tiny train step's compile again (4.1 s -> 2.2
  s) and takes a tenth off the in-process tests. The HLO passes (fusion, layouts, sharding) are
  the same; floats can differ from the default flags in the last bit, so every bitwise comparison
  of the tests compares runs under these same flags. The README commands get them too (one
  device, as a user's shell has; its multi-process line keeps its own device count), and so does
  the methods-table smoke test. A jaxlib without one of these flags stops at start with "Unknown
  flag in XLA_FLAGS"."""
  return (f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
          ' --xla_cpu_use_fusion_emitters=false')


# A tiny MAE on the embedded digits: each step takes milliseconds, compiling a few seconds.
TINY = [
    '--config.batch_size=16', '--config.log_every_steps=1', '--config.reconstruction_every_steps=0',
    '--config.eval.knn=False', '--config.eval.num_reconstructions=4',
    '--config.optim.warmup_steps=1', '--config.model.image_size=16', '--config.model.patch_size=4',
    '--config.model.width=32', '--config.model.depth=2', '--config.model.num_heads=2',
    '--config.model.decoder_width=16', '--config.model.decoder_depth=1',
    '--config.model.decoder_heads=2',
    '--config.peak_tflops_per_device=1',   # MFU's peak given: no timed 2048^3 matmul per run
]


def start(cmd: list[str], devices: int = 1, **extra_env: str) -> subprocess.Popen:
  """Starts `cmd` in the repository root with `devices` simulated CPU devices under the tests'
  XLA flags (one is what a user's shell has); stdout and stderr come back as one text stream."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), **extra_env)
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def run_checked(cmd: list[str], devices: int = 1, **extra_env: str) -> str:
  """Runs `cmd` to its end (see `start`); fails the test unless it exits 0. Returns its output."""
  return finish(start(cmd, devices, **extra_env))


def launch(workdir, *args, devices: int = 1, env=None) -> subprocess.Popen:
  cmd = [sys.executable, 'main.py', '--config=configs/demo.py', f'--workdir={workdir}', *TINY,
         *args]
  return start(cmd, devices, MIM_INIT_TIMEOUT_S='120', **(env or {}))


def finish(proc: subprocess.Popen, expect_rc: int = 0) -> str:
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f'process timed out: {proc.args}\n{out[-3000:]}')
  assert proc.returncode == expect_rc, f'{proc.args}\n{out[-3000:]}'
  return out


def run(workdir, *args, devices: int = 1, expect_rc: int = 0) -> str:
  return finish(launch(workdir, *args, devices=devices), expect_rc)


def metrics(workdir) -> list[dict]:
  """The complete rows of a (local or gs://) workdir's metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines(keepends=True)
          if line.endswith('\n')]


def committed_steps(workdir) -> list[int]:
  """The steps of a (local or gs://) workdir that Orbax counts as finished checkpoints. A step
  folder is not one: on gs:// it exists while it is written, and only its commit_success.txt
  makes it a checkpoint (a kill before that leaves nothing to resume)."""
  import orbax.checkpoint as ocp  # here: conftest sets XLA_FLAGS before jax is imported
  return sorted(ocp.utils.checkpoint_steps(os.path.join(workdir, 'checkpoints')))


def copy_tree(source: str, target: str) -> None:
  """Copies every file below `source` to the same place below `target`; either may be gs://."""
  for name in paths.files_under(source):
    paths.write_bytes(os.path.join(target, name), paths.read_bytes(os.path.join(source, name)))


def on_storage(local: str, storage: str, name: str) -> str:
  """`local` itself when `storage` is a local root, else its copy at `storage`/`name` (gs://)."""
  if not paths.is_remote(storage):
    return local
  copy_tree(local, f'{storage}/{name}')
  return f'{storage}/{name}'
