"""Seconds per MAE train step, images/s, achieved GFLOP/s and the fraction of this machine's peak.

  python bench/train_step.py --model=vitb16 --batch=8 --json
  python bench/train_step.py --model=demo --batch=128
  python bench/train_step.py --model=vitb16 --batch=256 --dtype=bfloat16   # on a GPU/TPU
  python bench/train_step.py --model=tiny32 --batch=128 --floor   # + the step's matmuls alone
  python bench/train_step.py --model=cifar10 --batch=128 --mimalloc=false   # on glibc's malloc

The step is the real one from mim/train.py (masking, MAE forward/backward, AdamW), jitted with
donated state, on synthetic images. FLOPs are the analytic matmul count (mim/flops.py); the peak
is measured here as the best f32 jit matmul rate (2048^3), so the ratio is an honest MFU.
--floor also times every matmul of the step alone (bench/matmul_floor.py) and prints the share of
that floor the step reaches.
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

from mim import flops as flops_lib  # noqa: E402
from mim import host_memory  # noqa: E402
from mim import config as config_lib  # noqa: E402
from bench import matmul_floor  # noqa: E402
from bench.step_timer import compiled_step, time_steps  # noqa: E402,F401  (also read as train_step.*)

flags.DEFINE_enum('model', 'vitb16', ['vitb16', 'vitl16', 'demo', 'tiny32', 'cifar10'],
                  'Which config to time.')
flags.DEFINE_integer('batch', 8, 'Global batch size.')
flags.DEFINE_integer('steps', 5, 'Timed steps (after one warm-up step).')
flags.DEFINE_bool('json', False, 'End with one JSON line of the results.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'model.dtype (bfloat16 on GPU/TPU).')
flags.DEFINE_bool('mimalloc', None, 'Restart on mimalloc where the cmeel-mimalloc wheel is '
                  'installed (mim/host_memory.py). Default: the config\'s mimalloc, as main.py.')
flags.DEFINE_bool('keep_freed_memory', None, 'On glibc: one arena that reuses freed memory instead '
                  'of page-faulting XLA\'s CPU buffers anew every step (mim/host_memory.py). '
                  'Default: the config\'s keep_freed_host_memory, as main.py.')
flags.DEFINE_bool('floor', False, 'Also time each matmul of the step alone (bench/matmul_floor.py).')
FLAGS = flags.FLAGS

CONFIGS = {'vitb16': 'configs/mae_vitb.py', 'vitl16': 'configs/mae_vitl.py', 'demo': 'configs/demo.py',
           'tiny32': 'configs/mae_vitb.py', 'cifar10': 'configs/cifar10.py'}
# ViT-Ti/4 on 32 px images (192 wide, 12 blocks, 3 heads) with a 128-wide 4-block decoder
# (16 heads, the MAE default, as in the PyTorch anchors).
OVERRIDES = {'tiny32': dict(variant='Ti', image_size=32, patch_size=4, decoder_width=128,
                            decoder_depth=4, decoder_heads=16)}


def load_config(name: str):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = config_lib.load(os.path.join(root, CONFIGS[name]))
  cfg.model.update(OVERRIDES.get(name, {}))
  cfg.model.dtype = flags.FLAGS.dtype if flags.FLAGS.is_parsed() else 'float32'
  return cfg


def tune_malloc(cfg) -> str:
  """main.py's allocator setting for `cfg` (or --mimalloc, --keep_freed_memory), before jax's
  first use; the allocator's name."""
  def choice(flag, key):
    return cfg[key] if flag is None else flag
  return host_memory.set_up(choice(FLAGS.mimalloc, 'mimalloc'),
                            choice(FLAGS.keep_freed_memory, 'keep_freed_host_memory'))


def matmul_peak_gflops() -> float:
  """This device's best 2048^3 jit matmul rate in --dtype, measured now (not the cached figure)."""
  return flops_lib.measure_matmul_peak(FLAGS.dtype if FLAGS.is_parsed() else 'float32') / 1e9


def main(argv):
  del argv
  cfg = load_config(FLAGS.model)
  allocator = tune_malloc(cfg)
  compiled, state, batch, compile_s, parts, jaxpr = compiled_step(cfg, FLAGS.batch)
  spec = parts.spec
  xla_flops = (compiled.cost_analysis() or {}).get('flops', float('nan'))
  times, metrics, _ = time_steps(compiled, state, batch, FLAGS.steps)
  sec = statistics.median(times)
  gflop = flops_lib.train_flops_per_image(spec, parts.keep, parts.teacher_signals,
                                         parts.frozen) * FLAGS.batch / 1e9
  peak = matmul_peak_gflops()
  result = dict(
      model=FLAGS.model, batch=FLAGS.batch, device=jax.devices()[0].device_kind,
      device_count=jax.device_count(), compile_s=round(compile_s, 2),
      sec_per_step=round(sec, 4), sec_per_step_min=round(min(times), 4),
      img_per_sec=round(FLAGS.batch / sec, 2), gflop_per_step=round(gflop, 2),
      xla_gflop_per_step=round(xla_flops / 1e9, 2), gflops_per_sec=round(gflop / sec, 2),
      peak_gflops=round(peak, 1), peak_fraction=round(gflop / sec / peak, 4),
      loss=float(metrics['loss']), allocator=allocator)
  print(f'{FLAGS.model} batch {FLAGS.batch} on {result["device_count"]}x {result["device"]}: '
        f'{sec:.3f} s/step (min {min(times):.3f}), {result["img_per_sec"]} img/s, '
        f'{gflop:.1f} GFLOP/step analytic ({result["xla_gflop_per_step"]} XLA), '
        f'{result["gflops_per_sec"]} GFLOP/s = {100 * result["peak_fraction"]:.1f}% of the '
        f'{peak:.0f} GFLOP/s matmul peak; compile {compile_s:.1f} s; on {allocator}')
  if FLAGS.floor:
    f = matmul_floor.floor(jaxpr)
    result.update(floor_s=round(f['seconds'], 4), own_shape_gflops=round(f['gflops'], 1),
                  floor_fraction=round(f['seconds'] / sec, 4), matmul_shapes=f['shapes'])
    print(f'\n{len(f["shapes"])} dot shapes, {sum(s["count"] for s in f["shapes"])} dots, '
          f'{f["gflop"]:.1f} GFLOP:\n\n{matmul_floor.markdown(f)}\n\nmatmul floor '
          f'{f["seconds"]:.3f} s ({f["gflops"]:.0f} GFLOP/s on the step\'s own shapes): the step '
          f'reaches {100 * f["seconds"] / sec:.0f}% of it')
  if FLAGS.json:
    print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
