"""Image transforms: random resized crop + flip (train), resize + center crop (eval), normalize."""
import math
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

EVAL_CROP_FRACTION = 0.875  # Resize the shorter side to size / 0.875, then center-crop size.


def crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop's (top, left, crop_height, crop_width)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  # No luck (very elongated image): the whole image, center-cropped to the nearest allowed aspect.
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif aspect > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCrop(grain.transforms.RandomMap):
  """Random crop resized (PIL bicubic) to size x size, then a random horizontal flip if `flip`."""

  def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], flip: bool):
    self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip

  def random_map(self, element, rng: np.random.Generator):
    image = element['image']
    top, left, h, w = crop_box(*image.shape[:2], self.scale, self.ratio, rng)
    # One PIL call crops and resizes (with antialiasing when shrinking).
    out = Image.fromarray(image).resize((self.size, self.size), Image.Resampling.BICUBIC,
                                        box=(left, top, left + w, top + h))
    if self.flip and rng.random() < 0.5:
      out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return {**element, 'image': np.asarray(out)}


class EvalResize(grain.transforms.Map):
  """Deterministic eval view; see `eval_resize`."""

  def __init__(self, size: int):
    self.size = size

  def map(self, element):
    return {**element, 'image': eval_resize(element['image'], self.size)}


def eval_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Resize shorter side to size / 0.875 (bicubic) and center-crop size x size; images no bigger
  than size (CIFAR, digits) are just resized to size x size."""
  height, width = image.shape[:2]
  if height <= size and width <= size:
    box = (0, 0, width, height)
  else:
    # The center crop expressed in input pixels, so that one bicubic resize does both steps.
    side = min(height, width) * EVAL_CROP_FRACTION
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC, box=box))


class Normalize(grain.transforms.Map):
  """uint8 'image' (of a batch, to vectorize) -> float32 (x / 255 - mean) / std."""

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    self.mean, self.std = tuple(mean), tuple(std)

  def map(self, element):
    return {**element, 'image': normalize(element['image'], self.mean, self.std)}


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [..., W, 3] -> float32 (x / 255 - mean) / std."""
  std = np.asarray(std, np.float64)
  # Per-channel constants tiled along a whole image row: numpy then runs long contiguous loops
  # instead of length-3 broadcasts (5x faster).
  width = images.shape[-2]
  scale = np.tile(1 / (255 * std), width).astype(np.float32)
  offset = np.tile(-np.asarray(mean, np.float64) / std, width).astype(np.float32)
  rows = images.astype(np.float32).reshape(*images.shape[:-2], -1)
  rows *= scale
  rows += offset
  return rows.reshape(images.shape)
