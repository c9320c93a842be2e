"""mim/host_memory.py: freed memory is reused, not page-faulted anew (as XLA's CPU temporaries)."""
import json
import os
import subprocess
import sys

import pytest

from mim import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Like XLA's CPU step: a worker thread mallocs a large buffer, writes all of it, frees it; twice.
# Prints the minor page faults of each round, in pages of the buffer.
_ROUNDS = r'''
import ctypes, json, resource, sys, threading
from mim import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == 'tuned' else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
faults = []
def one_round():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buf = libc.malloc(size)
  ctypes.memset(buf, 1, size)
  libc.free(buf)
  faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (size // 4096))
for _ in range(2):
  t = threading.Thread(target=one_round)
  t.start()
  t.join()
print(json.dumps(dict(applied=applied, faults=faults)))
'''


def _rounds(mode: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-c', _ROUNDS, mode], env=env, capture_output=True,
                       text=True, check=True, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt: Linux only')
def test_freed_buffers_are_reused_instead_of_faulted_again():
  """glibc's default maps a fresh 256 MB buffer per round from a thread (every page faults
  again); with keep_freed_memory the second round reuses the first round's pages. Catches the
  setting not applied (e.g. an arena limit set too late, or mmap left on)."""
  default, tuned = _rounds('default'), _rounds('tuned')
  assert not default['applied'] and tuned['applied']
  assert default['faults'][1] > 0.9, default  # every page faults again
  assert tuned['faults'][0] > 0.9, tuned  # the first touch is real
  assert tuned['faults'][1] < 0.01, tuned  # then reused


def test_only_applied_where_jax_computes_on_the_cpu(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert not host_memory.computes_on_host_cpu() and not host_memory.keep_freed_memory()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_memory.computes_on_host_cpu()
