"""Image helpers: [-1, 1] floats to uint8, sample grids, PNG and animated GIF (local or gs://)."""

from __future__ import annotations

import io
import math
from typing import Sequence, Union

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps images in [-1, 1] to uint8 [0, 255] by round((x + 1) * 127.5), clipping outside values."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int = 0, padding: int = 2, upscale: int = 1) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [u*(rows*(H+p)+p), u*(cols*(W+p)+p), C] image.

  Each image is framed by `padding` white pixels first and the whole grid is then upscaled by
  `upscale` (nearest neighbour), so tiny images such as 8x8 digits stay visible in a viewer and
  the gutters between them grow with them (as torchvision's make_grid pads before any resize).
  """
  images = np.asarray(images)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), 255,
                 images.dtype)
  for i, image in enumerate(images):
    r, col = divmod(i, ncols)
    top, left = padding + r * (h + padding), padding + col * (w + padding)
    grid[top:top + h, left:left + w] = image
  if upscale > 1:
    grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
  return grid


def write_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 1|3] image as PNG to a local or remote path."""
  image = np.asarray(image)
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buffer = io.BytesIO()
  pil.save(buffer, format='PNG')
  epath.Path(path).write_bytes(buffer.getvalue())


FRAME_GAP = 4  # White columns between the x_t grid and the x0 grid of an animation frame.
PROGRESS_BAR = 3  # Rows at the bottom of a frame showing how far sampling has got.


def animation_frame(x_t: np.ndarray, x0: np.ndarray, progress: float, ncols: int = 0,
                    upscale: int = 1) -> np.ndarray:
  """One animation frame: the grid of uint8 x_t [N,H,W,C] beside that of the predicted x0.

  Below them a progress bar is black over the first `progress` (in [0, 1]) of the width.
  Returns uint8 [H', W', C].
  """
  left = make_grid(x_t, ncols=ncols, upscale=upscale)
  right = make_grid(x0, ncols=ncols, upscale=upscale)
  h, w, c = left.shape
  frame = np.full((h + PROGRESS_BAR, 2 * w + FRAME_GAP, c), 255, np.uint8)
  frame[:h, :w] = left
  frame[:h, w + FRAME_GAP:] = right
  filled = int(round(float(np.clip(progress, 0.0, 1.0)) * frame.shape[1]))
  frame[h:, :filled] = 0
  return frame


def write_gif(path: str, frames: Sequence[np.ndarray],
              duration_ms: Union[int, Sequence[int]] = 100) -> None:
  """Writes uint8 frames [H, W, 1|3] (all the same size) as a looping animated GIF.

  `duration_ms` is one display time for every frame or one per frame. GIF keeps consecutive
  identical frames as one (with their durations added).
  """
  if not frames:
    raise ValueError('write_gif needs at least one frame.')
  pils = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f)
          for f in (np.asarray(f, np.uint8) for f in frames)]
  durations = duration_ms if isinstance(duration_ms, int) else [int(d) for d in duration_ms]
  buffer = io.BytesIO()
  pils[0].save(buffer, format='GIF', save_all=True, append_images=pils[1:], loop=0,
               duration=durations)
  epath.Path(path).write_bytes(buffer.getvalue())
