"""Fine-tuning augmentation on the host, as MAE's recipe (timm create_transform): RandAugment
'rand-m9-mstd0.5-inc1' on the uint8 image, random erasing (probability 0.25, mode 'pixel', one
box) on the normalized one. Both are functions of a numpy Generator: seeded, reproducible."""
import math
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from data import transforms


def random_erasing(image: np.ndarray, rng: np.random.Generator, *, probability: float = 0.25,
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   attempts: int = 10) -> np.ndarray:
  """With `probability`, one box of area U(min_area, max_area) x H x W and log-uniform aspect in
  [min_aspect, 1 / min_aspect] is filled with N(0, 1) noise per pixel and channel (the image is
  already normalized); up to `attempts` draws until a box fits. Returns a new array."""
  if rng.random() >= probability:
    return image
  height, width, channels = image.shape
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  for _ in range(attempts):
    area = height * width * rng.uniform(min_area, max_area)
    aspect = math.exp(rng.uniform(*log_aspect))
    h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if h < height and w < width:
      top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
      out = image.copy()
      out[top:top + h, left:left + w] = rng.standard_normal((h, w, channels)).astype(image.dtype)
      return out
  return image


# RandAugment 'rand-m9-mstd0.5-inc1' (timm, as MAE fine-tuning uses it): 2 ops per image drawn
# uniformly with replacement from the 15 below, each applied with probability 0.5 at a magnitude
# drawn from N(9, 0.5) clipped to [0, 10]; the 'increasing' variants get stronger with magnitude.
# Geometric ops fill with the ImageNet mean colour and resample bicubically.
_MAX_LEVEL = 10.0
_FILL = (124, 116, 104)


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(img, matrix):
  return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BICUBIC,
                       fillcolor=_FILL)


def _solarize_add(img, add: int, threshold: int = 128):
  x = np.asarray(img).astype(np.int32)
  return Image.fromarray(np.where(x < threshold, np.minimum(x + add, 255), x).astype(np.uint8))


def _posterize(img, bits: int):
  # 0 bits (magnitude 10) keeps nothing: black, as older PIL computed it (newer PIL refuses).
  return ImageOps.posterize(img, bits) if bits > 0 else Image.new(img.mode, img.size)


def _enhance(kind):
  return lambda img, level, rng: kind(img).enhance(1.0 + _signed(level * 0.9, rng))


_OPS = {
    'AutoContrast': lambda img, level, rng: ImageOps.autocontrast(img),
    'Equalize': lambda img, level, rng: ImageOps.equalize(img),
    'Invert': lambda img, level, rng: ImageOps.invert(img),
    'Rotate': lambda img, level, rng: img.rotate(_signed(level * 30.0, rng),
                                                 Image.Resampling.BICUBIC, fillcolor=_FILL),
    'PosterizeIncreasing': lambda img, level, rng: _posterize(img, 4 - int(level * 4)),
    'SolarizeIncreasing': lambda img, level, rng: ImageOps.solarize(img, 256 - int(level * 256)),
    'SolarizeAdd': lambda img, level, rng: _solarize_add(img, int(level * 110)),
    'ColorIncreasing': _enhance(ImageEnhance.Color),
    'ContrastIncreasing': _enhance(ImageEnhance.Contrast),
    'BrightnessIncreasing': _enhance(ImageEnhance.Brightness),
    'SharpnessIncreasing': _enhance(ImageEnhance.Sharpness),
    'ShearX': lambda img, level, rng: _affine(img, (1, _signed(level * 0.3, rng), 0, 0, 1, 0)),
    'ShearY': lambda img, level, rng: _affine(img, (1, 0, 0, _signed(level * 0.3, rng), 1, 0)),
    'TranslateXRel': lambda img, level, rng: _affine(
        img, (1, 0, _signed(level * 0.45, rng) * img.size[0], 0, 1, 0)),
    'TranslateYRel': lambda img, level, rng: _affine(
        img, (1, 0, 0, 0, 1, _signed(level * 0.45, rng) * img.size[1])),
}
RAND_AUGMENT_OPS = tuple(_OPS)


def rand_augment(image: np.ndarray, rng: np.random.Generator, *, num_ops: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5,
                 probability: float = 0.5) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8 (H, W, 3): RandAugment(num_ops, magnitude) with magnitude noise."""
  img = Image.fromarray(image)
  for name in rng.choice(RAND_AUGMENT_OPS, size=num_ops):
    if rng.random() >= probability:
      continue
    m = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
    m = min(_MAX_LEVEL, max(0.0, m))
    img = _OPS[name](img, m / _MAX_LEVEL, rng)
  return np.asarray(img)


class FinetuneAugment(grain.transforms.RandomMap):
  """One cropped uint8 example -> RandAugment -> normalized float32 -> random erasing (timm's
  order). Seeded per example like the crop (data/pipeline.py), so the stream does not depend on
  the process count."""

  def __init__(self, mean: Sequence[float], std: Sequence[float], *, num_ops: int = 2,
               magnitude: float = 9.0, magnitude_std: float = 0.5, erasing: float = 0.25):
    self.mean, self.std = tuple(mean), tuple(std)
    self.num_ops, self.magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
    self.erasing = erasing

  def random_map(self, element, rng: np.random.Generator):
    image = element['image']
    if self.num_ops:
      image = rand_augment(image, rng, num_ops=self.num_ops, magnitude=self.magnitude,
                           magnitude_std=self.magnitude_std)
    image = transforms.normalize(image, self.mean, self.std)
    if self.erasing:
      image = random_erasing(image, rng, probability=self.erasing)
    return {**element, 'image': image}
