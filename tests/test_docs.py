"""The README and docs/*.md stay true to the code, and the project's wording stays its own.

1. A word check: one word (WORD below, spelled in two halves so this file passes its own check)
   appears in no tracked text file, except the uses listed in ALLOWED, each with its reason.
2. A command check: every `python ...` command line in the code blocks of README.md and docs/*.md
   names a script that exists (or a module that imports: `python -m pytest`), passes only flags
   that script defines (main.py's absl flags; a bench script's absl flags, with those of the bench
   modules it imports), and every `--config.a.b=...` override names a key of the config that its
   `--config=configs/X.py[:arg]` builds.
"""
import functools
import glob
import importlib.util
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORD = 'sess' + 'ion'

# (path, the line's text that may hold the word): why it is not the project speaking of itself.
ALLOWED = {
    ('tests/conftest.py', '"""Test ' + WORD + ' setup: 8 simulated CPU devices'):
        "pytest's own term: a pytest '" + WORD + "' is one pytest run, which conftest.py sets up",
    ('tests/conftest.py', "@pytest.fixture(scope='" + WORD + "')"):
        "pytest's fixture scope of that name: one GCS emulator for the whole pytest run",
}


# ---------------------------------------------------------------------------------------------
# 1. The word check


def tracked_text_files() -> list[str]:
  out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True)
  paths = []
  for path in out.stdout.decode().split('\0'):
    full = os.path.join(ROOT, path)
    if not path or not os.path.isfile(full):   # deleted in the working tree
      continue
    with open(full, 'rb') as f:
      data = f.read()
    if b'\0' not in data:
      paths.append(path)
  return paths


def word_hits(path: str, text: str) -> list[str]:
  hits = []
  for n, line in enumerate(text.splitlines(), 1):
    if WORD in line.lower() and not any(p == path and allowed in line for p, allowed in ALLOWED):
      hits.append(f'{path}:{n}: {line.strip()[:160]}')
  return hits


def test_word_appears_in_no_tracked_file():
  hits = []
  for path in tracked_text_files():
    with open(os.path.join(ROOT, path), encoding='utf-8', errors='replace') as f:
      hits += word_hits(path, f.read())
  assert not hits, (f'"{WORD}" in tracked files (name the date, the machine or the commit '
                    'instead):\n' + '\n'.join(hits))


def test_word_check_reports_a_hit_and_honours_the_allow_list():
  assert word_hits('docs/x.md', f'measured in the third {WORD.capitalize()}') == [
      f'docs/x.md:1: measured in the third {WORD.capitalize()}']
  for path, line in ALLOWED:
    assert word_hits(path, line) == []
    assert word_hits('docs/other.md', line)   # allowed only in its own file


# ---------------------------------------------------------------------------------------------
# 2. The command check


