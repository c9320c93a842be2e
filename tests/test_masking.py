"""The masking family: exact counts, randomness per sample / step / key, the noise colors'
spectra, BEiT blocks, radial wedges, ColorMAE banks, config errors and the visualize mode.
(The interface's scores -> mask contract is in tests/test_masking_objectives.py.)"""
import os

import jax
import ml_collections
import numpy as np
import pytest

from mim import config as config_lib
from mim import masking
from mim.evaluate import mask_views
from mim.masks import block
from mim.masks import colored_noise
from mim.masks import radial

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                    'demo.py')
SMALL = dict(block=dict(min_patches=4), radial=dict(num_sectors=6))  # fit 4x4 and 3x5 grids
VARIANTS = {'random': {}, 'green': dict(colored_noise=dict(color='green')),
            'red': dict(colored_noise=dict(color='red')), 'block': {}, 'radial': {}}


def masking_cfg(name: str, ratio: float = 0.75, **sections) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name=name, ratio=ratio, **sections))


def variant_cfg(variant: str, ratio: float = 0.75, small: bool = False):
  name = 'colored_noise' if variant in ('green', 'red') else variant
  return masking_cfg(name, ratio, **{**(SMALL if small else {}), **VARIANTS[variant]})


def draw(cfg, grid, batch=8, seed=0, step=0) -> np.ndarray:
  m = masking.make_masker(cfg, grid, total_steps=100)(jax.random.key(seed), batch, step)
  return np.asarray(m.mask).reshape(batch, *grid)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_exact_masked_count_on_square_and_other_grids(variant):
  for grid, ratio in (((14, 14), 0.75), ((14, 14), 0.9), ((4, 4), 0.5), ((4, 4), 0.75),
                      ((3, 5), 0.6), ((6, 11), 0.75), ((6, 11), 0.5)):
    keep = masking.num_keep(grid[0] * grid[1], ratio)
    mask = draw(variant_cfg(variant, ratio, small=grid[0] * grid[1] < 40), grid)
    np.testing.assert_array_equal(mask.sum((1, 2)), grid[0] * grid[1] - keep,
                                  err_msg=f'{variant} {grid} {ratio}')


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_masks_differ_per_sample_and_key_and_repeat_for_a_key(variant):
  cfg = variant_cfg(variant)
  a, b, c = draw(cfg, (14, 14), 16, seed=0), draw(cfg, (14, 14), 16, seed=0), \
      draw(cfg, (14, 14), 16, seed=1)
  np.testing.assert_array_equal(a, b)
  assert len({m.tobytes() for m in a}) == 16      # every sample its own mask
  assert all((a[i] != c[i]).any() for i in range(16))


def test_color_schedule_follows_the_traced_step_without_recompiling():
  traces = []
  cfg = masking_cfg('colored_noise', colored_noise=dict(color='green:0,blue:50,red:80'))
  masker = masking.make_masker(cfg, (14, 14), 100)

  def f(rng, step):
    traces.append(1)
    return masker(rng, 8, step).mask

  jitted = jax.jit(f)
  key = jax.random.key(3)
  for step, color in ((0, 'green'), (49, 'green'), (50, 'blue'), (79, 'blue'), (80, 'red')):
    alone = masking.make_masker(masking_cfg('colored_noise', colored_noise=dict(color=color)),
                                (14, 14), 100)(key, 8).mask
    np.testing.assert_array_equal(jitted(key, step), alone, err_msg=f'step {step}')
  assert len(traces) == 1
  assert (np.asarray(jitted(key, 0)) != np.asarray(jitted(key, 50))).any()


def normalized_spectrum(fields):
  freq, power = mask_views.radial_spectrum(np.asarray(fields, np.float64))
  return freq, power / power.mean()


def band(freq, power, lo, hi):
  return power[(freq >= lo) & (freq <= hi)]


