"""The tensorflow-datasets source: every `data.dataset` that no other source registers.

The dataset must already be prepared in `data.data_dir` (nothing is downloaded here; the errors
say how to prepare it). `data.image_key` / `data.label_key` name its features. Prepared as
ArrayRecord (`tfds build NAME --file_format=array_record`) it is read by index, so training
resumes in O(1); prepared only as TFRecord files it is streamed by tf.data (`streamed`), and the
evaluation pass always is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from diffusion_jax.data import base

if TYPE_CHECKING:
  import tensorflow as tf
  import tensorflow_datasets as tfds

# The data.dataset values whose "prepared only as TFRecord" warning was logged in this process.
_WARNED_SEQUENTIAL: set[str] = set()


def _dataset_name(data_config) -> str:
  return str(data_config.dataset)


def _not_prepared_message(data_config) -> str:
  name = _dataset_name(data_config)
  data_dir = data_config.data_dir
  dir_flag = f' --data_dir={data_dir}' if data_dir else ''
  dir_arg = f', data_dir={data_dir!r}' if data_dir else ''
  return (
      f'tensorflow-datasets dataset data.dataset={name!r} is not prepared in '
      f'data.data_dir={data_dir!r}. Prepare it once (needs network access), '
      f'e.g. `tfds build {name}{dir_flag}` or `python -c "import '
      f"tensorflow_datasets as tfds; tfds.builder('{name}'{dir_arg})"
      '.download_and_prepare()"`, or point data.data_dir at a directory '
      'that holds it.'
  )


def _builder(data_config) -> tfds.core.DatasetBuilder:
  """Returns the tfds builder of `data.dataset`, with a clear error if unknown."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (TensorFlow)
  try:
    return tfds.builder(
        _dataset_name(data_config), data_dir=data_config.data_dir
    )
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f'Unknown data.dataset={_dataset_name(data_config)!r}: use "digits", '
        f'"folder" or a tensorflow-datasets name. ({e})'
    ) from e


def _check_features(data_config, features) -> None:
  """Raises a ValueError naming data.image_key / data.label_key when not a feature."""
  for field, key in (('image_key', data_config.image_key),
                     ('label_key', data_config.label_key)):
    if key and key not in features:
      raise ValueError(
          f'data.{field}={key!r} is not a feature of data.dataset='
          f'{_dataset_name(data_config)!r} (features: '
          f'{sorted(features.keys())}).'
      )


def has_labels(data_config) -> bool:
  """Whether data.label_key names the label feature."""
  return bool(data_config.label_key)


def num_classes(data_config) -> int:
  """The label feature's number of classes, from the builder's metadata (no download)."""
  name = _dataset_name(data_config)
  label_key = data_config.label_key
  features = _builder(data_config).info.features
  if label_key not in features:
    raise ValueError(
        f'data.label_key={label_key!r} is not a feature of '
        f'data.dataset={name!r} (features: {sorted(features.keys())}).'
    )
  count = getattr(features[label_key], 'num_classes', None)
  if count is None:
    raise ValueError(
        f'Feature data.label_key={label_key!r} of data.dataset={name!r} is not '
        'a ClassLabel, so its number of classes is unknown.'
    )
  return int(count)


def image_size(data_config) -> tuple[int, int] | None:
  """(height, width) of an image feature of static shape (from metadata), else None."""
  features = _builder(data_config).info.features
  if data_config.image_key not in features:
    return None  # The pipeline reports the unknown data.image_key.
  shape = tuple(features[data_config.image_key].shape)
  if len(shape) != 3 or shape[0] is None or shape[1] is None:
    return None
  return int(shape[0]), int(shape[1])


def streamed(data_config, split: str, *, seed: int, process_index: int, process_count: int,
             train: bool) -> tuple[tf.data.Dataset, int | None]:
  """Returns (per-host tfds dataset of {'image'[, 'label']}, total size or None).

  Raises a ValueError with the command that fixes it when the dataset is not
  prepared in `data.data_dir` (nothing is downloaded here).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (TensorFlow)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (TensorFlow)
  builder = _builder(data_config)
  image_key = data_config.image_key
  label_key = data_config.label_key
  options = tf.data.Options()
  options.deterministic = True
  read_config = tfds.ReadConfig(
      shuffle_seed=seed, options=options, try_autocache=False)
  host_split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)
  try:
    ds = builder.as_dataset(
        split=host_split, shuffle_files=train, read_config=read_config)
  except AssertionError as e:  # tfds' "could not find data in data_dir".
    raise ValueError(_not_prepared_message(data_config)) from e
  _check_features(data_config, builder.info.features)

  def select(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = {'image': example[image_key]}
    if label_key:
      out['label'] = tf.cast(example[label_key], tf.int32)
    return out

  ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  try:
    total = int(builder.info.splits[split].num_examples)
  except Exception:  # pylint: disable=broad-except  # Unknown split sizes.
    total = None
  return ds, total


def _open_data_source(builder: tfds.core.DatasetBuilder, split: str,
                      decoders: Mapping[str, Any] | None) -> Sequence[Any]:
  """tfds' random-access view of `split` (ArrayRecord/Parquet files); tests wrap it."""
  return builder.as_data_source(split, decoders=decoders)


