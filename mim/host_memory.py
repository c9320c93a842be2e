"""Keep freed host memory in the process, so that XLA's CPU step does not page-fault its buffers.

On CPU, XLA allocates each execution's temporaries (1.2 GB for ViT-Ti/4 at batch 128) with
malloc on one of its worker threads and frees them at the end of the step. glibc serves an
allocation that large with a fresh mmap and returns it with munmap, so every step touches ~300k
new pages: the kernel zeroes and maps each one (22.5M minor faults and 35 s of system time in
150 CIFAR-10 steps). One malloc arena with mmap off and trimming off lets the next step reuse the
same memory: 244 -> 263 img/s in that run, ViT-Ti/4 1.38 -> 1.05 s/step in bench/run.py
(docs/speed.md, "Page faults"). The cost: the heap keeps its high-water mark, and all threads
share one malloc lock: compiles take 1.5-5 s longer, a step with small buffers gets slower (the demo's,
89 MiB: 0.086 -> 0.092-0.104 s, so configs/demo.py turns it off), and profiler traces contend
(bench/step_profile.py keeps glibc's default).

mimalloc does the same without the shared lock: where the cmeel-mimalloc wheel is installed (a
requirement on Linux), `set_up` re-executes the process with it preloaded and told never to return
freed pages (MIMALLOC_PURGE_DELAY=-1). On 2 AMD EPYC cores (2026-12-07, docs/speed.md, "mimalloc"):
ViT-Ti/4 batch 128 1.24-1.50 -> 1.08-1.15 s/step against the one glibc arena, configs/cifar10.py's
step 0.62-0.77 -> 0.54-0.66 s, the demo's 0.096-0.117 (glibc's default) -> 0.072-0.082 s, ViT-B
level; compiles 1-3 s faster; peak RSS up to 0.5 GiB higher (2-3 GiB on ViT-B at batch 8). The
config switches are `mimalloc` and, for glibc, `keep_freed_host_memory`.

This must run before XLA's threads first allocate: at the top of an entry point, before jax
initializes a backend. glibc fixes its arena limit when a second thread first needs an arena, and
a preload takes effect only in a new process image.
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import sys
from typing import Optional

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_INT_MAX = 2 ** 31 - 1


def computes_on_host_cpu() -> bool:
  """Whether jax will compute on the CPU: JAX_PLATFORMS says so, or no GPU/TPU plugin is
  installed (accelerator hosts keep glibc's defaults: their step's buffers are device memory)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(importlib.util.find_spec(name) for name in ('jax_plugins', 'libtpu'))


def keep_freed_memory() -> bool:
  """Make glibc reuse freed memory instead of returning it to the kernel (see the module
  docstring); only where jax computes on the CPU and the C library is glibc. True if applied."""
  if not computes_on_host_cpu():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  applied = [mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))]
  return all(applied)


# Set in the re-executed process: a preload that did not load is not retried in a loop.
_RESTARTED = 'MIM_MIMALLOC_RESTARTED'
# mimalloc keeps freed pages mapped (XLA's per-step temporaries are reused, not faulted anew).
MIMALLOC_SETTINGS = {'MIMALLOC_PURGE_DELAY': '-1'}


def mimalloc_library() -> Optional[str]:
  """Path of the cmeel-mimalloc wheel's libmimalloc.so, or None where it is not installed."""
  try:
    files = importlib.metadata.distribution('cmeel-mimalloc').files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  found = [f.locate() for f in files if f.name == 'libmimalloc.so']
  return str(found[0]) if found and os.path.exists(found[0]) else None


def mimalloc_loaded() -> bool:
  """Whether this process runs on mimalloc (preloaded by set_up, or by the user)."""
  try:
    with open('/proc/self/maps') as f:
      return 'libmimalloc' in f.read()
  except OSError:
    return False


def restart_on_mimalloc() -> None:
  """Re-execute this process (same interpreter, options and arguments, same pid) with mimalloc
  preloaded, where jax computes on a Linux CPU and the wheel is installed; else return."""
  library = mimalloc_library()
  if (not sys.platform.startswith('linux') or not computes_on_host_cpu() or library is None
      or mimalloc_loaded() or os.environ.get(_RESTARTED)):
    return
  env = dict(MIMALLOC_SETTINGS, **os.environ)
  env['LD_PRELOAD'] = ' '.join(filter(None, (library, os.environ.get('LD_PRELOAD'))))
  env[_RESTARTED] = '1'
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def set_up(mimalloc: bool, keep_freed: bool) -> str:
  """An entry point's host-memory setting, before jax's first use: mimalloc where asked and
  installed (this call then does not return but restarts the process on it), else glibc's
  one-arena setting where asked. Returns the allocator in use: 'mimalloc', 'glibc (freed memory
  kept)' or 'glibc'."""
  if mimalloc:
    restart_on_mimalloc()
  if mimalloc_loaded():
    return 'mimalloc'
  return 'glibc (freed memory kept)' if keep_freed and keep_freed_memory() else 'glibc'
