"""Hugging Face `ViTMAEForPreTraining`'s train step: the PyTorch side of bench/run.py.

  python bench/hf_step.py '{"config": {...}, "batch": 8, ...}'   (bench/run.py starts it)

Imports only torch and transformers (jax is never loaded), so the peak RSS it reports is
PyTorch's alone. The set-up comes as one JSON argument from bench/run.py, which derives it from
our config: the ViTMAE config, batch, image size, patch count, lr and weight decay.

The worker protocol (`serve`, which run.py's own worker uses too): one JSON line with the set-up
figures, then for each line `n` on stdin one JSON line with n step times and the peak RSS, and for
a line naming one of the worker's commands (run.py's own: `floor`) its JSON answer.
"""
import json
import os
import resource
import sys
import time


def serve(run, compile_s: float, info: dict, commands: dict | None = None) -> None:
  print(json.dumps(dict(compile_s=compile_s, **info)), flush=True)
  for line in sys.stdin:
    if not line.strip():
      break
    if line.strip() in (commands or {}):
      print(json.dumps(commands[line.strip()]()), flush=True)
      continue
    times = run(int(line))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(times=times, peak_rss=rss)), flush=True)


def build(setup: dict):
  """(run(n) -> step seconds, first-step seconds): fp32, sdpa attention, the `noise` argument
  given, torch AdamW with MAE's betas (0.9, 0.95) and weight decay off biases, norms, tokens."""
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  net = transformers.ViTMAEForPreTraining(
      transformers.ViTMAEConfig(**setup['config'], attn_implementation='sdpa')).train()
  decay = [p for n, p in net.named_parameters() if p.ndim > 1 and 'token' not in n]
  no_decay = [p for n, p in net.named_parameters() if not (p.ndim > 1 and 'token' not in n)]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': setup['weight_decay']},
                           {'params': no_decay, 'weight_decay': 0.0}],
                          lr=setup['lr'], betas=(0.9, 0.95))
  batch, size = setup['batch'], setup['image_size']
  images = torch.randn(batch, 3, size, size)
  gen = torch.Generator().manual_seed(1)

  def run(n):
    times = []
    for _ in range(n):
      t = time.perf_counter()
      noise = torch.rand(batch, setup['num_patches'], generator=gen)
      loss = net(pixel_values=images, noise=noise).loss
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      times.append(time.perf_counter() - t)
    return times

  t = time.perf_counter()
  run(1)  # first-call allocations and kernel selection: torch's "compile time"
  return run, time.perf_counter() - t


def matmul_gflops(n: int = 2048, reps: int = 7) -> float:
  """torch's best n^3 fp32 matmul rate here (GFLOP/s): next to XLA's, it tells how much of a
  ratio between the two steps is the BLAS (MKL's sgemm on AMD EPYC runs at half XLA's rate)."""
  import torch
  torch.set_num_threads(os.cpu_count())
  x = torch.randn(n, n)
  x @ x
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    x @ x
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


if __name__ == '__main__':
  serve(*build(json.loads(sys.argv[1])), {})
