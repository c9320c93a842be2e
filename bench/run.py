"""One table: our MAE train step against Hugging Face `ViTMAEForPreTraining`, measured in one run.

  python bench/run.py                 # ViT-B/16 batch 8, the demo model, ViT-Ti/4 32 px batch 128
  python bench/run.py --cases=vitb16:8 --rounds=4 --per_round=2 --json

For each case, two worker processes build the same architecture: ours (this file with
--worker_case: the real jitted step of mim/train.py: masking, forward, backward, AdamW, NaN guard)
and Hugging Face's (bench/hf_step.py, which never imports jax: fp32, sdpa attention, the `noise`
argument given so masking costs the same, torch AdamW with MAE's betas (0.9, 0.95) and weight
decay 0.05 off biases and norms, `torch.set_num_threads` = all cores, as XLA uses). The parent
alternates them: a few steps of one, then of the other, `--rounds` times, and reports medians,
so both see the same machine state, and the range of each round's ratio (a busy neighbour slows
both sides of a round alike, so the spread of the per-round ratios says how far to trust the
median's). Separate processes keep each side's thread pool and peak RSS its own.

Also printed: the step's matmul floor (bench/matmul_floor.py: every matmul of the step timed
alone, measured in our worker while Hugging Face's waits) and the share of it the step reaches,
the criteria of GOALS met or not, compile time, peak RSS, GFLOP/s (analytic, mim/flops.py) and %
of this machine's measured 2048^3 matmul rate (XLA's, and torch's next to it: the speed-up moves between machine
kinds with the ratio of the two BLAS rates), the masking overhead (bench/masking.py), and the
input pipeline's images/s per worker (bench/data_pipeline.py: JPEG folder and TFDS ArrayRecord,
224 px) next to what the ViT-B step consumes. `--json` ends with one JSON line holding every figure.
"""
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import hf_step  # noqa: E402  (bench/hf_step.py: the PyTorch side, its own process)
import masking as masking_bench  # noqa: E402  (bench/masking.py)
from bench import matmul_floor  # noqa: E402
import train_step as step_bench  # noqa: E402  (bench/train_step.py: its flags, --json among them)

flags.DEFINE_list('cases', ['vitb16:8', 'demo:128', 'tiny32:128'], 'model:batch pairs '
                  '(models of bench/train_step.py).')
flags.DEFINE_integer('rounds', 5, 'Alternations of ours and Hugging Face per case.')
flags.DEFINE_integer('per_round', 2, 'Timed steps per side per round.')
flags.DEFINE_bool('pipeline', True, 'Also measure the input pipeline (about a minute).')
flags.DEFINE_string('worker_case', None, 'Internal: run as our side\'s worker of this model:batch.')
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- workers

def _ours(model: str, batch: int):
  """(run(n) -> step seconds, compile seconds, info, {'floor': the step's matmul floor}) for our
  jitted step."""
  import jax
  from mim import flops as flops_lib
  cfg = step_bench.load_config(model)
  allocator = step_bench.tune_malloc(cfg)
  compiled, state, data, compile_s, parts, jaxpr = step_bench.compiled_step(cfg, batch)
  box = {'state': state}

  def run(n):
    times = []
    for _ in range(n):
      t = time.perf_counter()
      box['state'], metrics = compiled(box['state'], data)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    return times

  run(1)  # the first call allocates the donated buffers' successors
  gflop = flops_lib.train_flops_per_image(parts.spec, parts.keep) * batch / 1e9
  return run, compile_s, dict(gflop_per_step=gflop, keep=parts.keep, allocator=allocator,
                              num_patches=parts.spec.num_patches), {
                                  'floor': lambda: matmul_floor.floor(jaxpr)}


def hf_setup(model: str, batch: int) -> dict:
  """bench/hf_step.py's set-up for the same architecture and optimizer as our `model`."""
  from mim.interop import hf as hf_interop
  from mim.models import mae
  cfg = step_bench.load_config(model)
  spec = mae.spec_from_config(cfg.model)
  config = hf_interop.config_json(spec, norm_pix=cfg.targets.norm_pix, mask_ratio=cfg.masking.ratio)
  return dict(config={k: v for k, v in config.items() if k not in ('architectures', 'model_type')},
              batch=batch, image_size=spec.image_size, num_patches=spec.num_patches,
              lr=cfg.optim.base_lr * batch / 256, weight_decay=cfg.optim.weight_decay)


class Worker:
  def __init__(self, kind: str, case: str):
    here = os.path.dirname(os.path.abspath(__file__))
    model, batch = case.split(':')
    allocator = [f'--{name}={FLAGS[name].value}' for name in ('mimalloc', 'keep_freed_memory')
                 if FLAGS[name].value is not None]
    command = ([os.path.join(here, 'run.py'), f'--worker_case={case}'] + allocator
               if kind == 'ours' else
               [os.path.join(here, 'hf_step.py'), json.dumps(hf_setup(model, int(batch)))])
    self.proc = subprocess.Popen(
        [sys.executable] + command,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.kind = kind

  def read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'The {self.kind} worker ended early (exit code {self.proc.wait()}); '
                         'its error is printed above.')
    return json.loads(line)

  def run(self, n: int | str) -> dict:
    """n timed steps, or the answer of the worker's command n."""
    self.proc.stdin.write(f'{n}\n')
    self.proc.stdin.flush()
    return self.read()

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


