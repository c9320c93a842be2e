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
(bench/step_profile.py keeps glibc's default). The config switch is `keep_freed_host_memory`.

This must run before XLA's threads first allocate: at the top of an entry point, before jax
initializes a backend. glibc fixes its arena limit when a second thread first needs an arena.
"""
import ctypes
import importlib.util
import os

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