def test_noise_colors_put_their_energy_where_they_should():
  grid, n = (32, 32), 256   # a finer grid resolves the bands; the sigmas are the defaults
  spectra = {}
  for color in colored_noise.COLORS:
    params = masking.strategy_params(masking_cfg('x', colored_noise=dict(color=color)),
                                     'colored_noise')
    noise = -colored_noise.scores(jax.random.key(0), masking.MaskContext(n, grid, 256), params)
    spectra[color] = normalized_spectrum(np.asarray(noise).reshape(n, *grid))
    mask = draw(masking_cfg('colored_noise', colored_noise=dict(color=color)), grid, n)
    spectra[color + '_mask'] = normalized_spectrum(1.0 - mask)
  f, white = spectra['white']
  assert white.max() / white.min() < 1.3                       # flat
  low, mid, high = (lambda p: band(f, p, 0, 0.1)), (lambda p: band(f, p, 0.1, 0.22)), \
      (lambda p: band(f, p, 0.3, 1))
  red, blue, green, purple = (spectra[c][1] for c in ('red', 'blue', 'green', 'purple'))
  assert low(red).mean() > 20 * high(red).mean()
  assert high(blue).mean() > 10 * low(blue).mean()
  assert 0.1 <= f[np.argmax(green)] <= 0.22
  assert green.max() > 5 * green[0] and green.max() > 20 * high(green).mean()
  assert mid(purple).min() < 0.5 * high(purple).mean() and mid(purple).min() < 0.6 * purple[0]
  # The masks (top 25% of the noise) keep the shape of their noise's spectrum.
  red, blue, green, purple = (spectra[c + '_mask'][1] for c in ('red', 'blue', 'green', 'purple'))
  assert low(red).mean() > 5 * high(red).mean()
  assert high(blue).mean() > 1.5 * low(blue).mean()
  assert 0.1 <= f[np.argmax(green)] <= 0.22
  assert mid(purple).min() < 0.8 * min(purple[0], high(purple).mean())


def test_blocks_are_unions_of_rectangles_of_at_least_the_minimum_plus_random_fill():
  for grid, min_patches, ratio in (((14, 14), 16, 0.75), ((9, 13), 16, 0.6), ((4, 4), 4, 0.75)):
    rows, cols = grid
    keep = masking.num_keep(rows * cols, ratio)
    target = rows * cols - keep
    cfg = masking_cfg('block', ratio, block=dict(min_patches=min_patches))
    params = masking.strategy_params(cfg, 'block')
    rng = jax.random.key(7)
    pre, blocks = map(np.asarray, block.sample_blocks(rng, 32, grid, target, params))
    final = draw(cfg, grid, 32, seed=7)
    for b in range(32):
      union = np.zeros(grid, bool)
      for top, left, h, w in blocks[b][blocks[b, :, 2] > 0]:
        assert h * w >= min_patches and h < rows and w < cols, (grid, (top, left, h, w))
        assert 0.3 / 1.5 <= h / w <= 1.5 / 0.3   # log-uniform aspect in [0.3, 1/0.3], rounded
        assert top >= 0 and left >= 0 and top + h <= rows and left + w <= cols
        union[top:top + h, left:left + w] = True
      np.testing.assert_array_equal(union, pre[b])
      assert pre[b].sum() <= target                   # never overshoots ...
      assert (final[b] >= pre[b]).all()               # ... and the fill only adds patches
      assert final[b].sum() == target
    # The sampler usually reaches most of the target by itself (BEiT's behaviour).
    assert pre.sum((1, 2)).mean() > 0.6 * target, (grid, pre.sum((1, 2)))