# ----------------------------------------------------------------------------- parent


def measure_case(case: str, rounds: int, steps: int) -> dict:
  sides = {kind: Worker(kind, case) for kind in ('ours', 'hf')}
  setup = {kind: w.read() for kind, w in sides.items()}  # both build at once, then time alone
  matmuls = sides['ours'].run('floor')   # while Hugging Face's worker waits
  times = {kind: [] for kind in sides}
  rss = {}
  round_speedups = []  # each round's HF median over ours: the two sides seconds apart
  for _ in range(rounds):
    medians = {}
    for kind, w in sides.items():
      reply = w.run(steps)
      times[kind] += reply['times']
      rss[kind] = reply['peak_rss']
      medians[kind] = statistics.median(reply['times'])
    round_speedups.append(round(medians['hf'] / medians['ours'], 3))
  for w in sides.values():
    w.close()
  model, batch = case.split(':')
  sec = {kind: statistics.median(t) for kind, t in times.items()}
  gflop = setup['ours']['gflop_per_step']
  return dict(case=case, model=model, batch=int(batch), gflop_per_step=round(gflop, 2),
              ours_s=round(sec['ours'], 4), hf_s=round(sec['hf'], 4),
              ours_range=[round(min(times['ours']), 3), round(max(times['ours']), 3)],
              hf_range=[round(min(times['hf']), 3), round(max(times['hf']), 3)],
              speedup=round(sec['hf'] / sec['ours'], 3), round_speedups=round_speedups,
              ours_img_s=round(int(batch) / sec['ours'], 1), hf_img_s=round(int(batch) / sec['hf'], 1),
              ours_gflops=round(gflop / sec['ours'], 1), hf_gflops=round(gflop / sec['hf'], 1),
              ours_compile_s=round(setup['ours']['compile_s'], 1),
              hf_first_step_s=round(setup['hf']['compile_s'], 1),
              ours_rss_gib=round(rss['ours'] / 2**30, 2), hf_rss_gib=round(rss['hf'] / 2**30, 2),
              keep=setup['ours']['keep'], num_patches=setup['ours']['num_patches'],
              ours_allocator=setup['ours']['allocator'],
              floor_s=round(matmuls['seconds'], 4), own_shape_gflops=round(matmuls['gflops'], 1),
              floor_fraction=round(matmuls['seconds'] / sec['ours'], 3),
              matmul_shapes=matmuls['shapes'])


# case -> (the step's share of its own-shape matmul rate, x Hugging Face on every machine kind,
# x Hugging Face where XLA's 2048^3 sgemm is about twice torch's, as on the AMD EPYC host A)
GOALS = {'vitb16:8': (0.80, 1.0, 1.5), 'tiny32:128': (0.55, 1.0, 1.2)}
FAST_XLA_SGEMM = 1.8   # XLA / torch 2048^3 rate from which the third goal applies


def criteria(results: list[dict], sgemm_ratio: float) -> list[dict]:
  """One row per goal of GOALS that applies to a measured case."""
  rows = []
  for r in results:
    if r['case'] not in GOALS:
      continue
    share, every, fast = GOALS[r['case']]
    case = f'{r["model"]}, {r["batch"]}'
    speed = (f'{r["speedup"]:.2f}x (rounds {min(r["round_speedups"]):.2f}-'
             f'{max(r["round_speedups"]):.2f})')
    rows.append(dict(case=case, criterion=f'step >= {100 * share:.0f}% of XLA\'s own-shape '
                     'matmul rate', figure=f'{100 * r["floor_fraction"]:.0f}% (floor '
                     f'{r["floor_s"]:.3f} s at {r["own_shape_gflops"]:.0f} GFLOP/s, step '
                     f'{r["ours_s"]:.3f} s)', met=r['floor_fraction'] >= share))
    rows.append(dict(case=case, criterion=f'>= {every:.1f}x ViTMAEForPreTraining', figure=speed,
                     met=r['speedup'] >= every))
    if sgemm_ratio >= FAST_XLA_SGEMM:
      rows.append(dict(case=case, criterion=f'>= {fast:.1f}x (XLA\'s sgemm {sgemm_ratio:.1f}x '
                       'torch\'s here)', figure=speed, met=r['speedup'] >= fast))
  return rows


