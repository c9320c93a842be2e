"""Each masking strategy's cost as a fraction of the MAE ViT-B/16 train step.

  python bench/masking.py                 # batch 8, 14x14 grid, against the ViT-B/16 step
  python bench/masking.py --model=demo --batch=128

Times the jitted masker alone (scores + argsort -> Mask, new key every call) at the step's batch
and grid, and the real jitted train step (bench/train_step.py's), median over --steps runs. The
masker runs inside the step in training, so alone it also pays a dispatch: an upper bound.
"""
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402

import train_step  # noqa: E402  (bench/train_step.py: its flags --model, --batch, --steps)
from mim import flops as flops_lib  # noqa: E402
from mim import masking  # noqa: E402

flags.DEFINE_integer('mask_reps', 50, 'Timed masker calls per strategy.')
FLAGS = flags.FLAGS

# (label, masking.name, section overrides); the strategies that need no model signals.
VARIANTS = [('random', 'random', {}), ('colored_noise green', 'colored_noise', {}),
            ('colored_noise red', 'colored_noise', dict(color='red')),
            ('colored_noise schedule', 'colored_noise', dict(color='green:0,blue:500')),
            ('block (BEiT)', 'block', {}), ('radial', 'radial', {})]


def masker_seconds(masking_cfg: ml_collections.ConfigDict, grid, batch: int, reps: int) -> float:
  masker = jax.jit(masking.make_masker(masking_cfg, grid, 1000), static_argnums=1)
  jax.block_until_ready(masker(jax.random.key(0), batch, 0))
  times = []
  for i in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(masker(jax.random.key(i), batch, i))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv):
  del argv
  cfg = train_step.load_config(FLAGS.model)
  compiled, state, batch, _, parts, _ = train_step.compiled_step(cfg, FLAGS.batch)
  step_s = statistics.median(train_step.time_steps(compiled, state, batch, FLAGS.steps)[0])
  grid = parts.spec.grid
  print(f'{FLAGS.model} train step, batch {FLAGS.batch}, {grid[0]}x{grid[1]} grid: '
        f'{step_s:.3f} s/step on {jax.device_count()}x {jax.devices()[0].device_kind} '
        f'({flops_lib.cpu_name()}), {datetime.date.today()}')
  print('| strategy | masker ms | fraction of the step |\n|---|---|---|')
  for label, name, overrides in VARIANTS:
    m = ml_collections.ConfigDict(cfg.masking.to_dict())
    m.name = name
    if overrides:
      m[name].update(overrides)
    sec = masker_seconds(m, grid, FLAGS.batch, FLAGS.mask_reps)
    print(f'| {label} | {1e3 * sec:.2f} | {100 * sec / step_s:.3f}% |')


if __name__ == '__main__':
  app.run(main)
