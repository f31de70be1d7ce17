"""The resizes to Inception's 299x299 that FID references use, as explicit interpolation matrices.

A separable resize is `out = A_h @ img @ A_w^T` per channel, with A [out, in] built here in
float64 from each reference's formula for the source coordinate of output pixel i:

* 'tf_legacy': TF1 `tf.image.resize_bilinear(align_corners=False)` without half-pixel centres,
  src = i * in / out, neighbours floor(src) and floor(src) + 1 clamped to the edge. TTUR,
  clean-fid's `legacy_tensorflow` and NVIDIA's TorchScript Inception (inside its forward) resize
  this way; the images are then mapped to the network's input by (x - 128) / 128.
* 'torch_bilinear': pytorch-fid's `F.interpolate(bilinear, align_corners=False)`,
  src = (i + 0.5) * in / out - 0.5 clamped at 0; input x / 127.5 - 1 (its 2 x - 1 on [0, 1]).
* 'pil_bicubic': clean-fid's 'clean' mode, PIL's bicubic (a = -0.5) resize of float images,
  which widens the kernel by in / out when shrinking (antialiasing); input (x - 128) / 128.

Images are quantised to uint8 before any of these (the samples are what is saved).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

RESIZE_MODES = ('tf_legacy', 'torch_bilinear', 'pil_bicubic')
INCEPTION_SIZE = 299


def _linear_matrix(src: np.ndarray, in_size: int) -> np.ndarray:
  """Bilinear weights [out, in] for source coordinates `src` (already clamped below at 0)."""
  out = np.zeros((src.shape[0], in_size), np.float64)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  rows = np.arange(src.shape[0])
  np.add.at(out, (rows, lo), 1.0 - frac)
  np.add.at(out, (rows, hi), frac)
  return out


def tf_legacy_matrix(in_size: int, out_size: int) -> np.ndarray:
  """TF1 resize_bilinear(align_corners=False, half_pixel_centers=False): src = i * in / out."""
  return _linear_matrix(np.arange(out_size) * (in_size / out_size), in_size)


def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """F.interpolate(mode='bilinear', align_corners=False): src = max((i + .5) in/out - .5, 0)."""
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  return _linear_matrix(np.maximum(src, 0.0), in_size)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """PIL's BICUBIC resize: kernel support 2 * max(in/out, 1) around (i + .5) in/out, normalised."""
  scale = in_size / out_size
  filter_scale = max(scale, 1.0)
  support = 2.0 * filter_scale
  out = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    weights = _bicubic((np.arange(lo, hi) - center + 0.5) / filter_scale)
    total = weights.sum()
    out[i, lo:hi] = weights / total if total else weights
  return out


def resize_matrix(mode: str, in_size: int, out_size: int = INCEPTION_SIZE) -> np.ndarray:
  """The [out_size, in_size] interpolation matrix of `mode` (one of RESIZE_MODES)."""
  builders = {'tf_legacy': tf_legacy_matrix, 'torch_bilinear': torch_bilinear_matrix,
              'pil_bicubic': pil_bicubic_matrix}
  if mode not in builders:
    raise ValueError(f'eval.fid_resize={mode!r} is unknown; use one of {RESIZE_MODES}.')
  return builders[mode](in_size, out_size)


def input_scale_shift(mode: str) -> Tuple[float, float]:
  """(scale, shift) with network input = pixel * scale + shift for pixels in [0, 255]."""
  if mode == 'torch_bilinear':
    return 1.0 / 127.5, -1.0
  return 1.0 / 128.0, -1.0
