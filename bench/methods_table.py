"""The methods table: every pretraining method on one budget on the CIFAR-10 subset, then probed.

  python bench/methods_table.py --smoke            # everything, tiny: 1-2 minutes
  python bench/methods_table.py --out=DIR          # the recipe's budget, 3 + 2 seeds: many hours
  python bench/methods_table.py --epochs=3 --width=128 --decoder_width=64 --mae_seeds=0,1 \
    --seeds=0 --out=DIR   # the README's 3-epoch table of ViT 128x4: ~80 minutes
  python bench/methods_table.py --methods=mae --mae_seeds=0 --epochs=10 --set=optim.base_lr=3e-3

Budget: the recipe of configs/cifar10.py (epochs, batch, ViT and decoder sizes, and every other
setting), changed by the flags that are set; --set=KEY=VALUE changes any other setting of every
pretraining run (docs/cifar10-recipe.md's trials). Data: ../shared/datasets/cifar10
($MIM_DATASETS/cifar10 overrides): 20k train / 10k test images; skipped with a message when
absent. Each method (mae for every seed of --mae_seeds, the others for every seed of --seeds)
pretrains the same ViT for the same epochs (in this process, `train.train`, as the printed
`main.py` command would), from scratch in OUT/<method>_s<seed>; the frozen-teacher methods
distil OUT/teacher, the same MAE trained --teacher_epochs. Then each encoder, plus a random-init
one of the same ViT and raw pixels, is evaluated with the protocols of configs/eval_cifar10.py
(`--mode=eval`'s pieces: features.extract, knn, probe), on features extracted once per encoder
(the cls token, the mean of the patch tokens and the tokens, after the final norm): kNN (DINO,
k=20) with the 20k train images as the bank and the MAE linear probe (BN + linear, LARS, 90
epochs) on the cls token and on the mean (the table ranks --pool's), the attentive probe (EP,
--attentive_epochs) on the tokens, on cached center-crop features, all on the 10k test images.
Raw pixels: kNN and linear probe on the 3072 normalized values.

Prints an estimate of the wall time before the first run and the time left after each; records
per run the pretraining wall and CPU minutes (user + sys of this process and its data workers),
the final loss, seed and commands; prints a table of the runs and one of the methods (mean ± half
the range over seeds, and the probes on which a method is better than MAE: its mean minus its
spread above MAE's mean plus its spread), and writes OUT/methods_table.json. A run whose
OUT/<name>/result.json exists with the same budget is not redone (an interrupted table continues).
A pretraining run stopped by SIGTERM / SIGINT saves its checkpoint and stops the table unprobed;
rerun the same command to resume it (OUT/<name>/pretrain_time.json adds up the minutes of the parts).
"""
import ast
import datetime
import json
import os
import resource
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import step_timer  # noqa: E402
from configs import cifar10  # noqa: E402
import data as data_lib  # noqa: E402
from data import pipeline  # noqa: E402
from mim import config as config_lib  # noqa: E402
from mim import flops as flops_lib  # noqa: E402
from mim import sharding  # noqa: E402
from mim import train  # noqa: E402
from mim.evaluate import features  # noqa: E402
from mim.evaluate import knn as knn_lib  # noqa: E402
from mim.evaluate import probe  # noqa: E402
from mim.evaluate import run as eval_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ('mae', 'colormae', 'blockmask', 'radial', 'hpm', 'data2vec', 'attmask',
           *config_lib.DISTILL_METHODS)
LABELS = {'random_init': 'random init (no pretraining)', 'pixels': 'raw pixels (3072 values)',
          'teacher': 'MAE teacher (--teacher_epochs), distilled by the four below'}

flags.DEFINE_string('out', 'workdirs/methods_table', 'Directory for the runs and the JSON.')
RECIPE = 'configs/cifar10.py'   # every flag below left unset takes its value from here
flags.DEFINE_float('epochs', None, 'Pretraining epochs of the 20k train images, every method.')
flags.DEFINE_integer('width', None, 'Encoder width (the same ViT for every method).')
flags.DEFINE_integer('depth', None, 'Encoder blocks.')
flags.DEFINE_integer('heads', None, 'Encoder heads.')
flags.DEFINE_integer('decoder_width', None, 'MAE decoder width (heads: width / 32).')
flags.DEFINE_integer('decoder_depth', None, 'MAE decoder blocks.')
flags.DEFINE_integer('batch', None, 'Pretraining batch.')
flags.DEFINE_multi_string('set', [], 'KEY=VALUE: a setting of configs/cifar10.py for every '
                          'pretraining run, VALUE a Python literal or a string (e.g. '
                          '--set=masking.ratio=0.6 --set=data.crop_scale="(0.35, 1.0)"); model '
                          'sizes take the flags above. In the budget and the printed commands.')