def torch_matmul_gflops() -> float:
  """bench/hf_step.py's matmul rate, in a process of its own while no worker runs."""
  res = subprocess.run([sys.executable, '-c', 'import hf_step; print(hf_step.matmul_gflops())'],
                       capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
  return round(float(res.stdout.strip().splitlines()[-1]), 1)


def masking_overhead(batch: int, grid: tuple[int, int]) -> dict:
  import ml_collections
  from mim import masking
  out = {}
  for name in ('random', 'colored_noise', 'block'):
    cfg = ml_collections.ConfigDict(dict(name=name, ratio=0.75, **masking.default_sections()))
    out[name] = masking_bench.masker_seconds(cfg, grid, batch, reps=20)
  return out


def pipeline(image_size: int = 224, batch: int = 32) -> dict:
  """Images/s of the training input pipeline per source and worker count (subprocesses)."""
  out = {}
  for source in ('folder', 'tfds'):
    res = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data_pipeline.py'),
         f'--source={source}', f'--image_size={image_size}', f'--batch={batch}',
         '--num_workers=0,1', '--batches=8', '--json'],
        capture_output=True, text=True, check=True)
    out[source] = json.loads(res.stdout.strip().splitlines()[-1])['results']
  return out


def main(argv):
  del argv
  if FLAGS.worker_case:
    model, batch = FLAGS.worker_case.split(':')
    hf_step.serve(*_ours(model, int(batch)))
    return
  from mim import flops as flops_lib
  # Each BLAS rate before and after the cases, the better kept: one reading can halve when the
  # VM's neighbours are busy (XLA 209 then 413 GFLOP/s a minute apart on an AMD EPYC).
  peaks = [(flops_lib.measure_matmul_peak('float32') / 1e9, torch_matmul_gflops())]
  results = [measure_case(case, FLAGS.rounds, FLAGS.per_round) for case in FLAGS.cases]
  peaks.append((flops_lib.measure_matmul_peak('float32') / 1e9, torch_matmul_gflops()))
  peak, torch_peak = (max(p) for p in zip(*peaks))
  cpu = flops_lib.cpu_name()
  print(f'\n{cpu}, {os.cpu_count()} cores, fp32; {time.strftime("%Y-%m-%d")}; medians of '
        f'{FLAGS.rounds} alternating rounds x {FLAGS.per_round} steps; 2048^3 matmul '
        f'{peak:.0f} GFLOP/s in XLA, {torch_peak:.0f} in torch')
  print('\n| model, batch | HF ViTMAE s/step | ours s/step | speedup (per round) | ours img/s | ours GFLOP/s '
        '(% of matmul) | matmul floor s (% of the step) | ours compile s | peak RSS ours / HF GiB '
        '| ours on |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---|')
  for r in results:
    r['ours_peak_fraction'] = round(r['ours_gflops'] / peak, 3)
    print(f'| {r["model"]}, {r["batch"]} | {r["hf_s"]:.3f} ({r["hf_range"][0]}-{r["hf_range"][1]}) '
          f'| {r["ours_s"]:.3f} ({r["ours_range"][0]}-{r["ours_range"][1]}) | {r["speedup"]:.2f}x '
          f'({min(r["round_speedups"]):.2f}-{max(r["round_speedups"]):.2f}) '
          f'| {r["ours_img_s"]} | {r["ours_gflops"]} ({100 * r["ours_peak_fraction"]:.0f}%) '
          f'| {r["floor_s"]:.3f} ({100 * r["floor_fraction"]:.0f}%) '
          f'| {r["ours_compile_s"]} | {r["ours_rss_gib"]} / {r["hf_rss_gib"]} '
          f'| {r["ours_allocator"]} |')
  summary_criteria = criteria(results, peak / torch_peak)
  print('\nCriteria (docs/speed.md; the floor: each matmul of the step timed alone, '
        'bench/matmul_floor.py):\n\n| model, batch | criterion | figure | met |\n|---|---|---|---|')
  for c in summary_criteria:
    print(f'| {c["case"]} | {c["criterion"]} | {c["figure"]} | {"met" if c["met"] else "not met"} |')
  summary = dict(cpu=cpu, cores=os.cpu_count(), date=time.strftime('%Y-%m-%d'),
                 matmul_peak_gflops=round(peak, 1), torch_matmul_gflops=torch_peak, cases=results,
                 criteria=summary_criteria)
  vitb = next((r for r in results if r['model'] == 'vitb16'), None)
  if vitb:
    side = int(round(vitb['num_patches'] ** 0.5))
    mask_s = masking_overhead(vitb['batch'], (side, side))
    summary['masking_ms'] = {k: round(v * 1e3, 3) for k, v in mask_s.items()}
    print('\nmasking (ViT-B/16 grid, batch %d): ' % vitb['batch'] + ', '.join(
        f'{k} {v * 1e3:.2f} ms ({100 * v / vitb["ours_s"]:.3f}% of the step)'
        for k, v in mask_s.items()))
  if FLAGS.pipeline:
    pipe = pipeline()
    summary['pipeline'] = pipe
    need = vitb['ours_img_s'] if vitb else None
    for source, rows in pipe.items():
      print(f'input pipeline, {source} (224 px JPEGs): ' + ', '.join(
          f'{r["num_workers"]} workers {r["images_per_s"]} img/s' for r in rows)
          + (f'; the ViT-B step consumes {need} img/s '
             f'({max(r["images_per_s"] for r in rows) / need:.1f}x headroom)' if need else ''))
  if FLAGS.json:
    print(json.dumps(summary))


if __name__ == '__main__':
  app.run(main)
