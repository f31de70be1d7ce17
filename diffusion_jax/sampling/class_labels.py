"""Class labels of samples: parsing `sample.class_labels` and the label of each sample index.

Dependency-free (numpy only), so config validation can check `sample.class_labels` without
importing the sampler.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

ClassLabelSpec = Union[str, int, Sequence[int], None]


def default_labels(num_classes: int, start: int, batch_size: int) -> np.ndarray:
  """Class labels cycling 0..num_classes-1 (all zeros for unconditional models)."""
  if num_classes <= 0:
    return np.zeros((batch_size,), np.int32)
  return ((start + np.arange(batch_size)) % num_classes).astype(np.int32)


def parse_class_labels(spec: ClassLabelSpec, num_classes: int) -> Optional[np.ndarray]:
  """`sample.class_labels` as int32 class ids, or None for '' (cycle through all classes).

  Accepts '3', '0,3,7' (whitespace allowed), an int or a sequence of ints. Raises ValueError
  naming `sample.class_labels` for text that is not ids, ids outside [0, num_classes), or any
  ids for an unconditional model.
  """
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return None
  if isinstance(spec, str):
    parts = [p.strip() for p in spec.split(',')]
    try:
      values = [int(p) for p in parts]
    except ValueError:
      raise ValueError(
          f'sample.class_labels={spec!r} is not a class id or a comma-separated list of them; '
          "use '' (cycle through the classes), e.g. '3', or e.g. '0,3,7'.") from None
  elif isinstance(spec, (int, np.integer)):
    values = [int(spec)]
  else:
    values = [int(v) for v in spec]
  if not values:
    return None
  if num_classes <= 0:
    raise ValueError(f'sample.class_labels={spec!r} needs a class-conditional model '
                     '(model.num_classes > 0); leave it empty for this unconditional one.')
  bad = [v for v in values if not 0 <= v < num_classes]
  if bad:
    raise ValueError(f'sample.class_labels={spec!r} has {bad}, outside the classes 0..'
                     f'{num_classes - 1} of model.num_classes={num_classes}.')
  return np.asarray(values, np.int32)


def labels_for(indices: np.ndarray, class_labels: Optional[np.ndarray],
               num_classes: int) -> np.ndarray:
  """The label of each global sample index: cycling `class_labels`, or all classes if None."""
  indices = np.asarray(indices, np.int64)
  if num_classes <= 0:
    return np.zeros(indices.shape, np.int32)
  if class_labels is None:
    return (indices % num_classes).astype(np.int32)
  return class_labels[indices % len(class_labels)].astype(np.int32)
