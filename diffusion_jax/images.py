"""Image helpers: [-1, 1] floats to uint8, sample grids, and PNG files (local or gs://)."""

from __future__ import annotations

import io
import math

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps images in [-1, 1] to uint8 [0, 255] by round((x + 1) * 127.5), clipping outside values."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int = 0, padding: int = 1, upscale: int = 1) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*(H+p)+p, cols*(W+p)+p, C] image.

  `upscale` repeats pixels (nearest neighbour) so that tiny images such as 8x8 digits stay
  visible in a viewer.
  """
  images = np.asarray(images)
  if upscale > 1:
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), 255,
                 images.dtype)
  for i, image in enumerate(images):
    r, col = divmod(i, ncols)
    top, left = padding + r * (h + padding), padding + col * (w + padding)
    grid[top:top + h, left:left + w] = image
  return grid


def write_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 1|3] image as PNG to a local or remote path."""
  image = np.asarray(image)
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buffer = io.BytesIO()
  pil.save(buffer, format='PNG')
  epath.Path(path).write_bytes(buffer.getvalue())
