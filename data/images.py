"""Robust image decoding: any file PIL can read, in any mode, to RGB uint8."""
import numpy as np
from PIL import Image


def decode(path: str) -> np.ndarray:
  """Decodes an image file to an (H, W, 3) uint8 RGB array; raises on unreadable files.

  Images with more than PIL's `Image.MAX_IMAGE_PIXELS` pixels (89.5M by default) are refused before
  decoding: they are almost always decompression bombs or scans that would eat the workers' RAM.
  """
  with Image.open(path) as img:
    limit = Image.MAX_IMAGE_PIXELS  # None disables the check, as in PIL.
    if limit and img.width * img.height > limit:
      raise ValueError(f'{img.width}x{img.height} image exceeds Image.MAX_IMAGE_PIXELS={limit}')
    return np.asarray(to_rgb(img))


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode to RGB: transparency over white, 16-bit and float to 8-bit."""
  if img.mode == 'RGB':
    return img
  if img.mode.startswith('I'):
    # 16-bit greys (PNG/TIFF open as I;16* or I): map 0..65535 to 0..255, not PIL's clipping at 255.
    x = np.asarray(img, dtype=np.float32).clip(0, 65535) / 257.0
    return _grey(np.rint(x).astype(np.uint8))
  if img.mode == 'F':
    # Float images are taken as [0, 1] intensities.
    return _grey(np.rint(np.asarray(img).clip(0, 1) * 255).astype(np.uint8))
  if img.mode == 'P':
    img = img.convert('RGBA')  # A palette may carry a transparent colour.
  if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = img.convert('RGBA')
    white = Image.new('RGBA', img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  return img.convert('RGB')  # L, 1, CMYK (PIL undoes Adobe's inverted CMYK JPEGs), YCbCr, LAB, HSV.


def _grey(x: np.ndarray) -> Image.Image:
  return Image.fromarray(x, 'L').convert('RGB')
