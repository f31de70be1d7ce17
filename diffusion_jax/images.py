"""Image helpers: [-1, 1] floats to uint8, sample grids, PNG and animated GIF (local or gs://)."""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence, Union

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps images in [-1, 1] to uint8 [0, 255] by round((x + 1) * 127.5), clipping outside values."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


LABEL_FONT_PX = 14  # Text height of grid labels (PIL's default font, scalable since Pillow 10.1).
LABEL_MARGIN = 4    # Pixels of background around a label's text inside its band.


def _label_font(size: int):
  """PIL's built-in font at `size` pixels (a fixed-size bitmap font where FreeType is absent)."""
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: load_default takes no size.
    return ImageFont.load_default()


def label_band_height(size: int = LABEL_FONT_PX) -> int:
  """Rows of the band `make_grid(..., label=...)` adds below the tiles: text height + margins."""
  _, _, _, bottom = _label_font(size).getbbox('Ag|')  # Ascender to descender.
  return int(bottom) + 2 * LABEL_MARGIN


def make_grid(images: np.ndarray, ncols: int = 0, padding: int = 2, upscale: int = 1,
              pad_value: int = 255, label: str = '') -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [u*(rows*(H+p)+p) (+ band), u*(cols*(W+p)+p), C].

  As torchvision's make_grid: each image gets a border of `padding` pixels of `pad_value`
  before the whole grid is upscaled by the integer `upscale` (nearest neighbour), so an 8x8
  digit becomes a u*8 block of equal pixels and the gutters grow with it: tile i (row-major,
  `ncols` per row, default ceil(sqrt(N))) sits at rows u*(p + r*(H+p)) and columns
  u*(p + c*(W+p)). Empty cells of the last row stay `pad_value`.

  A non-empty `label` (e.g. 'step 3000, ddim 100 steps, EMA') is drawn in PIL's default font
  in a band of `label_band_height()` rows below the tiles (background `pad_value`, text black
  on a light background, white on a dark one; a smaller font when the grid is narrow); the rows
  above the band are exactly the unlabelled grid.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'make_grid expects images [N, H, W, C]; got shape {images.shape}.')
  if padding < 0 or int(upscale) != upscale or upscale < 1 or not 0 <= pad_value <= 255:
    raise ValueError(f'make_grid needs padding >= 0, an integer upscale >= 1 and pad_value in '
                     f'[0, 255]; got padding={padding}, upscale={upscale}, '
                     f'pad_value={pad_value}.')
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value,
                 images.dtype)
  for i, image in enumerate(images):
    r, col = divmod(i, ncols)
    top, left = padding + r * (h + padding), padding + col * (w + padding)
    grid[top:top + h, left:left + w] = image
  if upscale > 1:
    grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
  if label:
    grid = np.concatenate([grid, _label_band(label, grid.shape[1], c, pad_value, grid.dtype)])
  return grid


def _label_band(label: str, width: int, channels: int, background: int,
                dtype: np.dtype) -> np.ndarray:
  """[label_band_height(), width, channels] of `background` with `label` written on it, in
  the largest font size up to LABEL_FONT_PX (down to 6) that fits the width between margins."""
  band = Image.new('L', (width, label_band_height()), int(background))
  draw = ImageDraw.Draw(band)
  for size in range(LABEL_FONT_PX, 5, -1):
    font = _label_font(size)
    if draw.textlength(label, font=font) <= width - 2 * LABEL_MARGIN:
      break
  draw.text((LABEL_MARGIN, LABEL_MARGIN), label, font=font, fill=0 if background >= 128 else 255)
  return np.repeat(np.asarray(band, dtype)[..., None], channels, axis=-1)


def grid_label(step: int, sampler: str, steps: int, ema: Union[bool, str] = True,
               guidance_scale: Optional[float] = None,
               classifier_scale: Optional[float] = None) -> str:
  """The caption of a sample grid: 'step 3000, ddim 100 steps, EMA[, guidance 3][, classifier
  guidance 1]' (classifier-free, then classifier guidance scale).

  `ema`: False (raw parameters), True (the primary EMA) or the name of another EMA
  (`sample.ema`, e.g. 'posthoc:0.08' -> 'EMA posthoc:0.08').
  """
  ema_part = [] if not ema else ['EMA' if ema is True else f'EMA {ema}']
  parts = [f'step {step}', f'{sampler} {steps} steps'] + ema_part
  if guidance_scale is not None:
    parts.append(f'guidance {guidance_scale:g}')
  if classifier_scale:
    parts.append(f'classifier guidance {classifier_scale:g}')
  return ', '.join(parts)


CURVE_SIZE = (640, 360)  # (width, height) of plot_curve's image: loss_curve.png.
CURVE_MARGINS = (72, 16, 30, 30)  # Left (y tick labels), right, top (title), bottom (x labels).
CURVE_COLOR = (31, 119, 180)
_AXIS_GRAY, _GRID_GRAY = 96, 225