def _has_random_access(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the prepared files of `builder` can be read by index (e.g. ArrayRecord)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (TensorFlow)
  formats = builder.info.available_file_formats()
  return bool(formats & tfds.core.FileFormat.with_random_access())


def _warn_sequential_once(data_config) -> None:
  """Logs once per dataset that resuming a TFRecord-only tfds dataset re-reads batches."""
  name = _dataset_name(data_config)
  if name in _WARNED_SEQUENTIAL:
    return
  _WARNED_SEQUENTIAL.add(name)
  data_dir = data_config.data_dir
  dir_flag = f' --data_dir={data_dir}' if data_dir else ''
  logging.warning(
      'data.dataset=%r is prepared only as TFRecord files, which cannot be read by index: '
      'it is streamed by tf.data, resuming at step s re-reads and decodes the s consumed '
      'batches, and the order depends on the number of processes. Prepare it once as '
      'ArrayRecord for O(1) resume and a host-count-independent order: '
      '`tfds build %s%s --file_format=array_record`.', name, name, dir_flag)


def indexed(data_config, split: str) -> base.IndexedSource | None:
  """A prepared random-access tfds split: example i is record i of `split`.

  None when the dataset is prepared only as TFRecord files (or not at all: `streamed` then
  says how to prepare it); a prepared TFRecord-only dataset logs once that training streams it
  and how to prepare it for random access. Encoded images (tfds Image features: PNG/JPEG
  bytes) are read undecoded and decoded by tf.io.decode_image inside tf.data, as the folder
  source and tfds' own as_dataset do; other image features come decoded by tfds as numpy
  arrays.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top (TensorFlow)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (TensorFlow)
  builder = _builder(data_config)
  if not _has_random_access(builder):
    if builder.data_path.exists():  # Else `streamed` raises the "not prepared" error.
      _check_features(data_config, builder.info.features)
      _warn_sequential_once(data_config)
    return None
  features = builder.info.features
  _check_features(data_config, features)
  image_key, label_key = data_config.image_key, data_config.label_key
  feature = features[image_key]
  shape = tuple(feature.shape)
  if len(shape) != 3:
    raise ValueError(
        f'data.image_key={image_key!r} of data.dataset={_dataset_name(data_config)!r} has '
        f'shape {shape}; images need [height, width, channels].')
  encoded = (isinstance(feature, tfds.features.Image) and feature.dtype == tf.uint8
             and feature.encoding_format in (None, 'png', 'jpeg'))
  decoders = {image_key: tfds.decode.SkipDecoding()} if encoded else None
  source = _open_data_source(builder, split, decoders)
  if encoded:
    image_spec = tf.TensorSpec([], tf.string)
    image_channels = shape[-1] or 0

    def decode(record: Mapping[str, tf.Tensor]) -> tf.Tensor:
      image = tf.io.decode_image(record['image'], channels=image_channels,
                                 expand_animations=False)
      return tf.ensure_shape(image, shape)
  else:
    image_spec = tf.TensorSpec(shape, tf.as_dtype(feature.dtype))

    def decode(record: Mapping[str, tf.Tensor]) -> tf.Tensor:
      return record['image']

  def read(indices: Sequence[int]) -> dict[str, Any]:
    records = source.__getitems__([int(i) for i in indices])
    out = {'image': [r[image_key] for r in records]}
    if label_key:
      out['label'] = np.asarray([r[label_key] for r in records], np.int32)
    return out

  signature = {'image': image_spec}
  if label_key:
    signature['label'] = base.label_spec()
  return base.IndexedSource(len(source), read, signature, decode)


def check(data_config) -> list[str]:
  """Its fields (image_key, label_key) are checked against the metadata when it is read."""
  del data_config
  return []


def check_name(name: str, registered: Sequence[str]) -> list[str]:
  """The fallback's name check: an error unless `name` is a registered tfds builder.

  `registered` are the names other sources take (named in the message). Imports TensorFlow
  (tfds' registry), so only the modes that read data ask.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (TensorFlow)
  builder_name = name.split('/')[0].split(':')[0]
  if builder_name in tfds.list_builders(with_community_datasets=False):
    return []
  return [f'data.dataset={name!r} is neither {tuple(registered)} nor a tensorflow-datasets '
          "name (e.g. 'cifar10', 'celeb_a', 'imagenet_resized/64x64')."]