flags.DEFINE_list('methods', list(METHODS), 'Methods of configs/cifar10.py to pretrain.')
flags.DEFINE_list('mae_seeds', ['0', '1', '2'], 'Seeds of the MAE runs (>= 2 for a spread).')
flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of every other method (>= 2 for a spread).')
flags.DEFINE_float('teacher_epochs', 0.0, 'Epochs of the MAE teacher the distillation methods '
                   'learn from (pretrained here, same ViT); 0 = 2x --epochs.')
flags.DEFINE_float('linear_epochs', 90.0, 'Linear probe epochs (cached features).')
flags.DEFINE_enum('pool', 'cls', ['cls', 'avg'], 'The encoder vector the table ranks by kNN and '
                  'linear probe: cls (the MAE paper\'s protocol) or avg (the mean of the patch '
                  'tokens after the final norm). Every run records both.')
flags.DEFINE_float('attentive_epochs', 10.0, 'Attentive probe epochs (cached tokens).')
flags.DEFINE_bool('smoke', False, 'Tiny everything (ViT 32x2, 4 steps, 500 / 200 images, 2 probe '
                  'epochs): checks the whole table in 1-2 minutes; the numbers mean nothing.')
FLAGS = flags.FLAGS


def data_dir() -> str:
  root = os.environ.get('MIM_DATASETS', os.path.join(os.path.dirname(ROOT), 'shared', 'datasets'))
  return os.path.join(root, 'cifar10')


