"""`--mode=visualize`: masks drawn by the configured strategies on real images, and their spectra.

Writes under W/visualize/:
  masks_<name>.png     a row of the eval split's first images, then one row per strategy (or per
                       scheduled noise color) with the masked patches grey
  spectrum_<name>.png  each row's radially averaged power spectrum of the visible-patch indicator
                       over many masks (white / random masking is flat)
  reconstructions_<label>.png  with `init_from` (weights with a decoder): original / masked /
                       reconstruction / reconstruction with the visible patches pasted, per row
                       (mim/evaluate/recon_views.py; the model and its size come from the weights)
With `masking.name='all'`, every strategy that needs no signals from a model is a row, and
colored_noise one row per color (generated noise with the configured sigmas; random is white).
The images are `visualize.images` (any image files) or the eval split's first ones.
"""
import io
import os
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from mim import config as config_lib
from mim import masking
from mim import paths
from mim.evaluate import recon_views
from mim.masks import colored_noise
from mim.models import mae
from mim.patches import unpatchify

_SPECTRUM_MASKS = 1024  # masks per spectrum
_ALL_COLORS = ('red', 'green', 'blue', 'purple')


class View(NamedTuple):
  label: str
  cfg: ml_collections.ConfigDict   # a validated config with this row's masking
  step: int = 0                    # the train step to mask at (a scheduled color's first step)


def views(cfg: ml_collections.ConfigDict) -> list[View]:
  """The rows to draw, each a validated copy of `cfg` with its masking and the step to mask at."""
  def variant(name: str, **noise) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.masking.name = name
    c.masking.colored_noise.update(noise)
    config_lib.validate(c)
    return c

  if cfg.masking.name != 'all':
    if cfg.masking.name != 'colored_noise':
      return [View(cfg.masking.name, variant(cfg.masking.name))]
    schedule = colored_noise.parse_schedule(cfg.masking.colored_noise.color)
    return [View(f'{color}' + (f' (step {start})' if len(schedule) > 1 else ''),
                 variant('colored_noise'), start) for start, color in schedule]
  rows = []
  for name, strategy in masking.STRATEGIES.items():
    if strategy.needs:  # teacher-driven: masks come from a model's outputs
      continue
    if name == 'colored_noise':
      rows += [View(color, variant(name, color=color, bank_path='')) for color in _ALL_COLORS]
    else:
      rows.append(View(name, variant(name)))
  return rows


def draw(view: View, batch_size: int, seed: int = 0) -> np.ndarray:
  """(batch_size, rows, cols) masks, 1 = masked, of `view` at its step."""
  grid = mae.spec_from_config(view.cfg.model).grid
  masker = masking.make_masker(view.cfg.masking, grid, max(view.cfg.total_steps, 1))
  m = jax.jit(masker, static_argnums=1)(jax.random.key(seed), batch_size, view.step)
  return np.asarray(m.mask).reshape(batch_size, *grid)


