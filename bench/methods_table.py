"""The methods table: every pretraining method on one budget on the CIFAR-10 subset, then probed.

  python bench/methods_table.py --smoke                  # everything, tiny: 1-2 minutes
  python bench/methods_table.py                          # the full table: ~35 min on 2 free cores
  python bench/methods_table.py --epochs=6 --width=192 --depth=6 --heads=3 --out=DIR   # more

Data: ../shared/datasets/cifar10 ($MIM_DATASETS/cifar10 overrides): 20k train / 10k test images;
skipped with a message when absent. Each method of configs/cifar10.py (mae for every seed of
--mae_seeds, the others seed 0) pretrains the same ViT for the same --epochs (in this process,
`train.train`, as the printed `main.py` command would), from scratch in OUT/<method>_s<seed>.
Then each encoder, plus a random-init one of the same ViT and raw pixels, is evaluated with the
protocols of configs/eval_cifar10.py (`--mode=eval`'s pieces: features.extract, knn, probe), on
features extracted once per encoder (the cls token and the tokens after the final norm): kNN
(DINO, k=20) with the 20k train images as the bank, the MAE linear probe (BN + linear, LARS, 90
epochs) and the attentive probe (EP, --attentive_epochs) on cached center-crop features, all on
the 10k test images. Raw pixels: kNN and linear probe on the 3072 normalized values.

Records per run: pretraining wall and CPU minutes (user + sys of this process and its data
workers), the final loss, seed, commands; prints a markdown table (MAE's spread over seeds: mean
and half the range) and writes OUT/methods_table.json. A run whose OUT/<name>/result.json exists
with the same budget is not redone (an interrupted table continues).
"""
import datetime
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import cifar10  # noqa: E402
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
flags.DEFINE_float('epochs', 3.0, 'Pretraining epochs of the 20k train images, every method.')
flags.DEFINE_integer('width', 128, 'Encoder width (the same ViT for every method).')
flags.DEFINE_integer('depth', 4, 'Encoder blocks.')
flags.DEFINE_integer('heads', 4, 'Encoder heads.')
flags.DEFINE_integer('decoder_width', 64, 'MAE decoder width.')
flags.DEFINE_integer('decoder_depth', 2, 'MAE decoder blocks.')
flags.DEFINE_integer('batch', 128, 'Pretraining batch.')
flags.DEFINE_list('methods', list(METHODS), 'Methods of configs/cifar10.py to pretrain.')
flags.DEFINE_list('mae_seeds', ['0', '1'], 'Seeds of the MAE runs (>= 2 for a spread).')
flags.DEFINE_float('teacher_epochs', 0.0, 'Epochs of the MAE teacher the distillation methods '
                   'learn from (pretrained here, same ViT); 0 = 2x --epochs.')
flags.DEFINE_float('linear_epochs', 90.0, 'Linear probe epochs (cached features).')
flags.DEFINE_float('attentive_epochs', 10.0, 'Attentive probe epochs (cached tokens).')
flags.DEFINE_bool('smoke', False, 'Tiny everything (ViT 32x2, 4 steps, 500 / 200 images, 2 probe '
                  'epochs): checks the whole table in 1-2 minutes; the numbers mean nothing.')
FLAGS = flags.FLAGS


def data_dir() -> str:
  root = os.environ.get('MIM_DATASETS', os.path.join(os.path.dirname(ROOT), 'shared', 'datasets'))
  return os.path.join(root, 'cifar10')


def budget() -> dict:
  b = dict(epochs=FLAGS.epochs, teacher_epochs=FLAGS.teacher_epochs or 2 * FLAGS.epochs,
           steps=0, batch=FLAGS.batch, width=FLAGS.width, depth=FLAGS.depth,
           heads=FLAGS.heads, decoder_width=FLAGS.decoder_width,
           decoder_depth=FLAGS.decoder_depth, linear_epochs=FLAGS.linear_epochs,
           attentive_epochs=FLAGS.attentive_epochs, max_train=0, max_test=0)
  if FLAGS.smoke:
    b.update(epochs=0, steps=4, batch=32, width=32, depth=2, heads=2, decoder_width=16,
             decoder_depth=1, linear_epochs=2.0, attentive_epochs=2.0, max_train=500, max_test=200)
  return b


