"""Sample grids (padding, nearest upscale, labels) and the loss-curve plot."""

import numpy as np
import pytest

from diffusion_jax import images


def test_grid_pads_before_upscaling():
  rng = np.random.default_rng(0)
  tiles = rng.integers(0, 200, size=(5, 8, 8, 1), dtype=np.uint8)  # 200 < 255: gutters stand out.
  grid = images.make_grid(tiles, ncols=3, padding=2, upscale=4)
  assert grid.shape == (4 * (2 * 10 + 2), 4 * (3 * 10 + 2), 1)
  for i, tile in enumerate(tiles):
    r, c = divmod(i, 3)
    top, left = 4 * (2 + 10 * r), 4 * (2 + 10 * c)
    block = grid[top:top + 32, left:left + 32]
    np.testing.assert_array_equal(block, tile.repeat(4, 0).repeat(4, 1))
    # The 8-pixel white frame (2 pixels before upscaling) to the left of and above each image.
    assert np.all(grid[top - 8:top, left:left + 32] == 255)
    assert np.all(grid[top:top + 32, left - 8:left] == 255)
  assert np.all(grid[4 * 12:, 4 * 22:] == 255)  # The empty sixth cell stays white.
  # to_uint8 maps [-1, 1] to the 256 levels by round((x + 1) * 127.5).
  np.testing.assert_array_equal(images.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])


def test_grid_pad_value_offsets_and_errors():
  """Every tile is the nearest-upscaled image at u*(p + r*(H+p)), u*(p + c*(W+p)); every other
  pixel is pad_value (here black, as torchvision's default), also for RGB images."""
  rng = np.random.default_rng(1)
  tiles = rng.integers(1, 256, size=(7, 6, 5, 3), dtype=np.uint8)  # >= 1: padding (0) stands out.
  u, p = 3, 1
  grid = images.make_grid(tiles, ncols=4, padding=p, upscale=u, pad_value=0)
  assert grid.shape == (u * (2 * (6 + p) + p), u * (4 * (5 + p) + p), 3)
  is_tile = np.zeros(grid.shape[:2], bool)
  for i, tile in enumerate(tiles):
    r, c = divmod(i, 4)
    top, left = u * (p + r * (6 + p)), u * (p + c * (5 + p))
    np.testing.assert_array_equal(grid[top:top + 6 * u, left:left + 5 * u],
                                  np.kron(tile, np.ones((u, u, 1), np.uint8)))
    is_tile[top:top + 6 * u, left:left + 5 * u] = True
  assert is_tile.sum() == 7 * 6 * 5 * u * u
  assert np.all(grid[~is_tile] == 0)  # Borders, gutters and the empty eighth cell.
  # One column per image, no padding, no upscale: the images side by side.
  np.testing.assert_array_equal(images.make_grid(tiles[:2], ncols=2, padding=0),
                                np.concatenate([tiles[0], tiles[1]], axis=1))
  for bad in (dict(upscale=0), dict(upscale=1.5), dict(padding=-1), dict(pad_value=256)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      images.make_grid(tiles, **bad)


def test_grid_label_band_only_when_asked_and_below_the_tiles():
  rng = np.random.default_rng(2)
  tiles = rng.integers(0, 200, size=(4, 8, 8, 1), dtype=np.uint8)
  plain = images.make_grid(tiles, upscale=8)
  assert np.array_equal(images.make_grid(tiles, upscale=8, label=''), plain)  # No band.
  label = images.grid_label(3000, 'ddim', 100, ema=True)
  assert label == 'step 3000, ddim 100 steps, EMA'
  assert images.grid_label(20, 'heun', 10, ema=False, guidance_scale=3.0) == (
      'step 20, heun 10 steps, guidance 3')
  assert images.grid_label(20, 'ddpm', 1000, ema=True, classifier_scale=2.5) == (
      'step 20, ddpm 1000 steps, EMA, classifier guidance 2.5')
  assert images.grid_label(5, 'ddim', 50, ema='posthoc:0.08') == (
      'step 5, ddim 50 steps, EMA posthoc:0.08')
  band_rows = images.label_band_height()
  assert band_rows >= images.LABEL_FONT_PX
  for pad_value, ink in ((255, 0), (0, 255)):
    base = images.make_grid(tiles, upscale=8, pad_value=pad_value)
    grid = images.make_grid(tiles, upscale=8, pad_value=pad_value, label=label)
    assert grid.shape == (base.shape[0] + band_rows,) + base.shape[1:]
    np.testing.assert_array_equal(grid[:base.shape[0]], base)  # The tiles are untouched.
    band = grid[base.shape[0]:, :, 0]
    # The text is drawn (black on light, white on dark) inside the margins (anti-aliasing may
    # reach one pixel further), shrunk to fit this 2x2 grid's 176 columns.
    assert base.shape[1] == 176 and np.any(band == ink)
    m = images.LABEL_MARGIN
    assert np.all(band[:m - 1] == pad_value) and np.all(band[-(m - 1):] == pad_value)
    text_cols = np.flatnonzero(np.any(band != pad_value, axis=0))
    assert m - 1 <= text_cols[0] and text_cols[-1] <= base.shape[1] - m
  rgb = images.make_grid(np.repeat(tiles, 3, axis=-1), upscale=8, label=label)
  gray = images.make_grid(tiles, upscale=8, label=label)
  np.testing.assert_array_equal(rgb[..., 0], gray[..., 0])
  assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_plot_curve_draws_the_points_where_curve_pixels_puts_them():
  steps = np.array([100.0, 200.0, 300.0, 400.0])
  loss = np.array([1.0, 0.1, 0.01, np.nan])  # Log scale: equal gaps; NaN is left out.
  cols, rows, ranges = images.curve_pixels(steps, loss)
  assert ranges['log_y'] and ranges['x'] == (100.0, 300.0)
  width, height = images.CURVE_SIZE
  left, right, top, bottom = images.CURVE_MARGINS
  np.testing.assert_allclose(cols[:3], [left, left + (width - left - right - 1) / 2,
                                        width - right - 1])
  np.testing.assert_allclose(np.diff(rows[:3]), (rows[2] - rows[0]) / 2)  # Decades equally spaced.
  area = height - top - bottom - 1
  np.testing.assert_allclose(rows[0], top + area * 0.05 / 1.1)  # 5% headroom of the 2-decade span.
  assert np.isnan(cols[3]) and np.isnan(rows[3])
  image = images.plot_curve(steps, loss, title='loss')
  assert image.shape == (height, width, 3) and image.dtype == np.uint8
  for c, r in zip(cols[:3], rows[:3]):
    near = image[int(round(r)) - 1:int(round(r)) + 2, int(round(c)) - 1:int(round(c)) + 2]
    assert np.any(np.all(near == images.CURVE_COLOR, axis=-1)), (c, r)
  assert not np.any(np.all(image[:, int(cols[2]) + 3:] == images.CURVE_COLOR, axis=-1))
  # Linear scale when asked, or when a value is not positive.
  assert not images.curve_pixels(steps, np.array([1.0, -1.0, 0.5, 0.2]))[2]['log_y']
  _, lin_rows, _ = images.curve_pixels(steps, loss, log_y=False)
  np.testing.assert_allclose((lin_rows[1] - lin_rows[0]) / (lin_rows[2] - lin_rows[0]), 0.9 / 0.99)