def radial_spectrum(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(frequencies in cycles per patch, mean power) of (N, H, W) fields, each centered, averaged
  over the samples and over rings of width 1 / max(H, W). White noise gives a flat spectrum."""
  n, h, w = fields.shape
  x = fields - fields.mean(axis=(1, 2), keepdims=True)
  power = (np.abs(np.fft.fft2(x)) ** 2).mean(0) / (h * w)
  fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing='ij')
  ring = np.round(np.hypot(fy, fx) * max(h, w)).astype(int).ravel()
  total = np.bincount(ring, power.ravel())
  count = np.bincount(ring)
  keep = count > 0
  keep[0] = False  # DC: zero after centering
  return np.flatnonzero(keep) / max(h, w), total[keep] / count[keep]


def masked_images(images: np.ndarray, mask: np.ndarray, patch_size: int, mean, std) -> np.ndarray:
  """uint8 (B, H, W, 3) images with the masked patches mid-grey."""
  b, h, w, c = images.shape
  rgb = np.clip(images * np.asarray(std) + np.asarray(mean), 0, 1)
  grid = (h // patch_size, w // patch_size)
  pixel = unpatchify(np.repeat(mask.reshape(b, -1, 1), patch_size * patch_size * c, -1),
                     patch_size, grid, c)
  return np.round(np.where(pixel > 0, 0.5, rgb) * 255).astype(np.uint8)


def _save_figure(fig, path: str) -> None:
  """`fig` as a PNG at `path` (local or gs://), then closed."""
  from matplotlib import pyplot as plt
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=80)
  plt.close(fig)
  paths.write_bytes(path, buffer.getvalue())


def save_mask_grid(path: str, images: np.ndarray, rows: list[tuple[str, np.ndarray]],
                   patch_size: int, mean, std) -> None:
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  cols = len(images)
  fig, axes = plt.subplots(len(rows) + 1, cols, figsize=(1.1 * cols + 0.9, 1.1 * len(rows) + 1.1),
                           squeeze=False)
  originals = masked_images(images, np.zeros_like(rows[0][1]), patch_size, mean, std)
  for r, (label, mask) in enumerate([('image', None)] + rows):
    shown = originals if mask is None else masked_images(images, mask, patch_size, mean, std)
    for j in range(cols):
      ax = axes[r, j]
      ax.imshow(shown[j], interpolation='nearest')
      ax.set_xticks([]), ax.set_yticks([])
    axes[r, 0].set_ylabel(label, rotation=0, ha='right', va='center', fontsize=9)
  fig.tight_layout(pad=0.3)
  _save_figure(fig, path)


def save_spectrum_plot(path: str, curves: list[tuple[str, np.ndarray, np.ndarray]], title: str
                       ) -> None:
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for label, freq, power in curves:
    ax.plot(freq, power, marker='o', markersize=3, label=label)
  ax.set_yscale('log')
  ax.set_xlabel('radial frequency (cycles per patch)')
  ax.set_ylabel('power (white = flat)')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  _save_figure(fig, path)


def visualize(cfg: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Writes the mask grid and the spectrum plot under `workdir`/visualize, and with init_from the
  reconstructions; returns their paths."""
  params = None
  if cfg.init_from:  # the model (and its grid) of the weights
    cfg, params, norm_pix_source = recon_views.load_weights(cfg)
    print(f'Reconstructions by {cfg.init_from} (ViT {cfg.model.width}x{cfg.model.depth}, patch '
          f'{cfg.model.patch_size}, {cfg.model.image_size} px; norm_pix={cfg.targets.norm_pix} '
          f'from {norm_pix_source}).', flush=True)
  rows = views(cfg)
  spec = mae.spec_from_config(cfg.model)
  images = recon_views.load_images(cfg, spec.image_size)
  out = os.path.join(workdir, 'visualize')
  paths.makedirs(out)
  name = cfg.masking.name
  # Teacher-driven masks depend on a model's outputs for each image: only reconstructions show them.
  drawn = [v for v in rows if not masking.get_strategy(v.cfg.masking.name).needs]
  if not drawn and params is None:
    raise config_lib.ConfigError(
        f'masking.name={name!r} masks by a model\'s outputs: give --config.init_from=W_OR_WEIGHTS '
        'to draw its reconstructions.')
  written = []
  if drawn:
    masks = [draw(v, _SPECTRUM_MASKS, cfg.seed) for v in drawn]   # the grid shows the first few
    masks_path = os.path.join(out, f'masks_{name}.png')
    save_mask_grid(masks_path, images, [(v.label, m[:len(images)]) for v, m in zip(drawn, masks)],
                   spec.patch_size, cfg.data.mean, cfg.data.std)
    curves = [(v.label, *radial_spectrum(1.0 - m)) for v, m in zip(drawn, masks)]
    spectrum_path = os.path.join(out, f'spectrum_{name}.png')
    save_spectrum_plot(spectrum_path, curves,
                       f'visible patches, {_SPECTRUM_MASKS} masks on the {spec.grid[0]}x'
                       f'{spec.grid[1]} grid, ratio {cfg.masking.ratio}')
    written += [masks_path, spectrum_path]
  if params is not None:
    written += recon_views.save_reconstructions(rows, params, images, out, cfg.seed)
  return written
