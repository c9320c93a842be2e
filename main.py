"""Entry point: python main.py --config=configs/demo.py --workdir=W [--mode=train|summary].

Config values are overridden with --config.key=value (e.g. --config.total_steps=100).
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and images; a rerun resumes.')
flags.DEFINE_enum('mode', 'train', ['train', 'summary'], 'What to do with the config.')
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/mae_vitb.py[:arg].',
                                lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:  # library INFO chatter (orbax, jax) drowns the progress lines
    logging.set_verbosity(logging.WARNING)
  from mim import config as config_lib  # after flag parsing: keeps --help fast
  import data as data_lib
  cfg = FLAGS.config
  try:
    if FLAGS.mode == 'summary':
      from mim import summary
      config_lib.validate(cfg)
      print(summary.summarize(cfg))
      return
    if not FLAGS.workdir:
      raise config_lib.ConfigError('--workdir is required for --mode=train.')
    from mim import train
    train.train(cfg, FLAGS.workdir)
  except (config_lib.ConfigError, data_lib.DataError) as e:
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
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=parse_flags)
