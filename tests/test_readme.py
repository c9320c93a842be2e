"""The README's shell commands work as written (on the demo, with small step counts).

Every `python main.py` command in the README's code blocks that runs on the embedded data (the
demo config, export, the multi-process launch) is run in a temporary directory: workdirs and
output paths are redirected there, training commands get a few steps, and every command compiles
with the tests' XLA flags (launch.xla_flags; the multi-process line keeps its device count).
Commands that need ImageNet or a pod are left out by that rule, and the test checks that the
kinds it must cover (train, summary, the three export formats, init_from, multi-process) were all
found."""
import os
import re
import socket
import stat
import sys

from tests import launch

FAST = ['--config.total_steps=4', '--config.checkpoint_every_steps=2', '--config.eval.knn=False',
        '--config.reconstruction_every_steps=0']


def readme_commands() -> list[str]:
  with open(os.path.join(launch.ROOT, 'README.md')) as f:
    blocks = re.findall(r'```[a-z]*\n(.*?)```', f.read(), re.S)
  commands = []
  for block in blocks:
    text = block.replace('\\\n', ' ')
    if text.lstrip().startswith('for i in'):
      commands.append(' '.join(text.split()))
      continue
    for line in text.splitlines():
      line = line.split('#')[0].strip().split('&& ')[-1]
      if line.startswith('python main.py'):
        commands.append(line)
  runnable = [c for c in commands if 'configs/demo.py' in c or '--mode=export' in c]
  return list(dict.fromkeys(runnable))   # a command the README repeats runs once


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_shell(command: str) -> str:
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH']  # `python` = this one
  return launch.run_checked(['bash', '-c', command], PATH=path)


def test_readme_commands_run_as_written(tmp_path):
  commands = readme_commands()
  trained = str(tmp_path / 'trained')   # the first training command's workdir (README: W)
  kinds = set()
  for n, command in enumerate(commands):
    mode = re.search(r'--mode=(\w+)', command)
    mode = mode.group(1) if mode else 'train'
    fresh = str(tmp_path / f'run{n}')
    if mode == 'train' and not os.path.isdir(trained):
      fresh = trained
    command = command.replace('--workdir=workdirs/demo', f'--workdir={fresh}')
    if mode == 'train':
      fast = FAST + (['--config.total_steps=6'] if 'init_from' in command else [])  # 2 more
      command = re.sub(r'--workdir=\S+', f'--workdir={fresh}', command)
      command = re.sub(r'(python main\.py[^&]*?)( &|$)',
                       lambda m: f'{m.group(1)} {" ".join(fast)}{m.group(2)}', command)
    command = re.sub(r'(--workdir|--config\.init_from)=W\b', rf'\1={trained}', command)
    command = command.replace('--config.teacher.weights=workdirs/demo',   # the README's teacher
                              f'--config.teacher.weights={trained}')
    command = command.replace('out/', f'{tmp_path}/out/').replace('29500', str(free_port()))
    # the multi-process line's own device count, compiled like every other test run
    command = re.sub(r'XLA_FLAGS=--xla_force_host_platform_device_count=(\d+)',
                     lambda m: f"XLA_FLAGS='{launch.xla_flags(int(m.group(1)))}'", command)
    out = run_shell(command)
    assert 'Traceback' not in out and 'leaked shared_memory' not in out, out[-3000:]
    kinds.add('multiprocess' if command.startswith('for i in') else
              'init_from' if 'init_from' in command else
              re.search(r'--export_format=(\w+)', command).group(1) if mode == 'export' else mode)
    if mode == 'train':  # (`wait` hides the exit codes of the multi-process launch)
      assert os.listdir(os.path.join(fresh, 'checkpoints')), out[-3000:]
    if 'init_from_state' in command:
      assert 'Initialized the train state from' in out and 'starting at step 4' in out, out
  assert {'train', 'summary', 'timm', 'hf', 'mae', 'init_from', 'multiprocess'} <= kinds, kinds
  for name in ('vit.safetensors', 'vit.npz', 'mae.safetensors', 'mae.pth',
               'vit_mae/model.safetensors', 'vit_mae/config.json'):
    path = tmp_path / 'out' / name
    assert path.exists(), name
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH, f'{name} is {oct(mode)}: others cannot read it'
