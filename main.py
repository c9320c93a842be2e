"""Entry point: python main.py --config=configs/demo.py --workdir=W
  [--mode=train|summary|export|eval|finetune|visualize].

Export weights for PyTorch (timm, Hugging Face ViTMAE, official MAE; see mim/interop):
  python main.py --mode=export --workdir=W --export_format=timm|hf|mae --export_path=P
Evaluate a checkpoint or any weights (kNN, linear / attentive probes; see mim/evaluate/run.py):
  python main.py --mode=eval --config=configs/linprobe_vitb.py --config.init_from=W_OR_FILE --workdir=W2
Fine-tune a checkpoint or any weights, MAE protocol (see mim/finetune/train.py; a rerun resumes):
  python main.py --mode=finetune --config=configs/finetune_vitb.py --config.init_from=W_OR_FILE --workdir=W2

Draw the configured masking strategy (or every one: --config.masking.name=all) on real images,
with the masks' power spectra (see mim/evaluate/mask_views.py):
  python main.py --mode=visualize --config=configs/demo.py --workdir=W --config.masking.name=all

Config values are overridden with --config.key=value (e.g. --config.total_steps=100).
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and images; a rerun resumes.')
flags.DEFINE_enum('mode', 'train', ['train', 'summary', 'export', 'eval', 'finetune', 'visualize'],
                  'What to do with the config.')
flags.DEFINE_enum('export_format', None, ['timm', 'hf', 'mae'],
                  'For --mode=export: timm (P.safetensors + P.npz, encoder), hf (directory P), '
                  'mae (P.safetensors + P.pth, encoder + decoder).')
flags.DEFINE_string('export_path', None,
                    'For --mode=export: output file stem (timm, mae) or directory (hf).')
flags.DEFINE_string('coordinator_address', None,
                    'Multi-process: host:port of process 0 (or env MIM_COORDINATOR_ADDRESS).')
flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes (or MIM_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None, 'Multi-process: this process (or MIM_PROCESS_ID).')
flags.DEFINE_bool('distributed', None, 'Call jax.distributed.initialize() with cluster '
                  'auto-detection (Cloud TPU, SLURM, ...). Default: on under SLURM with several '
                  'tasks, on multi-host TPU, and when --coordinator_address is given.')
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/mae_vitb.py[:arg].',
                                lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:  # library INFO chatter (orbax, jax) drowns the progress lines
    logging.set_verbosity(logging.WARNING)
  if FLAGS.config is not None:  # before jax starts its CPU threads (see mim/host_memory.py)
    from mim import host_memory
    host_memory.set_up(FLAGS.config.get('mimalloc', False),
                       FLAGS.config.get('keep_freed_host_memory', False))
  from mim import sharding  # after flag parsing: keeps --help fast
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, FLAGS.distributed)
  from mim import checkpoint
  from mim import config as config_lib
  from mim import interop
  from mim import train
  import data as data_lib
  cfg = FLAGS.config
  try:
    if FLAGS.mode == 'export':
      if not FLAGS.export_format or not FLAGS.export_path:
        raise config_lib.ConfigError('--mode=export needs --export_format and --export_path.')
      cfg = config_lib.default_config() if cfg is None else cfg  # the workdir has its config.json
      written = interop.export(cfg, FLAGS.workdir, FLAGS.export_format, FLAGS.export_path)
      print('Wrote ' + ', '.join(written))
      return
    if FLAGS.mode == 'summary':
      from mim import summary
      config_lib.validate(cfg)
      print(summary.summarize(cfg))
      print(summary.scale_plan(cfg))
      print(summary.format_memory_plan(summary.memory_plan(cfg)))
      return
    if not FLAGS.workdir:
      raise config_lib.ConfigError(f'--workdir is required for --mode={FLAGS.mode}.')
    if FLAGS.mode == 'eval':
      from mim.evaluate import run as eval_run
      eval_run.evaluate(cfg, FLAGS.workdir)
      return
    if FLAGS.mode == 'finetune':
      from mim.finetune import train as finetune_train
      finetune_train.finetune(cfg, FLAGS.workdir)
      return
    if FLAGS.mode == 'visualize':
      from mim.evaluate import mask_views
      for path in mask_views.visualize(cfg, FLAGS.workdir):
        print(f'Wrote {path}')
      return
    train.train(cfg, FLAGS.workdir)
  except (config_lib.ConfigError, data_lib.DataError, interop.InteropError,
          checkpoint.CheckpointError, train.TrainingStopped) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl parsing, with a one-line error for --config.<key> overrides that do not exist."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    while e.args and isinstance(e.args[0], Exception):  # ml_collections wraps KeyError in AttributeError
      e = e.args[0]
    message = (e.args[0] if e.args else str(e)).replace('\n', ' ')
    print(f'error: bad --config override: {message}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  flags.register_multi_flags_validator(  # export reads the config saved in the workdir
      ['config', 'mode'], lambda f: f['config'] is not None or f['mode'] == 'export',
      message='--config is required (except for --mode=export).')
  app.run(main, flags_parser=parse_flags)
