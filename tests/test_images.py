"""Sample grids: every image framed by white gutters that grow with the upscale."""

import numpy as np

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