def curve_pixels(x: np.ndarray, y: np.ndarray, size: Sequence[int] = CURVE_SIZE,
                 log_y: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
  """Pixel columns and rows [N] (floats) of the points (x, y) in `plot_curve`'s plot area.

  x spans the area's width from min(x) to max(x); y (log10 of it when `log_y` and every finite
  y > 0) spans its height from the largest value at the top to the smallest at the bottom,
  with 5% headroom either side. Non-finite points get NaN. Also returns the axis ranges
  {'x': (lo, hi), 'y': (lo, hi) (transformed), 'log_y': bool}.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  width, height = size
  left, right, top, bottom = CURVE_MARGINS
  finite = np.isfinite(x) & np.isfinite(y)
  log_y = bool(log_y and np.any(finite) and np.all(y[finite] > 0))
  with np.errstate(divide='ignore', invalid='ignore'):
    ty = np.log10(y) if log_y else y.copy()
  ty[~finite] = np.nan
  x_lo, x_hi, y_lo, y_hi = 0.0, 1.0, 0.0, 1.0
  if np.any(finite):
    x_lo, x_hi = float(np.min(x[finite])), float(np.max(x[finite]))
    y_lo, y_hi = float(np.min(ty[finite])), float(np.max(ty[finite]))
  if x_hi == x_lo:
    x_lo, x_hi = x_lo - 1, x_hi + 1
  span = y_hi - y_lo or max(abs(y_hi), 1.0)
  y_lo, y_hi = y_lo - 0.05 * span, y_hi + 0.05 * span
  cols = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right - 1)
  rows = top + (y_hi - ty) / (y_hi - y_lo) * (height - top - bottom - 1)
  cols[~finite] = np.nan
  return cols, rows, {'x': (x_lo, x_hi), 'y': (y_lo, y_hi), 'log_y': log_y}


def _draw_text(draw: ImageDraw.ImageDraw, xy: Sequence[float], text: str, font,
               anchor: str) -> None:
  """Black `text` placed by a two-letter anchor ('l'/'m'/'r' then 'a' top / 'm' middle),
  computed from the text's box, so PIL's bitmap fallback font (no anchor support) works too."""
  x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
  x = xy[0] - {'l': x0, 'm': (x0 + x1) / 2, 'r': x1}[anchor[0]]
  y = xy[1] - {'a': y0, 'm': (y0 + y1) / 2}[anchor[1]]
  draw.text((x, y), text, font=font, fill=(0, 0, 0))


def plot_curve(x: np.ndarray, y: np.ndarray, title: str = '', size: Sequence[int] = CURVE_SIZE,
               log_y: bool = True) -> np.ndarray:
  """A line plot of y against x as uint8 RGB [height, width, 3], drawn with PIL (no matplotlib).

  The points are placed by `curve_pixels` and joined by a 2-pixel line (broken at non-finite
  points); 5 labelled ticks on each axis (y in its own units even on the log scale) with light
  grid lines, and `title` above. E.g. the training loss against the step (loss_curve.png).
  """
  width, height = size
  left, right, top, bottom = CURVE_MARGINS
  cols, rows, ranges = curve_pixels(x, y, size, log_y)
  pil = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(pil)
  font = _label_font(12)
  x0, x1, y0, y1 = left, width - right - 1, top, height - bottom - 1
  for i in range(5):
    frac = i / 4
    row = y1 - frac * (y1 - y0)
    value = ranges['y'][0] + frac * (ranges['y'][1] - ranges['y'][0])
    value = 10.0 ** value if ranges['log_y'] else value
    draw.line([(x0, row), (x1, row)], fill=(_GRID_GRAY,) * 3)
    _draw_text(draw, (x0 - 6, row), f'{value:.3g}', font, 'rm')
    col = x0 + frac * (x1 - x0)
    step = ranges['x'][0] + frac * (ranges['x'][1] - ranges['x'][0])
    _draw_text(draw, (col, y1 + 6), f'{step:.6g}', font, 'ma')
  draw.rectangle([x0, y0, x1, y1], outline=(_AXIS_GRAY,) * 3)
  if title:
    _draw_text(draw, (x0, top // 2), title, _label_font(LABEL_FONT_PX), 'lm')
  segment: list = []
  for col, row in list(zip(cols, rows)) + [(np.nan, np.nan)]:
    if np.isfinite(col) and np.isfinite(row):
      segment.append((float(col), float(row)))
      continue
    if len(segment) == 1:
      (c, r), = segment
      draw.ellipse([c - 2, r - 2, c + 2, r + 2], fill=CURVE_COLOR)
    elif segment:
      draw.line(segment, fill=CURVE_COLOR, width=2, joint='curve')
    segment = []
  return np.asarray(pil)


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