def test_block_fill_is_random_among_the_unmasked_patches():
  # BEiT blocks on a 14x14 grid with 147 to mask often stop short: the fill makes up the rest,
  # uniformly over the patches outside the blocks (not, e.g., the last ones in patch order).
  cfg = masking_cfg('block', block=dict(min_patches=16))
  pre, _ = block.sample_blocks(jax.random.key(1), 64, (14, 14), 147,
                               masking.strategy_params(cfg, 'block'))
  pre, final = np.asarray(pre).reshape(64, -1), draw(cfg, (14, 14), 64, seed=1).reshape(64, -1)
  halves = np.zeros(2)
  for b in range(64):
    outside = np.flatnonzero(~pre[b])
    fill = final[b, outside]
    halves += fill[:len(outside) // 2].sum(), fill[len(outside) // 2:].sum()
  assert halves.sum() > 100 and 0.6 < halves[0] / halves[1] < 1.6, halves


@pytest.mark.parametrize('center', ['random', 'fixed'])
def test_radial_visible_sets_are_wedges_around_the_sampled_center(center):
  grid, n, batch = (14, 14), 12, 16
  cfg = masking_cfg('radial', radial=dict(num_sectors=n, center=center))
  params = masking.strategy_params(cfg, 'radial')
  geo = radial.sectors(jax.random.key(5), batch, grid, params)
  visible = 1 - draw(cfg, grid, batch, seed=5).reshape(batch, -1)
  y, x = np.meshgrid(np.arange(14) + 0.5, np.arange(14) + 0.5, indexing='ij')
  center_ = np.asarray(geo.center)
  if center == 'fixed':
    np.testing.assert_allclose(center_, 7.0)
  else:
    assert len(np.unique(center_[:, 0])) == batch
  for b in range(batch):
    angle = np.arctan2(y.ravel() - center_[b, 0], x.ravel() - center_[b, 1]) - float(geo.phase[b])
    wedge = np.floor(np.mod(angle, 2 * np.pi) / (2 * np.pi / n)).astype(int)
    sector = np.asarray(geo.sector[b])
    assert (wedge == sector).mean() > 0.97   # float rounding on wedge boundaries only
    partial = [s for s in np.unique(sector) if 0 < visible[b][sector == s].mean() < 1]
    assert len(partial) <= 1, (b, partial)   # whole wedges, plus part of one (exact ratio)


def test_radial_beta_keeps_the_center_or_the_periphery():
  grid = (14, 14)
  radius = {}
  for beta in (-1.0, 0.0, 1.0):
    cfg = masking_cfg('radial', radial=dict(center='fixed', beta=beta))
    visible = 1 - draw(cfg, grid, 64).reshape(64, -1)
    geo = radial.sectors(jax.random.key(0), 64, grid, masking.strategy_params(cfg, 'radial'))
    radius[beta] = (np.asarray(geo.radius) * visible).sum() / visible.sum()
  assert radius[1.0] < 0.92 * radius[0.0] and radius[0.0] < 0.92 * radius[-1.0], radius


def write_bank(path, patterns, key='arr_0'):
  np.savez(path, **{key: patterns})
  return str(path)


def test_bank_mode_crops_and_flips_each_sample_on_its_own(tmp_path):
  # Two patterns of distinct values: each score window identifies its pattern, offset and flips.
  patterns = np.random.default_rng(0).permutation(2 * 20 * 24).reshape(2, 20, 24).astype(np.float32)
  path = write_bank(tmp_path / 'green.npz', patterns)
  cfg = masking_cfg('colored_noise', colored_noise=dict(bank_path=path))
  params = masking.strategy_params(cfg, 'colored_noise')
  windows = -np.asarray(colored_noise.scores(jax.random.key(0), masking.MaskContext(32, (8, 8), 16),
                                              params)).reshape(32, 8, 8)
  where = {v: np.unravel_index(i, patterns.shape) for i, v in enumerate(patterns.ravel())}
  seen = set()
  for win in windows:
    idx, ys, xs = zip(*(where[v] for v in win.ravel()))
    assert len(set(idx)) == 1
    ys, xs = np.reshape(ys, (8, 8)), np.reshape(xs, (8, 8))
    flip_v, flip_h = ys[0, 0] > ys[-1, 0], xs[0, 0] > xs[0, -1]
    assert np.ptp(ys) == 7 and np.ptp(xs) == 7     # one contiguous 8x8 window
    seen.add((idx[0], ys.min(), xs.min(), flip_v, flip_h))
  assert len(seen) >= 28                             # per-sample pattern, offset and flips
  assert {s[0] for s in seen} == {0, 1} and {s[3] for s in seen} == {False, True} \
      and {s[4] for s in seen} == {False, True}
  mask = draw(cfg, (8, 8), 32).astype(bool)   # same key: the windows above; highest visible
  np.testing.assert_array_equal(mask.sum((1, 2)), 48)
  for win, m in zip(windows, mask):
    assert win[~m].min() > win[m].max()


def test_bank_schedule_reads_one_bank_per_color(tmp_path):
  for color, offset in (('green', 0.0), ('blue', 100.0)):
    write_bank(tmp_path / f'{color}.npz', offset + np.random.default_rng(1).random((3, 6, 6)))
  cfg = masking_cfg('colored_noise', colored_noise=dict(
      color='green:0,blue:10', bank_path=str(tmp_path / '{color}.npz')))
  params = masking.strategy_params(cfg, 'colored_noise')
  for step, lo in ((0, 0.0), (9, 0.0), (10, 100.0)):
    ctx = masking.MaskContext(8, (4, 4), 4, step=step)
    noise = -np.asarray(colored_noise.scores(jax.random.key(0), ctx, params))
    assert lo <= noise.min() and noise.max() < lo + 1, step


def demo_with(masking_overrides=None) -> ml_collections.ConfigDict:
  """The colormae demo config with {'section.key': value} set under config.masking."""
  cfg = config_lib.load(DEMO, 'method=colormae')
  for dotted, value in (masking_overrides or {}).items():
    *path, leaf = dotted.split('.')
    section = cfg.masking
    for p in path:
      section = section[p]
    section[leaf] = value
  return cfg


def test_bad_configs_name_the_key(tmp_path):
  np.save(tmp_path / 'single.npy', np.zeros((2, 8, 8)))
  flat = write_bank(tmp_path / 'flat.npz', np.zeros((8, 8)))
  tiny = write_bank(tmp_path / 'tiny.npz', np.zeros((5, 3, 8)))
  good = write_bank(tmp_path / 'good.npz', np.zeros((5, 8, 8)))
  noise = 'masking.colored_noise'
  cases = [
      ({'name': 'colored'}, r"masking.name='colored' is unknown.*'colored_noise'"),
      ({'colored_noise.color': 'pink'}, rf"{noise}.color='pink'.*not a noise color"),
      ({'colored_noise.color': 'green:0,pink:9'}, rf"{noise}.color=.*'pink' is not a noise"),
      ({'colored_noise.color': 'blue:5,green:9'}, rf'{noise}.color=.*start at step 0'),
      ({'colored_noise.sigma_low': -1.0}, rf'{noise}.sigma_low=-1.0 must be >= 0'),
      ({'colored_noise.sigma_high': -0.5}, rf'{noise}.sigma_high=-0.5 must be >= 0'),
      ({'colored_noise.sigma_high': 1.0}, rf'{noise}.sigma_high=1.0 must be smaller than '
                                          rf'{noise}.sigma_low=1.0: .*band'),
      ({'colored_noise.bank_path': str(tmp_path / 'no.npz')}, rf'{noise}.bank_path=.*no such file'),
      ({'colored_noise.bank_path': str(tmp_path / 'single.npy')},
       rf'{noise}.bank_path=.*not an .npz'),
      ({'colored_noise.bank_path': flat}, rf'{noise}.bank_path=.*\(N, H, W\); got shape \(8, 8\)'),
      ({'colored_noise.bank_path': tiny}, rf'{noise}.bank_path=.*at least the 4x4 patch grid'),
      ({'colored_noise.bank_path': good, 'colored_noise.bank_key': 'patterns'},
       rf"{noise}.bank_key='patterns' is not in .*arr_0"),
      ({'colored_noise.bank_path': good, 'colored_noise.color': 'green:0,red:5'},
       rf'{noise}.bank_path=.* is one file; put {{color}}'),
      ({'name': 'block', 'block.min_patches': 13},
       r'masking.block.min_patches=13 must be in \[1, the masked count 12\]'),
      ({'name': 'block', 'block.min_patches': 10},
       r'masking.block.min_patches=10: no block fits strictly inside the 4x4'),
      ({'name': 'radial', 'radial.num_sectors': 1}, r'masking.radial.num_sectors=1 must be >= 2'),
      ({'name': 'radial', 'radial.center': 'middle'}, r"masking.radial.center='middle' must be"),
  ]
  for overrides, message in cases:
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(demo_with(overrides))
  config_lib.validate(demo_with({'colored_noise.bank_path': good}))   # a good bank passes
  cfg = demo_with()
  cfg.masking.colored_noise.sigma_lo = 1.0
  with pytest.raises(config_lib.ConfigError, match=rf"'{noise}.sigma_lo'.*'sigma_low'"):
    config_lib.validate(cfg)


def test_demo_methods_and_visualize_writes_small_pngs(tmp_path):
  expected = {'mae': ('random', 'green'), 'colormae': ('colored_noise', 'green'),
              'colormae_red': ('colored_noise', 'red'), 'colormae_blue': ('colored_noise', 'blue'),
              'colormae_purple': ('colored_noise', 'purple'), 'blockmask': ('block', 'green'),
              'radial': ('radial', 'green')}
  for method, (name, color) in expected.items():
    cfg = config_lib.load(DEMO, f'method={method}')
    config_lib.validate(cfg)
    assert (cfg.masking.name, cfg.masking.colored_noise.color) == (name, color)
  cfg = demo_with({'name': 'all'})
  assert [v.label for v in mask_views.views(cfg)] == ['random', 'red', 'green', 'blue', 'purple',
                                                      'block', 'radial']
  cfg = demo_with({'colored_noise.color': 'green:0,blue:300'})
  assert [(v.label, v.step) for v in mask_views.views(cfg)] == [('green (step 0)', 0),
                                                                ('blue (step 300)', 300)]
  paths = mask_views.visualize(demo_with({'name': 'radial'}), str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['masks_radial.png', 'spectrum_radial.png']
  for path in paths:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(path) < 200_000
