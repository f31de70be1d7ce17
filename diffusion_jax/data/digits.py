"""The 'digits' source: scikit-learn's 8x8 handwritten digits, labelled 0..9.

They ship with scikit-learn, so they work offline: smoke tests and tiny experiments. Held in
memory (`base.from_arrays`); at their native 8x8x1 the training stream is plain numpy.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.data import base

NAME = 'digits'
NUM_CLASSES = 10
IMAGE_SIZE = (8, 8)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns scikit-learn's digits: uint8 images [1797, 8, 8, 1], int32 labels.

  The 0..16 intensities are rescaled to 0..255 so the digits look like any
  other 8-bit image dataset to the rest of the pipeline.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top (only when data is read)

  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images[..., None], digits.target.astype(np.int32)


def has_labels(data_config) -> bool:
  """Always: every digit has its class (whatever data.label_key says)."""
  del data_config
  return True


def num_classes(data_config) -> int:
  del data_config
  return NUM_CLASSES


def image_size(data_config) -> tuple[int, int]:
  del data_config
  return IMAGE_SIZE


def indexed(data_config, split: str) -> base.IndexedSource:
  """All 1797 digits with their labels, whatever the split (there is only one)."""
  del data_config, split
  return base.from_arrays(*load_digits())


def check(data_config) -> list[str]:
  """No field of its own."""
  del data_config
  return []
