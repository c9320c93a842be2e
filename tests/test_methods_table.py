"""bench/methods_table.py --smoke: the recipe of configs/cifar10.py pretrained (4 steps, tiny ViT)
and probed, the baselines, the per-method summary with its verdicts, and the reuse of done runs."""
import functools
import importlib.util
import json
import os
import sys
import types

import pytest

from tests import launch


def run_table(out, *flags: str) -> str:
  root = os.environ.get('MIM_DATASETS', os.path.join(os.path.dirname(launch.ROOT), 'shared',
                                                     'datasets'))
  if not os.path.exists(os.path.join(root, 'cifar10', 'test.npz')):
    pytest.skip(f'no CIFAR-10 subset at {root}/cifar10 (set MIM_DATASETS)')
  return launch.run_checked([sys.executable, 'bench/methods_table.py', '--smoke', f'--out={out}',
                             *flags])


@functools.cache   # its absl flags can be defined once per process
def methods_table_module():
  spec = importlib.util.spec_from_file_location(
      'methods_table', os.path.join(launch.ROOT, 'bench', 'methods_table.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_better_than_mae_needs_both_spreads_cleared():
  mt = methods_table_module()
  row = lambda method, seed, knn, linear: dict(method=method, seed=seed, knn=knn, linear=linear,
                                               knn_avg=knn + 0.1, linear_avg=linear - 0.1,
                                               attentive=None, pretrain_cpu_min=1.0,
                                               pretrain_wall_min=1.0, queries='q',
                                               pretrain_command='c')
  rows = [row('mae', 0, 0.40, 0.50), row('mae', 1, 0.42, 0.50),           # kNN 41 ± 1, linear 50
          row('hpm', 0, 0.43, 0.52), row('hpm', 1, 0.45, 0.52),           # kNN 44 ± 1: clears 42
          row('radial', 0, 0.42, 0.49), row('radial', 1, 0.46, 0.53)]     # kNN 44 ± 2: 42 = 42
  b = dict(steps=4, batch=8, width=8, depth=1, heads=1, patch=4, decoder_width=8, decoder_depth=1,
           linear_epochs=1, attentive_epochs=1)
  text = mt.table(rows, b)
  assert '| mae | 2 | 41.0 ± 1.0 | 50.0 | - | 1.0 | (the reference) |' in text, text
  assert '| hpm | 2 | 44.0 ± 1.0 | 52.0 | - | 1.0 | knn, linear |' in text, text
  assert '| radial | 2 | 44.0 ± 2.0 | 51.0 ± 2.0 | - | 1.0 | none |' in text, text
  avg = mt.table(rows, b, pool='avg')   # the same rule on the mean-pooled readings
  assert 'on the mean of the patch tokens' in avg and 'on the cls token' in text
  assert '| mae | 2 | 51.0 ± 1.0 | 40.0 | - | 1.0 | (the reference) |' in avg, avg
  assert '| hpm | 2 | 54.0 ± 1.0 | 42.0 | - | 1.0 | knn, linear |' in avg, avg


def test_a_stopped_pretraining_stops_the_table_unprobed_and_resumes_with_its_minutes(
    tmp_path, monkeypatch):
  """SIGTERM makes train.train save and return early: probing that partial encoder and caching
  its result.json would pass it off as the budget's; and the resumed part alone is not the run's
  cost."""
  mt = methods_table_module()
  mt.FLAGS(['methods_table', '--smoke', f'--out={tmp_path}'])
  b = mt.budget()
  total = mt.pretrain_steps(mt.pretrain_config('mae', 0, b), b)
  cpu_clock = iter([0.0, 60.0, 100.0, 160.0])   # each part's start and end: one CPU minute each
  monkeypatch.setattr(mt, 'cpu_seconds', lambda: next(cpu_clock))
  step_reached = iter([1, total])
  monkeypatch.setattr(mt.train, 'train', lambda cfg, workdir: (
      types.SimpleNamespace(step=next(step_reached)), {'loss': 0.5}))
  monkeypatch.setattr(mt.eval_run, 'load_encoder', lambda *args: (None, None, None))
  scores = dict(knn=0.4, knn_avg=0.4, linear=0.5, linear_avg=0.5, attentive=0.6)
  monkeypatch.setattr(mt, 'probe_scores', lambda *args: dict(scores))
  with pytest.raises(SystemExit, match=f'mae_s0: pretraining stopped after step 1 of {total}'):
    mt.run_one('mae_s0', 'mae', 0, b)
  assert not (tmp_path / 'mae_s0' / 'result.json').exists()
  r = mt.run_one('mae_s0', 'mae', 0, b)
  assert r['steps'] == total and r['pretrain_cpu_min'] == pytest.approx(2.0), r
  with open(tmp_path / 'mae_s0' / 'result.json') as f:
    assert json.load(f)['pretrain_cpu_min'] == pytest.approx(2.0)


SETTING = '--set=data.crop_scale=(0.35, 1.0)'   # a tuple: stored as a list, read back equal


def test_table_of_mae_and_the_baselines_then_reused(tmp_path):
  out = run_table(tmp_path, '--methods=mae', SETTING)
  with open(tmp_path / 'methods_table.json') as f:
    summary = json.load(f)
  names = [r['name'] for r in summary['rows']]
  assert names == ['mae_s0', 'mae_s1', 'random_init', 'pixels']
  for r in summary['rows']:
    assert all(0 <= r[k] <= 1 for k in ('knn', 'linear', 'knn_avg', 'linear_avg')), r
    assert (r['attentive'] is None) == (r['name'] == 'pixels'), r
    assert (r['pretrain_cpu_min'] > 0) == ('pretrain_command' in r), r
  assert summary['estimated_wall_min'] > 0 and summary['total_wall_min'] > 0
  assert "'--config.data.crop_scale=(0.35, 1.0)'" in summary['rows'][0]['pretrain_command']
  with open(tmp_path / 'mae_s0' / 'config.json') as f:
    assert json.load(f)['data']['crop_scale'] == [0.35, 1.0]   # the run had the setting
  assert '4 runs; estimated' in out and '[4/4 runs done after' in out
  # The per-method rows: MAE's two seeds as mean ± half the range, the reference of the verdicts.
  knn = sorted(100 * r['knn'] for r in summary['rows'][:2])
  mae_row = f'| mae | 2 | {(knn[0] + knn[1]) / 2:.1f}'
  assert mae_row in out and '| (the reference) |' in out, out[-3000:]
  assert "MAE's worst seed minus the best of raw pixels and random init: knn" in out
  pixels = summary['rows'][-1]   # one vector: the same readings under both names
  assert (pixels['knn_avg'], pixels['linear_avg']) == (pixels['knn'], pixels['linear'])
  again = run_table(tmp_path, '--methods=mae', SETTING, '--pool=avg')
  assert again.count('reusing') == 4, again[-2000:]
  assert '4 runs; estimated 0 min' in again
  knn = sorted(100 * r['knn_avg'] for r in summary['rows'][:2])   # the table of the other vector
  assert f'| mae | 2 | {(knn[0] + knn[1]) / 2:.1f}' in again, again[-3000:]
  assert 'on the mean of the patch tokens' in again


@pytest.mark.slow
def test_every_method(tmp_path):
  out = run_table(tmp_path)
  assert '| mrmae | 1 |' in out and 'one seed: no spread to judge' in out
  with open(tmp_path / 'methods_table.json') as f:
    names = [r['name'] for r in json.load(f)['rows']]
  assert names == ['mae_s0', 'mae_s1', 'teacher', 'colormae_s0', 'blockmask_s0', 'radial_s0',
                   'hpm_s0', 'data2vec_s0', 'attmask_s0', 'mrmae_s0', 'dmae_s0', 'maskalign_s0',
                   'dtm_s0', 'random_init', 'pixels']
