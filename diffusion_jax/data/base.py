"""What every data source provides (`data.dataset` names one; data/sources.py registers them),
and the record type they share.

A source is a module (or any object) with these names (`Source` spells out the signatures):

  NAME          its `data.dataset` value (the fallback, tfds_source.py, takes every other name)
  has_labels    (data_config) -> whether its examples carry a class label
  num_classes   (data_config) -> the number of classes; only asked when has_labels
  image_size    (data_config) -> (height, width) shared by every image, or None when unknown
                (validation rejects a data.center_crop larger than a known size)
  indexed       (data_config, split) -> an `IndexedSource` (examples read by index: what the
                step-indexed training order reads), or None when the data has no random access
  check         (data_config) -> [error, ...] about its own data.* fields, naming each field;
                cheap and without TensorFlow: it runs in every mode, before anything is read
  streamed      optional: (data_config, split, *, seed, process_index, process_count, train)
                -> (tf.data.Dataset of this host's {'image'[, 'label']}, total size or None),
                for data without random access; without it `create_dataset` (the evaluation
                pass) reads `indexed` (host p gets examples p, p + P, ...)

The fallback (tfds_source.py) has no NAME and also answers `check_name(name, registered)`: is an
unregistered data.dataset a tensorflow-datasets name?

An image is an integer [H, W, C] tensor of any size and 1 to 4 channels; pipeline.py gives every
source the same preprocessing (channels, center crop, resize), order, flips and batching, so a
new source is one module plus one registry entry (or `sources.register` at run time).

TensorFlow is imported inside the functions that build tensors, so that the registry and the
config checks can be imported (`--mode=sample`) without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class IndexedSource:
  """Examples addressable by index 0 .. size - 1: what a step-indexed stream reads.

  read(indices) returns the records of those examples as columns (field -> sequence of
  len(indices) values, e.g. a file path or encoded bytes, and 'label' when labelled); it
  runs in Python, one host batch per call. decode(record) turns one record (tensors of
  `signature`, a mapping field -> tf.TensorSpec) into an image tensor [H, W, C] of any integer
  dtype, inside tf.data. `arrays` is set by sources whose records are all held in memory: the
  columns `read` indexes (field -> numpy array of `size` rows, e.g. file paths), which the
  evaluation pass slices instead of calling `read`. A uint8 'image' column [size, H, W, C] there
  must be what `decode` returns: where the preprocessing is the identity on it, the training
  stream indexes it directly, without tf.data.
  """
  size: int
  read: Callable[[Sequence[int]], Mapping[str, Sequence[Any]]]
  signature: Mapping[str, Any]
  decode: Callable[[Mapping[str, Any]], Any]
  arrays: Mapping[str, np.ndarray] | None = None


def label_spec() -> Any:
  """The tf.TensorSpec of a record's 'label': an int32 scalar."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (TensorFlow: only to read data)
  return tf.TensorSpec([], tf.int32)


def from_arrays(images: np.ndarray, labels: np.ndarray | None = None) -> IndexedSource:
  """An `IndexedSource` of images held in memory (uint8 [N, H, W, C]) and their labels [N].

  Record i is images[i] (and labels[i] as int32); nothing is decoded.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (TensorFlow: only to read data)
  images = np.asarray(images)
  arrays = {'image': images}
  signature = {'image': tf.TensorSpec(images.shape[1:], tf.as_dtype(images.dtype))}
  if labels is not None:
    arrays['label'] = np.asarray(labels, np.int32)
    signature['label'] = label_spec()

  def read(indices: Sequence[int]) -> dict[str, np.ndarray]:
    index = np.asarray(indices, np.int64)
    return {key: value[index] for key, value in arrays.items()}

  return IndexedSource(len(images), read, signature, lambda record: record['image'], arrays)


class Source(Protocol):
  """The signatures of a source module (see the module docstring); `streamed` is optional."""
  NAME: str

  def has_labels(self, data_config) -> bool: ...

  def num_classes(self, data_config) -> int: ...

  def image_size(self, data_config) -> tuple[int, int] | None: ...

  def indexed(self, data_config, split: str) -> IndexedSource | None: ...

  def check(self, data_config) -> list[str]: ...


# The names `sources.register` requires of a source (`streamed` is optional).
REQUIRED = ('NAME', 'has_labels', 'num_classes', 'image_size', 'indexed', 'check')
