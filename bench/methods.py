"""Step cost of each teacher-driven method relative to MAE, next to the analytic FLOP ratio.

  python bench/methods.py [--model=vitb16] [--batch=8] [--steps=3] [--json]

Each method is its ViT-B/16 config's model and objective on the same batch (the real jitted
step from mim/train.py, synthetic images): MAE, HPM (loss predictor + teacher pass over all
patches with the loss predictor), data2vec-style feature targets (feature head + teacher
encoder pass), AttMask (teacher encoder pass with the cls attention), and the frozen-teacher
distillation methods MR-MAE, DMAE, MaskAlign, DTM (a randomly initialized teacher of the
student's size; DMAE runs 3/4 of its blocks). Runs are interleaved, the
median of several steps is kept, so the ratios are measured in one run on one machine.
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

from bench import train_step as step_bench  # noqa: E402
from mim import config as config_lib  # noqa: E402
from mim import flops as flops_lib  # noqa: E402

flags.DEFINE_integer('rounds', 2, 'Interleaved rounds of timed steps per method.')
FLAGS = flags.FLAGS


def method_configs(model: str) -> dict:
  cfgs = {}
  cfgs['mae'] = step_bench.load_config(model)
  hpm = step_bench.load_config(model)
  hpm.model.loss_predictor = True
  hpm.masking.name = 'hard_patches'
  hpm.targets.loss_pred_weight = 1.0
  cfgs['hpm'] = hpm
  feature = step_bench.load_config(model)
  feature.model.feature_head = True
  feature.targets.update(dict(feature_weight=1.0, feature_top_k=min(6, feature.model.depth or 6)))
  cfgs['feature_targets'] = feature
  attmask = step_bench.load_config(model)
  attmask.masking.name = 'attention'
  cfgs['attmask'] = attmask
  for method in config_lib.DISTILL_METHODS:   # a frozen teacher of the student's own size
    distill = step_bench.load_config(model)
    distill.teacher.model.update({k: distill.model[k] for k in distill.teacher.model})
    distill.teacher.weights = 'random'        # not read: the bench initializes the teacher
    config_lib.add_distillation(distill, method)
    cfgs[method] = distill
  return cfgs



def main(argv):
  del argv
  configs = method_configs(FLAGS.model)
  step_bench.tune_malloc(configs['mae'])
  built = {}
  for name, cfg in configs.items():
    compiled, state, batch, compile_s, parts, _ = step_bench.compiled_step(cfg, FLAGS.batch)
    built[name] = dict(compiled=compiled, state=state, batch=batch, compile_s=compile_s,
                       gflop=flops_lib.train_flops_per_image(parts.spec, parts.keep,
                                                             parts.teacher_signals, parts.frozen)
                       * FLAGS.batch / 1e9, times=[])
  for _ in range(FLAGS.rounds):
    for b in built.values():
      times, _, b['state'] = step_bench.time_steps(b['compiled'], b['state'], b['batch'],
                                                   FLAGS.steps)
      b['times'] += times
  base = built['mae']
  base_sec = statistics.median(base['times'])
  rows = []
  print(f'{FLAGS.model} batch {FLAGS.batch}, {jax.devices()[0].device_kind} ({flops_lib.cpu_name()}), '
        f'{jax.device_count()} device(s)')
  print(f'{"method":<16} {"s/step":>8} {"x MAE":>7} {"GFLOP/step":>11} {"FLOP x MAE":>11} '
        f'{"measured/FLOP":>14} {"compile s":>10}')
  for name, b in built.items():
    sec = statistics.median(b['times'])
    row = dict(method=name, sec_per_step=round(sec, 4), time_ratio=round(sec / base_sec, 3),
               gflop_per_step=round(b['gflop'], 1), flop_ratio=round(b['gflop'] / base['gflop'], 3),
               compile_s=round(b['compile_s'], 1))
    row['measured_over_flop'] = round(row['time_ratio'] / row['flop_ratio'], 3)
    rows.append(row)
    print(f'{name:<16} {sec:8.3f} {row["time_ratio"]:7.2f} {row["gflop_per_step"]:11.1f} '
          f'{row["flop_ratio"]:11.2f} {row["measured_over_flop"]:14.2f} {row["compile_s"]:10.1f}')
  if FLAGS.json:
    print(json.dumps(dict(model=FLAGS.model, batch=FLAGS.batch, cpu=flops_lib.cpu_name(), methods=rows)))


if __name__ == '__main__':
  app.run(main)
