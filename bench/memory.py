"""The memory planner (`--mode=summary`) against a measured run on this CPU.

  python bench/memory.py --model=vitb16 --batch=8 [--json]

Plan: per-device bytes from the compiled train step (params + optimizer state + batch + XLA
temporaries). Measured: the highest resident memory of the process, sampled every millisecond by a
thread while the state is created and two steps run, minus its resident memory just before (after
imports and compilation) plus the batch. On CPU device memory is host memory, so the two compare.
"""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

from mim import config as config_lib  # noqa: E402
from mim import sharding, summary, train  # noqa: E402

flags.DEFINE_enum('model', 'vitb16', ['vitb16', 'vitl16', 'demo'], 'Which config.')
flags.DEFINE_integer('batch', 8, 'Global batch size.')
flags.DEFINE_bool('json', False, 'End with one JSON line.')
FLAGS = flags.FLAGS
CONFIGS = {'vitb16': 'configs/mae_vitb.py', 'vitl16': 'configs/mae_vitl.py', 'demo': 'configs/demo.py'}


def rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def main(argv):
  del argv
  cfg = config_lib.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     CONFIGS[FLAGS.model]))
  cfg.batch_size = FLAGS.batch
  plan = summary.memory_plan(cfg)
  parts = train.build_parts(cfg, total_steps=1000, warmup_steps=100)
  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh):
    spec = parts.spec
    images = jax.ShapeDtypeStruct((cfg.batch_size, spec.image_size, spec.image_size, 3), 'float32',
                                  sharding=sharding.batch_sharding(mesh))
    abstract, shardings = train.state_shardings(parts, mesh)
    compiled = train.jit_train_step(cfg, parts, mesh, shardings).lower(abstract, {'image': images}).compile()
    batch = {'image': jax.device_put(jax.numpy.zeros(images.shape), images.sharding)}
    init = train.jit_init(parts, shardings).lower(jax.random.key(0)).compile()
    before = rss_bytes()
    samples, done = [before], threading.Event()
    sampler = threading.Thread(target=lambda: [samples.append(rss_bytes()) or time.sleep(0.001)
                                               for _ in iter(done.is_set, True)])
    sampler.start()
    state = init(jax.random.key(0))
    for _ in range(2):
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    done.set()
    sampler.join()
  measured = max(samples) - before + batch['image'].nbytes
  result = dict(model=FLAGS.model, batch=FLAGS.batch, plan_gib=plan['total'] / 2**30,
                measured_gib=measured / 2**30, plan_over_measured=plan['total'] / measured)
  print(summary.format_memory_plan(plan))
  print(f'measured: peak resident memory during init + 2 steps, over the baseline: '
        f'{measured / 2**30:.3f} GiB (plan / measured = {plan["total"] / measured:.3f}, '
        f'{len(samples)} samples)')
  if FLAGS.json:
    print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
