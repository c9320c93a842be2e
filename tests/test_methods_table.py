"""bench/methods_table.py --smoke: every method and baseline pretrained (4 steps) and probed."""
import json
import os
import subprocess
import sys

import pytest

from tests import launch


@pytest.mark.slow
def test_methods_table_smoke(tmp_path):
  root = os.environ.get('MIM_DATASETS', os.path.join(os.path.dirname(launch.ROOT), 'shared',
                                                     'datasets'))
  if not os.path.exists(os.path.join(root, 'cifar10', 'test.npz')):
    pytest.skip(f'no CIFAR-10 subset at {root}/cifar10 (set MIM_DATASETS)')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, 'bench/methods_table.py', '--smoke', f'--out={tmp_path}'],
                        cwd=launch.ROOT, env=env, capture_output=True, text=True,
                        timeout=launch.TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(tmp_path / 'methods_table.json') as f:
    summary = json.load(f)
  names = [r['name'] for r in summary['rows']]
  assert names == ['mae_s0', 'mae_s1', 'colormae_s0', 'blockmask_s0', 'radial_s0', 'hpm_s0',
                   'data2vec_s0', 'attmask_s0', 'random_init', 'pixels']
  for r in summary['rows']:
    assert 0 <= r['knn'] <= 1 and 0 <= r['linear'] <= 1, r
    assert (r['attentive'] is None) == (r['name'] == 'pixels'), r
    assert (r['pretrain_cpu_min'] > 0) == ('pretrain_command' in r), r
  assert '| mae | 1 |' in proc.stdout and 'MAE over seeds 0, 1' in proc.stdout
  # A second call reuses every run.
  again = subprocess.run([sys.executable, 'bench/methods_table.py', '--smoke', f'--out={tmp_path}'],
                         cwd=launch.ROOT, env=env, capture_output=True, text=True,
                         timeout=launch.TIMEOUT_S)
  assert again.returncode == 0 and again.stdout.count('reusing') == 10, again.stdout[-2000:]