def budget() -> dict:
  """The table's budget: configs/cifar10.py's recipe, with the flags that are set."""
  r = config_lib.load(os.path.join(ROOT, RECIPE), 'method=mae')
  m = r.model
  pick = lambda flag, value: value if FLAGS[flag].value is None else FLAGS[flag].value
  b = dict(epochs=pick('epochs', r.total_epochs), steps=0, batch=pick('batch', r.batch_size),
           width=pick('width', m.width), depth=pick('depth', m.depth),
           heads=pick('heads', m.num_heads),
           patch=m.patch_size, decoder_width=pick('decoder_width', m.decoder_width),
           decoder_depth=pick('decoder_depth', m.decoder_depth),
           decoder_heads=(m.decoder_heads if FLAGS.decoder_width is None
                          else max(1, FLAGS.decoder_width // 32)),
           linear_epochs=FLAGS.linear_epochs, attentive_epochs=FLAGS.attentive_epochs,
           max_train=0, max_test=0)
  b['teacher_epochs'] = FLAGS.teacher_epochs or 2 * b['epochs']
  b['set'] = dict(_setting(kv) for kv in FLAGS.set)
  apply_settings(r, b['set'])   # an unknown key or a wrong type fails here, before any run
  if FLAGS.smoke:
    b.update(epochs=0, steps=4, batch=32, width=32, depth=2, heads=2, decoder_width=16,
             decoder_depth=1, decoder_heads=1, linear_epochs=2.0, attentive_epochs=2.0,
             max_train=500, max_test=200)
  return b


def _setting(kv: str) -> tuple[str, object]:
  key, sep, text = kv.partition('=')
  if not sep or not key:
    raise app.UsageError(f'--set={kv!r}: write KEY=VALUE, e.g. --set=masking.ratio=0.6.')
  if key.split('.')[0] == 'model':
    raise app.UsageError(f'--set={kv!r}: set model sizes with --width, --depth, --heads, '
                         '--decoder_width, --decoder_depth (the random-init baseline shares them).')
  try:
    return key, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return key, text   # a plain string, e.g. masking.name=block


def apply_settings(c, settings: dict) -> None:
  for key, value in settings.items():
    *parents, leaf = key.split('.')
    try:
      node = c
      for name in parents:
        node = node[name]
      if leaf not in node:
        raise KeyError(f'{leaf!r} is not in {".".join(parents) or "the config"}')
      node[leaf] = value
    except (KeyError, AttributeError, TypeError) as e:
      raise app.UsageError(f'--set={key}={value!r}: {e}') from None


def model_overrides(b: dict) -> dict:
  return dict(width=b['width'], depth=b['depth'], num_heads=b['heads'],
              decoder_width=b['decoder_width'], decoder_depth=b['decoder_depth'],
              decoder_heads=b['decoder_heads'])


def teacher_workdir() -> str:
  return os.path.join(FLAGS.out, 'teacher')


def pretrain_config(method: str, seed: int, b: dict):
  name = 'mae' if method == 'teacher' else method
  c = config_lib.load(os.path.join(ROOT, RECIPE), f'method={name}')
  c.model.update(model_overrides(b))
  apply_settings(c, b['set'])
  c.data.data_dir = data_dir()
  steps, epochs = b['steps'], b['epochs'] or 1.0
  if method == 'teacher':   # the same MAE, longer
    steps, epochs = 2 * steps, b['teacher_epochs']
  c.update(dict(seed=seed, batch_size=b['batch'], total_steps=steps, total_epochs=epochs,
                reconstruction_every_steps=0))
  if method in config_lib.DISTILL_METHODS:
    cifar10.add_teacher(c, method, teacher_workdir())
  c.eval.knn = False   # evaluated below, on the same features for every protocol
  if method == 'data2vec':   # half the blocks, as configs/cifar10.py's 3 of 6
    c.targets.feature_top_k = max(1, b['depth'] // 2)
  if FLAGS.smoke:
    c.update(dict(log_every_steps=2, checkpoint_every_steps=4))
    c.data.num_workers = 0
    c.optim.warmup_steps = 1
    c.eval.num_reconstructions = 0
  return c


def pretrain_command(method: str, seed: int, workdir: str, b: dict) -> str:
  m = model_overrides(b)
  c = pretrain_config(method, seed, b)
  args = [f'--config=configs/cifar10.py:method={"mae" if method == "teacher" else method}',
          f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir()}', f'--config.seed={seed}',
          f'--config.batch_size={b["batch"]}', '--config.eval.knn=False',
          '--config.reconstruction_every_steps=0']
  args += ([f'--config.total_steps={c.total_steps}'] if c.total_steps else
           ['--config.total_steps=0', f'--config.total_epochs={c.total_epochs:g}'])
  args += [f'--config.model.{k}={v}' for k, v in m.items()]
  args += [shlex.quote(f'--config.{k}={v}') for k, v in b['set'].items()]
  if method in config_lib.DISTILL_METHODS:   # the teacher and the layers for this depth
    args += [f'--config.teacher.weights={c.teacher.weights}', f'--config.teacher.blocks={c.teacher.blocks}']
    args += [f'--config.teacher.model.{k}={c.teacher.model[k]}' for k in m if k in c.teacher.model]
    args += [f"--config.distill.{k}='{c.distill[k]}'" for k in ('student_layers', 'teacher_layers')]
  if method == 'data2vec':
    args.append(f'--config.targets.feature_top_k={max(1, b["depth"] // 2)}')
  if FLAGS.smoke:
    args += ['--config.log_every_steps=2', '--config.checkpoint_every_steps=4',
             '--config.data.num_workers=0', '--config.optim.warmup_steps=1',
             '--config.eval.num_reconstructions=0']
  return 'python main.py ' + ' '.join(args)


def eval_config(b: dict, init_from: str):
  c = config_lib.load(os.path.join(ROOT, 'configs/eval_cifar10.py'))
  c.model.update(model_overrides(b))   # the random-init baseline's ViT
  c.data.data_dir = data_dir()
  c.init_from = init_from
  c.eval.update(dict(knn_max_train=b['max_train'], knn_max_test=b['max_test']))
  c.probe.update(dict(max_train_examples=b['max_train'], max_test_examples=b['max_test'],
                      epochs=b['linear_epochs'], warmup_epochs=min(10.0, b['linear_epochs'] / 9)))
  if FLAGS.smoke:
    c.probe.batch_size = 64
  config_lib.validate(c)
  return c



# What probe_flops leaves out, a run's kNN and linear probes (their steps take little compute but
# a millisecond each) and the compiles: 2 AMD EPYC cores, 2026-12-07, ViT 256x4 and raw pixels.
LINEAR_MIN_PER_STEP = 0.4 / 7020   # 90 epochs of 20k at batch 256: 0.2-0.5 min
PROBE_COMPILE_MIN = 0.1
ESTIMATE_BASIS = ('5 timed MAE steps on this machine give seconds per FLOP; they time each '
                  'method\'s analytic pretraining FLOPs and the probes\' (feature extraction, '
                  f'attentive head); kNN, linear and compiles add '
                  f'{PROBE_COMPILE_MIN + 7020 * LINEAR_MIN_PER_STEP:.1f} min a run at full size')


def train_images(c, b: dict) -> int:
  """Pretraining images of the budget: --max_train, else the whole train split of config `c`."""
  return b['max_train'] or data_lib.check_source(c.data, c.data.train_split)


def pretrain_steps(c, b: dict) -> int:
  return train.schedule_lengths(c, train_images(c, b))[0]


def flops_per_step(c) -> float:
  parts = train.build_parts(c, total_steps=1, warmup_steps=0)
  return c.batch_size * flops_lib.train_flops_per_image(parts.spec, parts.keep,
                                                        parts.teacher_signals, parts.frozen)


def seconds_per_flop(c) -> float:
  """The MAE step's median wall seconds per FLOP here (one warm-up step, then 5 timed)."""
  compiled, state, batch, *_ = step_timer.compiled_step(c.copy_and_resolve_references(),
                                                         c.batch_size)
  return float(np.median(step_timer.time_steps(compiled, state, batch, 5)[0])) / flops_per_step(c)


def estimate_minutes(runs, b: dict) -> list[float]:
  """Wall minutes of each run (pretraining and probes), before any has run; 0 for a run done
  already."""
  todo = [not os.path.exists(os.path.join(FLAGS.out, name, 'result.json')) for name, _, _ in runs]
  if not any(todo):
    return [0.0] * len(runs)
  encoders = any(needed and name != 'pixels' for (name, _, _), needed in zip(runs, todo))
  mae = pretrain_config('mae', 0, b)
  sec = seconds_per_flop(mae) if encoders else 0.0
  pc = eval_config(b, init_from='').probe
  bank = train_images(mae, b)
  queries = b['max_test'] or data_lib.check_source(mae.data, mae.data.eval_split)
  baseline = PROBE_COMPILE_MIN + probe.schedule_lengths(pc, bank)[0] * LINEAR_MIN_PER_STEP
  encoder = baseline + probe_flops(mae, pc, b, bank, queries) * sec / 60
  out = []
  for (name, method, seed), needed in zip(runs, todo):
    c = pretrain_config(method, seed, b) if method else None
    pretrain = pretrain_steps(c, b) * flops_per_step(c) * sec / 60 if c else 0.0
    out.append(needed * (pretrain + (baseline if name == 'pixels' else encoder)))
  return out


def probe_flops(c, pc, b: dict, bank: int, queries: int) -> float:
  """The probes' FLOPs for one encoder of config `c` (probe config `pc`): its forward over every
  patch of the bank and the queries (features extracted once) + the attentive head's training
  (forward and backward)."""
  spec = train.build_parts(c, total_steps=1, warmup_steps=0).spec
  pc = pc.copy_and_resolve_references()
  pc.epochs = b['attentive_epochs']
  steps = probe.schedule_lengths(pc, bank)[0]
  head = flops_lib.attentive_probe_flops(spec.num_patches, spec.width, pc.num_queries,
                                         pc.value_divisor)
  return ((bank + queries) * flops_lib.encoder_forward_flops(spec, spec.num_patches)
          + 3 * steps * pc.batch_size * head)


def cpu_seconds() -> float:
  """User + sys seconds of this process (all threads) and of its finished children."""
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _pixels(_, images):
  return {'pixels': images.reshape(images.shape[0], -1)}


def extract(cfg, model, params, mesh, split: str, subset) -> dict[str, np.ndarray]:
  """{'cls', 'tokens', 'label'} of the encoder, or {'pixels', 'label'} for model=None."""
  what = f'features {split}'
  if model is not None:
    return features.extract(cfg.data, split, subset.indices, model, params, mesh,
                            pools=('cls', 'avg', 'tokens'), batch_size=cfg.eval.batch_size,
                            what=what)
  batches = pipeline.eval_batches(cfg.data, split, subset.indices, image_size=32,
                                  batch_size=cfg.eval.batch_size)
  return features.stream(_pixels, None, batches, mesh, total=len(subset.indices), what=what)


def probe_scores(cfg, model, params, b: dict) -> dict:
  """kNN / linear (on the cls token, and as knn_avg / linear_avg on the mean of the patch tokens)
  / attentive top-1 on the test subset, features extracted once."""
  mesh = sharding.make_mesh(cfg.mesh)
  train_set, test_set = eval_run.subsets(cfg, b['max_train'], b['max_test'])
  fb = extract(cfg, model, params, mesh, cfg.data.train_split, train_set)
  fq = extract(cfg, model, params, mesh, cfg.data.eval_split, test_set)
  n = train_set.num_classes
  e = cfg.eval
  out = dict(bank=train_set.description, queries=test_set.description)

  def probe_top1(protocol, x):
    pc = cfg.probe.copy_and_resolve_references()
    if protocol == 'attentive':
      pc.epochs, pc.warmup_epochs = b['attentive_epochs'], min(pc.warmup_epochs,
                                                               b['attentive_epochs'] / 9)
    head, state, info = probe.train_on_features(protocol, pc, fb[x], fb['label'], n, mesh, cfg.seed)
    out[f'{protocol}_steps'] = info['steps']
    return probe.accuracy_on_features(head, state, fq[x], fq['label'], mesh)['top1']

  # raw pixels have one vector and no tokens: the same kNN / linear under both names
  for suffix, x in (('', 'cls'), ('_avg', 'avg')) if model is not None else (('', 'pixels'),):
    out['knn' + suffix] = knn_lib.knn_accuracy(fb[x], fb['label'], fq[x], fq['label'],
                                               k=e.knn_k, temperature=e.knn_temperature,
                                               num_classes=n)
    out['linear' + suffix] = probe_top1('linear', x)
  if model is None:
    out.update(knn_avg=out['knn'], linear_avg=out['linear'], attentive=None)
  else:
    out['attentive'] = probe_top1('attentive', 'tokens')
  return out


def run_one(name: str, method: str | None, seed: int, b: dict) -> dict:
  """Pretrains (method) or not (baselines 'random_init', 'pixels'), then probes; cached."""
  workdir = os.path.join(FLAGS.out, name)
  result_path = os.path.join(workdir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      done = json.load(f)
    if done['budget'] == json.loads(json.dumps(b)):   # as stored: tuples read back as lists
      print(f'{name}: reusing {result_path}', flush=True)
      return dict(done, reused=True)
    raise SystemExit(f'{result_path} was made with another budget ({done["budget"]}); use '
                     'another --out or delete it.')
  os.makedirs(workdir, exist_ok=True)
  r = dict(name=name, method=method or name, seed=seed, budget=b, pretrain_wall_min=0.0,
           pretrain_cpu_min=0.0)
  if method:
    cfg = pretrain_config(method, seed, b)
    r['pretrain_command'] = pretrain_command(method, seed, workdir, b)
    print(f'\n=== {name}: {r["pretrain_command"]}', flush=True)
    spent_path = os.path.join(workdir, 'pretrain_time.json')   # the parts a signal cut
    spent = dict(wall_min=0.0, cpu_min=0.0)
    if os.path.exists(spent_path):
      with open(spent_path) as f:
        spent = json.load(f)
    t0, c0 = time.perf_counter(), cpu_seconds()
    state, metrics = train.train(cfg, workdir)
    spent = dict(wall_min=spent['wall_min'] + (time.perf_counter() - t0) / 60,
                 cpu_min=spent['cpu_min'] + (cpu_seconds() - c0) / 60)
    with open(spent_path, 'w') as f:
      json.dump(spent, f)
    steps, total = int(state.step), pretrain_steps(cfg, b)
    del state
    if steps < total:   # SIGTERM / SIGINT: train saved and returned; never probe a partial run
      raise SystemExit(f'{name}: pretraining stopped after step {steps} of {total} (checkpoint '
                       f'kept); not probed, no result written. Rerun the same command to resume '
                       f'it: its recorded minutes add up the parts.')
    r.update(pretrain_wall_min=spent['wall_min'], pretrain_cpu_min=spent['cpu_min'],
             final_loss=metrics.get('loss'), steps=steps)
  init_from = {'random_init': 'random', 'pixels': 'random'}.get(name, workdir)
  cfg = eval_config(b, init_from)
  t0 = time.perf_counter()
  if name == 'pixels':
    model, params = None, None
  else:
    model, params, _ = eval_run.load_encoder(cfg, None, sharding.make_mesh(cfg.mesh))
  r.update(probe_scores(cfg, model, params, b))
  r['eval_wall_min'] = (time.perf_counter() - t0) / 60
  if name != 'pixels':
    r['eval_command'] = (f'python main.py --mode=eval --config=configs/eval_cifar10.py '
                         f'--config.init_from={init_from} --workdir={workdir} '
                         f'--config.data.data_dir={data_dir()}'
                         + (' ' + ' '.join(f'--config.model.{k}={v}' for k, v in
                                           model_overrides(b).items()) if init_from == 'random'
                            else '')
                         + f' --config.probe.epochs={b["linear_epochs"]:g}'
                         f'   # attentive: --config.eval.protocols=attentive '
                         f'--config.probe.epochs={b["attentive_epochs"]:g}')
  print(f'{name}: kNN {_pct(r["knn"])} (avg {_pct(r["knn_avg"])}) | linear {_pct(r["linear"])} '
        f'(avg {_pct(r["linear_avg"])}) | attentive '
        f'{_pct(r["attentive"])} | pretrain {r["pretrain_cpu_min"]:.1f} CPU min', flush=True)
  with open(result_path, 'w') as f:
    json.dump(r, f, indent=2)
  return r


def _pct(x) -> str:
  return '-' if x is None else f'{100 * x:.1f}'


PROBES = ('knn', 'linear', 'attentive')
VECTORS = {'cls': 'cls token', 'avg': 'mean of the patch tokens'}


def _mean_spread(values) -> tuple[float, float] | None:
  """(mean, half the range) in %, or None where a probe does not apply."""
  if any(v is None for v in values):
    return None
  v = 100 * np.asarray(values)
  return float(v.mean()), float(v.max() - v.min()) / 2


def _better(a, b) -> bool:
  return a is not None and b is not None and a[0] - a[1] > b[0] + b[1]


def _fmt(ms) -> str:
  return '-' if ms is None else f'{ms[0]:.1f}' + (f' ± {ms[1]:.1f}' if ms[1] else '')


def table(rows: list[dict], b: dict, pool: str = 'cls') -> str:
  """Markdown: the runs, the methods (mean ± spread, verdict) and MAE's margins; kNN and linear
  of the encoder vector `pool` (cls | avg)."""
  col = lambda k: f'{k}_avg' if pool == 'avg' and k != 'attentive' else k
  what = (f'{b["steps"]} steps' if b['steps'] else f'{b["epochs"]:g} epochs') + (
      f' of batch {b["batch"]}; ViT {b["width"]}x{b["depth"]} ({b["heads"]} heads), patch '
      f'{b["patch"]}, '
      f'decoder {b["decoder_width"]}x{b["decoder_depth"]}')
  lines = [f'Pretraining: {what}. Probes on the frozen encoder: kNN k=20 and linear '
           f'({b["linear_epochs"]:g} epochs) on the {VECTORS[pool]}, attentive '
           f'({b["attentive_epochs"]:g} epochs) on the tokens, on cached features; top-1 % on '
           f'{rows[0]["queries"]}.', '',
           '| method | seed | kNN | linear | attentive | pretrain CPU min | pretrain wall min |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    label = LABELS.get(r['method'], r['method'])
    lines.append(f'| {label} | {r["seed"] if "pretrain_command" in r else "-"} | '
                 + ' | '.join(_pct(r[col(k)]) for k in PROBES)
                 + f' | {r["pretrain_cpu_min"]:.1f} | {r["pretrain_wall_min"]:.1f} |')
  lines += ['', 'Per method, mean ± half the range over seeds; "better than MAE" where the mean '
            'minus its spread clears MAE\'s mean plus its spread:', '',
            '| method | seeds | kNN | linear | attentive | pretrain CPU min | better than MAE on |',
            '|---|---|---|---|---|---|---|']
  methods = list(dict.fromkeys(r['method'] for r in rows))
  stats = {m: {k: _mean_spread([r[col(k)] for r in rows if r['method'] == m])
               for k in PROBES} for m in methods}
  for m in methods:
    runs = [r for r in rows if r['method'] == m]
    if m == 'mae' or 'mae' not in stats or m in ('random_init', 'pixels'):
      verdict = '(the reference)' if m == 'mae' else '-'
    elif len(runs) < 2:
      verdict = 'one seed: no spread to judge'
    else:
      verdict = ', '.join(k for k in PROBES if _better(stats[m][k], stats['mae'][k])) or 'none'
    lines.append(f'| {LABELS.get(m, m)} | {len(runs) if "pretrain_command" in runs[0] else "-"} | '
                 + ' | '.join(_fmt(stats[m][k]) for k in PROBES)
                 + f' | {np.mean([r["pretrain_cpu_min"] for r in runs]):.1f} | {verdict} |')
  baselines = [r for r in rows if r['method'] in ('random_init', 'pixels')]
  mae = [r for r in rows if r['method'] == 'mae']
  if mae and baselines:
    margins = []
    for k in PROBES:
      base = [r[col(k)] for r in baselines if r[col(k)] is not None]
      margins.append(f'{k} {100 * (min(r[col(k)] for r in mae) - max(base)):+.1f}')
    lines += ['', 'MAE\'s worst seed minus the best of raw pixels and random init: '
              + ', '.join(margins)]
  return '\n'.join(lines)


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:  # as main.py: library INFO chatter drowns the progress lines
    logging.set_verbosity(logging.WARNING)
  d = data_dir()
  if not all(os.path.exists(os.path.join(d, f)) for f in ('train_00.npz', 'test.npz')):
    print(f'methods table skipped: no CIFAR-10 subset at {d} (train_*.npz, test.npz); set '
          'MIM_DATASETS to the directory holding cifar10/.')
    return
  unknown = set(FLAGS.methods) - set(METHODS)
  if unknown:
    raise app.UsageError(f'--methods: unknown {sorted(unknown)}; choose from {METHODS}.')
  b = budget()
  t_start = time.perf_counter()
  mae_seeds, seeds = FLAGS.mae_seeds, FLAGS.seeds
  if FLAGS.smoke:   # 1-2 minutes: two MAE seeds (a spread) and one of the others, unless set
    mae_seeds = mae_seeds if FLAGS['mae_seeds'].present else mae_seeds[:2]
    seeds = seeds if FLAGS['seeds'].present else seeds[:1]
  runs = [(f'mae_s{s}', 'mae', int(s)) for s in mae_seeds if 'mae' in FLAGS.methods]
  if set(FLAGS.methods) & set(config_lib.DISTILL_METHODS):
    runs.append(('teacher', 'teacher', 0))   # before its students
  runs += [(f'{m}_s{s}', m, int(s)) for m in FLAGS.methods if m != 'mae' for s in seeds]
  runs += [('random_init', None, 0), ('pixels', None, 0)]
  minutes = estimate_minutes(runs, b)
  print(f'{len(runs)} runs; estimated {sum(minutes):.0f} min on {jax.device_count()} device(s) '
        f'({ESTIMATE_BASIS})', flush=True)
  rows, measured, estimated = [], 0.0, 0.0   # over the runs done here (not reused)
  for i, (name, method, seed) in enumerate(runs):
    t0 = time.perf_counter()
    rows.append(run_one(name, method, seed, b))
    if not rows[-1].get('reused'):
      measured, estimated = measured + (time.perf_counter() - t0) / 60, estimated + minutes[i]
    left = sum(minutes[i + 1:]) * (measured / estimated if estimated else 1.0)
    print(f'[{i + 1}/{len(runs)} runs done after {(time.perf_counter() - t_start) / 60:.1f} min; '
          f'about {left:.0f} min left]', flush=True)
  text = table(rows, b, FLAGS.pool)
  print('\n' + text)
  summary = dict(budget=b, pool=FLAGS.pool, date=datetime.date.today().isoformat(), cpu=flops_lib.cpu_name(),
                 estimated_wall_min=sum(minutes),
                 cores=len(os.sched_getaffinity(0)), devices=jax.device_count(),
                 total_wall_min=(time.perf_counter() - t_start) / 60, rows=rows, markdown=text)
  path = os.path.join(FLAGS.out, 'methods_table.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2)
  print(f'\nWrote {path} ({summary["total_wall_min"]:.1f} min in all).')


if __name__ == '__main__':
  app.run(main)
