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

MIMALLOC = host_memory.mimalloc_library()
needs_mimalloc = pytest.mark.skipif(
    MIMALLOC is None or not sys.platform.startswith('linux'),
    reason='the cmeel-mimalloc wheel is not installed (pip install -r requirements.txt, Linux)')


def _rounds(mode: str, **extra_env) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, **extra_env)
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


@needs_mimalloc
def test_preloaded_mimalloc_reuses_freed_buffers():
  """Preloaded with MIMALLOC_SETTINGS (as set_up starts it), mimalloc serves the second round
  from the first round's pages, where glibc's default faults every page again. Catches a preload
  that does not take effect (a wrong library path, the process not restarted)."""
  rounds = _rounds('default', LD_PRELOAD=MIMALLOC, **host_memory.MIMALLOC_SETTINGS)
  assert rounds['faults'][1] < 0.01, rounds  # huge pages: the first touch faults ~1/512 per page


# Prints a line at every start; set_up restarts the process on mimalloc (same pid, same arguments).
_RESTART = r'''
import json, os, sys
from mim import host_memory
print('start', os.getpid(), flush=True)
allocator = host_memory.set_up(mimalloc=sys.argv[1] == 'on', keep_freed=False)
print(json.dumps(dict(allocator=allocator, pid=os.getpid(), argv=sys.argv[1:],
                      purge=os.environ.get('MIMALLOC_PURGE_DELAY'))))
'''


def _restart(choice: str, platforms: str = 'cpu') -> tuple[list[str], dict]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('LD_PRELOAD', 'MIMALLOC_'))}
  env.update(JAX_PLATFORMS=platforms, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-u', '-c', _RESTART, choice, 'two words'], env=env,
                       capture_output=True, text=True, check=True, cwd=ROOT, timeout=60)
  lines = out.stdout.strip().splitlines()
  return [line for line in lines if line.startswith('start')], json.loads(lines[-1])


@needs_mimalloc
def test_set_up_restarts_the_process_on_mimalloc_once():
  """main.py's set-up: one restart onto mimalloc with the same pid, arguments and interpreter
  options (-u, -c), purging off; none when asked for glibc or on an accelerator. Catches the
  preload not taking effect, lost arguments, a restart loop (the timeout), a restart on GPU."""
  starts, result = _restart('on')
  assert result == dict(allocator='mimalloc', pid=result['pid'], argv=['on', 'two words'],
                        purge='-1'), result
  assert starts == [f'start {result["pid"]}'] * 2, starts
  for choice, platforms in (('off', 'cpu'), ('on', 'cuda')):
    starts, result = _restart(choice, platforms)
    assert len(starts) == 1 and result['allocator'] == 'glibc', (choice, platforms, result)