def doc_files() -> list[str]:
  return ['README.md'] + sorted(os.path.relpath(p, ROOT)
                                for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def code_block_lines(text: str) -> list[str]:
  """Lines of the shell code blocks (```python blocks are Python, not commands); continuation
  backslashes joined, comments dropped."""
  lines = []
  for lang, body in re.findall(r'```([\w-]*)\n(.*?)```', text, re.S):
    if lang in ('python', 'py'):
      continue
    for line in body.replace('\\\n', ' ').splitlines():
      line = re.sub(r'(^|\s)#.*', '', line).strip()
      if line:
        lines.append(line)
  return lines


def python_commands(line: str) -> list[tuple[str, list[str]]]:
  """(script or '-m module', args) of every `python ...` in a shell line."""
  commands = []
  for m in re.finditer(r'(?:^|[\s;&|"(])python3?\s+(.*?)(?=&&|\|\||[;&|"]|$)', line):
    words = m.group(1).replace('[', ' ').replace(']', ' ').split()
    if not words:
      continue
    if words[0] == '-m':
      commands.append(('-m ' + words[1], words[2:]))
    elif words[0].endswith('.py'):
      commands.append((words[0], words[1:]))
  return commands


def script_flags(path: str, seen=None) -> set[str]:
  """absl (`DEFINE_*('name'`, `DEFINE_config_file('name'`) and argparse (`add_argument('--name'`)
  flags of a script, with those of the sibling modules it imports (bench/run.py takes
  bench/train_step.py's)."""
  seen = set() if seen is None else seen
  if path in seen or not os.path.isfile(path):
    return set()
  seen.add(path)
  with open(path) as f:
    text = f.read()
  names = set(re.findall(r"DEFINE_\w+\(\s*['\"](\w+)['\"]", text))
  names |= {n.replace('-', '_') for n in re.findall(r"add_argument\(\s*['\"]--([\w-]+)['\"]", text)}
  here = os.path.dirname(path)
  for mod in re.findall(r'^\s*(?:import (\w+)|from \w+ import (\w+))', text, re.M):
    name = mod[0] or mod[1]
    names |= script_flags(os.path.join(here, name + '.py'), seen)
  return names


@functools.lru_cache(maxsize=None)
def build_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(
      'doc_config_' + re.sub(r'\W', '_', path), os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def has_key(config, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    try:
      if part not in node:
        return False
      node = node[part]
    except TypeError:   # a leaf (not a ConfigDict) asked for a child
      return False
  return True


def command_problems(script: str, args: list[str]) -> list[str]:
  """What is wrong with one `python SCRIPT ARGS` command ([] when nothing)."""
  if script.startswith('-m '):
    module = script[3:]
    return [] if importlib.util.find_spec(module) else [f'no module {module}']
  path = os.path.join(ROOT, script)
  if not os.path.isfile(path):
    return [f'no file {script}']
  defined = script_flags(path)
  problems, config_spec, overrides = [], None, []
  for arg in args:
    if not arg.startswith('--'):
      continue
    name, _, value = arg[2:].partition('=')
    if name.startswith('config.'):
      overrides.append(name[len('config.'):])
      continue
    if name == 'config' and 'config' in defined:
      config_spec = value
    if name not in defined and not (name.startswith('no') and name[2:] in defined):
      problems.append(f'{script} has no flag --{name}')
  if overrides and not config_spec:
    problems.append(f'--config.{overrides[0]} without --config=...')
  elif overrides:
    try:
      config = build_config(config_spec)
    except Exception as e:  # noqa: BLE001  (a placeholder argument, a missing file, ...)
      return problems + [f'--config={config_spec} does not build: {type(e).__name__}: {e}']
    problems += [f'--config.{key}: no such key in {config_spec}'
                 for key in overrides if not has_key(config, key)]
  return problems


def documented_commands() -> list[tuple[str, str, list[str]]]:
  commands = []
  for doc in doc_files():
    with open(os.path.join(ROOT, doc)) as f:
      for line in code_block_lines(f.read()):
        commands += [(doc, script, args) for script, args in python_commands(line)]
  return commands


def test_documented_commands_name_real_scripts_flags_and_config_keys():
  commands = documented_commands()
  scripts = {script for _, script, _ in commands}
  assert {'main.py', 'bench/run.py', '-m pytest'} <= scripts, scripts   # the parser finds them
  problems = [f'{doc}: python {script} {" ".join(args)}\n    {problem}'
              for doc, script, args in commands for problem in command_problems(script, args)]
  assert not problems, '\n'.join(problems)


def test_command_check_reports_made_up_flags_keys_and_files():
  line = ('XLA_FLAGS=--xla_force_host_platform_device_count=4 python main.py '
          '--config=configs/demo.py --workdir=W --no_such_flag=1 '
          '--config.optim.no_such_key=2 --config.total_steps=5 &')
  (script, args), = python_commands(line)
  assert script == 'main.py' and args[0] == '--config=configs/demo.py'
  assert command_problems(script, args) == [
      'main.py has no flag --no_such_flag',
      '--config.optim.no_such_key: no such key in configs/demo.py']
  assert command_problems('main.py', ['--config.total_steps=5']) == [
      '--config.total_steps without --config=...']
  assert command_problems('bench/no_such_bench.py', []) == ['no file bench/no_such_bench.py']
  assert command_problems('main.py', ['--config=configs/no_such.py', '--config.seed=1'])[0].startswith(
      '--config=configs/no_such.py does not build')
  assert command_problems('bench/run.py', ['--json', '--rounds=3']) == []   # --json: train_step's
  assert command_problems('bench/run.py', ['--jsn']) == ['bench/run.py has no flag --jsn']
  assert command_problems('-m no_such_module_here', []) == ['no module no_such_module_here']
  assert python_commands('python3 -m venv .venv && . .venv/bin/activate && python -m pytest -q') == [
      ('-m venv', ['.venv']), ('-m pytest', ['-q'])]


@pytest.mark.parametrize('text, expected', [
    ('```\npython a.py --x \\\n  --y  # note\n```\n', ['python a.py --x    --y']),
    ('```python\nimport timm\n```\n', []),
])
def test_code_block_lines(text, expected):
  assert [' '.join(l.split()) for l in code_block_lines(text)] == [' '.join(e.split())
                                                                  for e in expected]
