"""Where the train step's time goes: per-op time of the compiled step, grouped.

  python bench/step_profile.py --model=vitb16 --batch=8
  python bench/step_profile.py --model=tiny32 --batch=128 --top=20

Runs the real jitted step (bench/train_step.py) under `jax.profiler`, reads the per-thunk events
of the trace (on CPU every fusion, matmul and copy is one thunk), takes each event's exclusive
time (nested thunks, e.g. the NaN guard's cond, are not counted twice) and maps it through the
optimized HLO's metadata (op_name: module path, forward `jvp(...)` or backward `transpose(...)`,
and the step's named scopes) to a group. Times are CPU-seconds summed over the threads that ran
thunks, divided by the step count; the matmul groups show their analytic FLOPs at this machine's
measured 2048^3 matmul rate next to them (the ideal).
"""
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

import train_step as bench_step  # noqa: E402
from mim import flops as flops_lib  # noqa: E402

# --model, --batch and --steps (profiled steps, after two warm-up steps) are bench/train_step.py's.
flags.DEFINE_integer('top', 0, 'Also list the N most expensive single ops.')
flags.DEFINE_string('top_group', '', 'List only ops whose group ("where what") contains this.')
FLAGS = flags.FLAGS

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """instruction name -> (opcode, op_name metadata) for every instruction of the module."""
  ops = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      op_name = _OP_NAME.search(line)
      opcode = 'ynn_dot' if '__ynn_fusion' in line else m.group(3)
      ops[m.group(1)] = (opcode, op_name.group(1) if op_name else '')
  return ops


def exclusive_times(events: list[dict]) -> dict[str, float]:
  """Event name -> summed exclusive microseconds (own time minus nested events' time)."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e:
      by_thread[e.get('tid')].append(e)
  total = collections.defaultdict(float)
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e['ts'], -e['dur']))
    stack = []  # [end, name, child time]
    def close(entry):
      end, name, child, dur = entry
      total[name] += dur - child
    for e in evs:
      while stack and stack[-1][0] <= e['ts']:
        close(stack.pop())
      if stack:
        stack[-1][2] += e['dur']
      stack.append([e['ts'] + e['dur'], e['name'], 0.0, e['dur']])
    while stack:
      close(stack.pop())
  return total


def group_of(opcode: str, op_name: str) -> tuple[str, str]:
  """(where, what) for an op: where = encoder / decoder / ... (+ fwd or bwd), what = the kind."""
  # A named scope appears as '/name/' or, under autodiff, as 'jvp(name)' / 'transpose(jvp(name))'.
  scope = next((s for s in ('optimizer', 'masking', 'teacher', 'loss')
                if re.search(rf'[/(]{s}[)/]', op_name + '/')), None)
  if scope == 'optimizer':
    return 'optimizer + EMA + NaN guard', ''
  if scope in ('masking', 'teacher'):
    return scope, ''
  module = next((m for m in ('encoder', 'loss_predictor', 'feature_head', 'decoder')
                 if f'/{m}/' in op_name), None)
  pass_ = 'bwd' if 'transpose(' in op_name else 'fwd'
  if module is None:
    return ('loss' if scope == 'loss' else 'other') + f' {pass_}', ''
  if opcode in ('gather', 'scatter') or 'take_along_axis' in op_name or '/gather' in op_name:
    what = 'token gather/scatter'
  elif 'MultiHeadDotProductAttention' in op_name and not re.search(r'/(query|key|value|out)/', op_name):
    what = 'attention (scores, softmax, values)'
  elif opcode in ('ynn_dot', 'dot', 'convolution') or op_name.endswith('dot_general'):
    what = 'dense matmuls'
  elif 'LayerNorm' in op_name or '_norm/' in op_name:
    what = 'layer norm'
  elif 'MlpBlock' in op_name and not op_name.endswith('add'):
    what = 'GELU'
  else:
    what = 'other elementwise / copies'
  return f'{module} {pass_}', what


def dense_and_attention_flops(spec, keep: int) -> dict[str, float]:
  """Analytic forward matmul FLOPs per image: (module, dense|attention) -> FLOPs."""
  def blocks(tokens, width, depth, mlp):
    attention = depth * 2 * 2 * tokens * tokens * width
    return flops_lib.transformer_flops(tokens, width, depth, mlp) - attention, attention
  n = spec.num_patches
  e_dense, e_att = blocks(1 + keep, spec.width, spec.depth, spec.mlp_dim)
  d_dense, d_att = blocks(1 + n, spec.decoder_width, spec.decoder_depth, spec.decoder_mlp_dim)
  return {('encoder', 'dense matmuls'): e_dense + 2 * n * spec.patch_dim * spec.width,
          ('encoder', 'attention (scores, softmax, values)'): e_att,
          ('decoder', 'dense matmuls'): d_dense + 2 * (1 + keep) * spec.width * spec.decoder_width
                                         + 2 * (1 + n) * spec.decoder_width * spec.patch_dim,
          ('decoder', 'attention (scores, softmax, values)'): d_att}


def profile(compiled, state, batch, steps: int):
  """(per-op exclusive ms per step, ops table, wall seconds per step)."""
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    wall = (time.perf_counter() - t) / steps
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(tmp, '**', 'perfetto_trace.json.gz'), recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  ops = hlo_ops(compiled.as_text())
  per_op = {name: us / 1e3 / steps for name, us in exclusive_times(events).items() if name in ops}
  return per_op, ops, wall


def main(argv):
  del argv
  cfg = bench_step.load_config(FLAGS.model)
  compiled, state, batch, _, parts, _ = bench_step.compiled_step(cfg, FLAGS.batch)
  peak = bench_step.matmul_peak_gflops()
  per_op, ops, wall = profile(compiled, state, batch, FLAGS.steps)
  groups = collections.defaultdict(float)
  for name, ms in per_op.items():
    groups[group_of(*ops[name])] += ms
  busy = sum(per_op.values())
  ideal = {k: v * FLAGS.batch / peak / 1e6 for k, v in
           dense_and_attention_flops(parts.spec, parts.keep).items()}
  print(f'{FLAGS.model} batch {FLAGS.batch}: '
        f'{wall:.3f} s/step wall, {busy / 1e3:.3f} s of thunk time over all threads '
        f'({busy / 1e3 / wall:.2f} threads busy); matmul peak {peak:.0f} GFLOP/s; device '
        f'{jax.devices()[0].device_kind}')
  print('\n| where | what | ms/step | share | ideal matmul ms (fwd; bwd = 2x) |')
  print('|---|---|---:|---:|---:|')
  for (where, what), ms in sorted(groups.items(), key=lambda kv: -kv[1]):
    module, _, pass_ = where.partition(' ')
    i = ideal.get((module, what))
    ideal_ms = '' if i is None else f'{i * (2 if pass_ == "bwd" else 1):.0f}'
    print(f'| {where} | {what} | {ms:.0f} | {100 * ms / busy:.1f}% | {ideal_ms} |')
  if FLAGS.top:
    print(f'\nThe {FLAGS.top} most expensive ops (ms/step, opcode, op_name):')
    chosen = [(name, ms) for name, ms in per_op.items()
              if FLAGS.top_group in ' '.join(group_of(*ops[name]))]
    for name, ms in sorted(chosen, key=lambda kv: -kv[1])[:FLAGS.top]:
      print(f'{ms:8.1f}  {name:32s} {ops[name][0]:10s} {ops[name][1][:110]}')


if __name__ == '__main__':
  app.run(main)