def model_overrides(b: dict) -> dict:
  return dict(width=b['width'], depth=b['depth'], num_heads=b['heads'],
              decoder_width=b['decoder_width'], decoder_depth=b['decoder_depth'],
              decoder_heads=max(1, b['decoder_width'] // 32))


def teacher_workdir() -> str:
  return os.path.join(FLAGS.out, 'teacher')


def pretrain_config(method: str, seed: int, b: dict):
  c = config_lib.load(os.path.join(ROOT, 'configs/cifar10.py'),
                      f'method={"mae" if method == "teacher" else method}')
  c.model.update(model_overrides(b))
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
                            pools=('cls', 'tokens'), batch_size=cfg.eval.batch_size, what=what)
  batches = pipeline.eval_batches(cfg.data, split, subset.indices, image_size=32,
                                  batch_size=cfg.eval.batch_size)
  return features.stream(_pixels, None, batches, mesh, total=len(subset.indices), what=what)


def probe_scores(cfg, model, params, b: dict) -> dict:
  """kNN / linear / attentive top-1 on the test subset, features extracted once."""
  mesh = sharding.make_mesh(cfg.mesh)
  train_set, test_set = eval_run.subsets(cfg, b['max_train'], b['max_test'])
  fb = extract(cfg, model, params, mesh, cfg.data.train_split, train_set)
  fq = extract(cfg, model, params, mesh, cfg.data.eval_split, test_set)
  vec = 'cls' if model is not None else 'pixels'
  n = train_set.num_classes
  e = cfg.eval
  out = dict(bank=train_set.description, queries=test_set.description)
  out['knn'] = knn_lib.knn_accuracy(fb[vec], fb['label'], fq[vec], fq['label'], k=e.knn_k,
                                    temperature=e.knn_temperature, num_classes=n)
  for protocol, x in (('linear', vec), ('attentive', 'tokens')):
    if x not in fb:
      out[protocol] = None   # raw pixels: no tokens
      continue
    pc = cfg.probe.copy_and_resolve_references()
    if protocol == 'attentive':
      pc.epochs, pc.warmup_epochs = b['attentive_epochs'], min(pc.warmup_epochs,
                                                               b['attentive_epochs'] / 9)
    head, state, info = probe.train_on_features(protocol, pc, fb[x], fb['label'], n, mesh, cfg.seed)
    out[protocol] = probe.accuracy_on_features(head, state, fq[x], fq['label'], mesh)['top1']
    out[f'{protocol}_steps'] = info['steps']
  return out


def run_one(name: str, method: str | None, seed: int, b: dict) -> dict:
  """Pretrains (method) or not (baselines 'random_init', 'pixels'), then probes; cached."""
  workdir = os.path.join(FLAGS.out, name)
  result_path = os.path.join(workdir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      done = json.load(f)
    if done['budget'] == b:
      print(f'{name}: reusing {result_path}', flush=True)
      return done
    raise SystemExit(f'{result_path} was made with another budget ({done["budget"]}); use '
                     'another --out or delete it.')
  os.makedirs(workdir, exist_ok=True)
  r = dict(name=name, method=method or name, seed=seed, budget=b, pretrain_wall_min=0.0,
           pretrain_cpu_min=0.0)
  if method:
    cfg = pretrain_config(method, seed, b)
    r['pretrain_command'] = pretrain_command(method, seed, workdir, b)
    print(f'\n=== {name}: {r["pretrain_command"]}', flush=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    state, metrics = train.train(cfg, workdir)
    r.update(pretrain_wall_min=(time.perf_counter() - t0) / 60,
             pretrain_cpu_min=(cpu_seconds() - c0) / 60, final_loss=metrics.get('loss'),
             steps=int(state.step))
    del state
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
  print(f'{name}: kNN {_pct(r["knn"])} | linear {_pct(r["linear"])} | attentive '
        f'{_pct(r["attentive"])} | pretrain {r["pretrain_cpu_min"]:.1f} CPU min', flush=True)
  with open(result_path, 'w') as f:
    json.dump(r, f, indent=2)
  return r


def _pct(x) -> str:
  return '-' if x is None else f'{100 * x:.1f}'


def _spread(values) -> str:
  if any(v is None for v in values):
    return '-'
  v = 100 * np.asarray(values)
  return f'{v.mean():.1f} ± {(v.max() - v.min()) / 2:.1f}'


def table(rows: list[dict], b: dict) -> str:
  what = (f'{b["steps"]} steps' if b['steps'] else f'{b["epochs"]:g} epochs') + (
      f' of batch {b["batch"]}; ViT {b["width"]}x{b["depth"]} ({b["heads"]} heads), patch 4, '
      f'decoder {b["decoder_width"]}x{b["decoder_depth"]}')
  lines = [f'Pretraining: {what}. Probes on the frozen encoder: kNN k=20 (cls), linear '
           f'({b["linear_epochs"]:g} epochs) and attentive ({b["attentive_epochs"]:g} epochs) '
           f'probes on cached features; top-1 % on {rows[0]["queries"]}.', '',
           '| method | seed | kNN | linear | attentive | pretrain CPU min | pretrain wall min |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    label = LABELS.get(r['method'], r['method'])
    lines.append(f'| {label} | {r["seed"] if "pretrain_command" in r else "-"} | '
                 f'{_pct(r["knn"])} | {_pct(r["linear"])} | {_pct(r["attentive"])} | '
                 f'{r["pretrain_cpu_min"]:.1f} | {r["pretrain_wall_min"]:.1f} |')
  mae = [r for r in rows if r['method'] == 'mae']
  if len(mae) > 1:
    lines += ['', f'MAE over seeds {", ".join(str(r["seed"]) for r in mae)} (mean ± half the '
              'range): ' + ', '.join(f'{k} {_spread([r[k] for r in mae])}'
                                     for k in ('knn', 'linear', 'attentive'))]
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
  runs = [(f'mae_s{s}', 'mae', int(s)) for s in FLAGS.mae_seeds if 'mae' in FLAGS.methods]
  if set(FLAGS.methods) & set(config_lib.DISTILL_METHODS):
    runs.append(('teacher', 'teacher', 0))   # before its students
  runs += [(f'{m}_s0', m, 0) for m in FLAGS.methods if m != 'mae']
  rows = [run_one(name, method, seed, b) for name, method, seed in runs]
  rows += [run_one('random_init', None, 0, b), run_one('pixels', None, 0, b)]
  text = table(rows, b)
  print('\n' + text)
  summary = dict(budget=b, date=datetime.date.today().isoformat(), cpu=flops_lib.cpu_name(),
                 cores=len(os.sched_getaffinity(0)), devices=jax.device_count(),
                 total_wall_min=(time.perf_counter() - t_start) / 60, rows=rows, markdown=text)
  path = os.path.join(FLAGS.out, 'methods_table.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2)
  print(f'\nWrote {path} ({summary["total_wall_min"]:.1f} min in all).')


if __name__ == '__main__':
  app.run(main)
