"""Input pipeline: images in [-1, 1], one disjoint part of every batch per host.

Three sources are supported, picked by `config.data.dataset`:

* 'digits': scikit-learn's 8x8 handwritten digits (ships with scikit-learn, so it
  works offline; good for smoke tests and tiny experiments).
* 'folder': PNG/JPEG files under `config.data.folder` (local or gs://), labelled
  by the sorted name of their top-level sub-folder when `data.label_key` is set.
* any other name: a tensorflow-datasets dataset already prepared in
  `config.data.data_dir`.

Training (`step_indexed_dataset`) reads examples by index, so the batch at step s is a
function of (seed, s) alone: digits, folders and tfds datasets prepared as ArrayRecord
(`tfds build NAME --file_format=array_record`). A tfds dataset prepared only as TFRecord
files has no random access; it is streamed by tf.data and resuming re-reads the consumed
batches. Evaluation (`create_dataset(train=False)`) is one ordered pass per host.

Every image goes through the same preprocessing (`_preprocess`): channel conversion, a
centered square crop (`data.center_crop`, or the short side), an area (down) or bilinear
(up) resize to `data.resolution`. `global_batches` assembles the per-host batches into
globally sharded `jax.Array`s. TensorFlow is only used here (and for summaries), and it is
kept off the accelerators.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import logging
import math
import posixpath
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds



def _hide_accelerators_from_tensorflow() -> None:
  """Keeps TensorFlow (which only feeds data) off GPU/TPU memory owned by JAX."""
  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError):  # Already initialised, or unknown type.
      pass


_hide_accelerators_from_tensorflow()

_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_DIGITS_NUM_CLASSES = 10


# ---------------------------------------------------------------- helpers


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


def _tfds_builder(data_config) -> tfds.core.DatasetBuilder:
  """Returns the tfds builder of `data.dataset`, with a clear error if unknown."""
  try:
    return tfds.builder(
        _dataset_name(data_config), data_dir=data_config.data_dir
    )
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f'Unknown data.dataset={_dataset_name(data_config)!r}: use "digits", '
        f'"folder" or a tensorflow-datasets name. ({e})'
    ) from e


def _folder_root(data_config) -> str:
  """Returns `data.folder` after checking that it exists."""
  root = str(data_config.folder or '')
  if not root:
    raise ValueError("data.dataset='folder' needs data.folder to be set.")
  if not tf.io.gfile.isdir(root):
    raise ValueError(f'data.folder={root!r} does not exist or is not a folder.')
  return root.rstrip('/') or '/'


def _folder_classes(root: str) -> list[str]:
  """Returns the sorted names of the immediate sub-folders of `root`."""
  return sorted(
      name.rstrip('/')
      for name in tf.io.gfile.listdir(root)
      if tf.io.gfile.isdir(posixpath.join(root, name.rstrip('/')))
  )


def _folder_examples(data_config) -> tuple[list[str], list[int] | None]:
  """Lists the image files under `data.folder` (sorted) and their class labels."""
  root = _folder_root(data_config)
  paths = []
  for dirpath, _, filenames in tf.io.gfile.walk(root):
    for filename in filenames:
      if filename.lower().endswith(_IMAGE_EXTENSIONS):
        paths.append(posixpath.join(dirpath, filename))
  paths.sort()
  if not paths:
    raise ValueError(
        f'data.folder={root!r} holds no images (*.png, *.jpg, *.jpeg).'
    )
  if not has_labels(data_config):
    return paths, None
  index = {name: i for i, name in enumerate(_folder_classes(root))}
  labels = []
  for path in paths:
    relative = path[len(root):].lstrip('/')
    top = relative.split('/', 1)[0]
    if '/' not in relative or top not in index:
      raise ValueError(
          f'{path!r} is not inside a class sub-folder of data.folder={root!r}; '
          "labelled folders (data.label_key != '') need root/<class>/<image>."
      )
    labels.append(index[top])
  return paths, labels


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Converts a float [H, W, C] image to `channels` (1 or 3) channels."""
  have = image.shape[-1]
  if have is None:
    raise ValueError('Images need a static channel count.')
  if have in (2, 4):  # Drop the alpha channel.
    image = image[..., : have - 1]
    have -= 1
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return tf.tile(image, [1, 1, 3])
  if have == 3 and channels == 1:
    return tf.image.rgb_to_grayscale(image)
  raise ValueError(f'Cannot convert {have}-channel images to {channels}.')


def _center_crop_resize(image: tf.Tensor, resolution: int, crop: int = 0) -> tf.Tensor:
  """Crops a centered square from a float [H, W, C] image and resizes it to `resolution`.

  The square's side is `crop` (data.center_crop), or min(H, W) when crop is 0; its
  top-left corner is ((H - side) // 2, (W - side) // 2). Downsampling averages pixel
  areas (no aliasing, no ringing); upsampling is bilinear. An image whose crop is already
  at the target size passes through unchanged.
  """
  static_height, static_width, channels = image.shape
  static = static_height is not None and static_width is not None
  if static:
    height, width = static_height, static_width
    short = min(height, width)
    if crop > short:
      raise ValueError(
          f'data.center_crop={crop} is larger than the {height}x{width} images; set it '
          f'to at most {short} (or 0 to crop to the short side).')
    side = crop or short
  else:
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    if crop:
      check = tf.debugging.assert_less_equal(
          tf.constant(crop, tf.int32), short,
          message=(f'data.center_crop={crop} is larger than an image\'s short side; '
                   'lower it (or set 0 to crop to the short side)'))
      with tf.control_dependencies([check]):
        side = tf.identity(tf.constant(crop, tf.int32))
    else:
      side = short
  top = (height - side) // 2
  left = (width - side) // 2
  image = image[top:top + side, left:left + side]

  size = [resolution, resolution]
  if static or crop:  # The side is known while tracing.
    known = crop or side
    if known != resolution:
      method = 'area' if known > resolution else 'bilinear'
      image = tf.image.resize(image, size, method)
  else:  # Area resizing to the same size is the identity.
    image = tf.cond(
        side >= resolution,
        lambda: tf.image.resize(image, size, 'area'),
        lambda: tf.image.resize(image, size, 'bilinear'),
    )
  return tf.ensure_shape(image, size + [channels])


def _preprocess(image: tf.Tensor, data_config) -> tf.Tensor:
  """Returns a float32 [resolution, resolution, channels] image in [0, 255] (not rounded).

  Shared by every source and by training and evaluation: channel conversion, the centered
  square crop of data.center_crop (0: the short side), the resize to data.resolution.
  """
  image = tf.cast(image, tf.float32)
  image = _to_channels(image, int(data_config.channels))
  image = _center_crop_resize(image, int(data_config.resolution),
                              int(data_config.center_crop))
  return tf.clip_by_value(image, 0.0, 255.0)


# ---------------------------------------------------------------- sources


def has_labels(data_config) -> bool:
  """Whether batches carry a 'label' key (digits always; else data.label_key)."""
  if _dataset_name(data_config) == 'digits':
    return True
  return bool(data_config.label_key)


def num_classes_of(data_config) -> int:
  """Number of classes of the configured data (0 when it is unlabelled).

  For tfds datasets this reads the builder's metadata (no download); for a
  folder it counts the class sub-folders.
  """
  name = _dataset_name(data_config)
  if name == 'digits':
    return _DIGITS_NUM_CLASSES
  if not has_labels(data_config):
    return 0
  if name == 'folder':
    return len(_folder_classes(_folder_root(data_config)))
  label_key = data_config.label_key
  features = _tfds_builder(data_config).info.features
  if label_key not in features:
    raise ValueError(
        f'data.label_key={label_key!r} is not a feature of '
        f'data.dataset={name!r} (features: {sorted(features.keys())}).'
    )
  num_classes = getattr(features[label_key], 'num_classes', None)
  if num_classes is None:
    raise ValueError(
        f'Feature data.label_key={label_key!r} of data.dataset={name!r} is not '
        'a ClassLabel, so its number of classes is unknown.'
    )
  return int(num_classes)


def image_size_of(data_config) -> tuple[int, int] | None:
  """(height, width) shared by every image of the configured data, or None if unknown.

  Known for the digits (8x8) and for tfds image features of static shape (read from the
  builder's metadata, no download); image folders and variable-size features give None.
  Lets validation reject a data.center_crop larger than the images before any compile.
  """
  name = _dataset_name(data_config)
  if name == 'digits':
    return (8, 8)
  if name == 'folder':
    return None
  features = _tfds_builder(data_config).info.features
  if data_config.image_key not in features:
    return None  # The pipeline reports the unknown data.image_key.
  shape = tuple(features[data_config.image_key].shape)
  if len(shape) != 3 or shape[0] is None or shape[1] is None:
    return None
  return int(shape[0]), int(shape[1])


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns scikit-learn's digits: uint8 images [1797, 8, 8, 1], int32 labels.

  The 0..16 intensities are rescaled to 0..255 so the digits look like any
  other 8-bit image dataset to the rest of the pipeline.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images[..., None], digits.target.astype(np.int32)


def _digits_source(process_index: int, process_count: int):
  """Returns (per-host dataset of {'image', 'label'}, total size)."""
  images, labels = load_digits()
  ds = tf.data.Dataset.from_tensor_slices({
      'image': images[process_index::process_count],
      'label': labels[process_index::process_count],
  })
  return ds, len(images)


def _read_image_file(path: tf.Tensor) -> tf.Tensor:
  """Decodes one PNG/JPEG file to uint8 [H, W, 3] (grayscale is tiled, alpha dropped)."""
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


def _folder_source(data_config, process_index: int, process_count: int):
  """Returns (per-host dataset of decoded {'image'[, 'label']}, total size)."""
  paths, labels = _folder_examples(data_config)
  columns = {'path': paths[process_index::process_count]}
  if labels is not None:
    columns['label'] = np.asarray(
        labels[process_index::process_count], np.int32
    )
  # A host may get no file when there are fewer files than hosts; keep dtypes.
  ds = tf.data.Dataset.from_tensor_slices({
      k: tf.constant(v, tf.string if k == 'path' else tf.int32)
      for k, v in columns.items()
  })

  def decode(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = {'image': _read_image_file(example['path'])}
    if 'label' in example:
      out['label'] = example['label']
    return out

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  return ds, len(paths)


def _check_tfds_features(data_config, features) -> None:
  """Raises a ValueError naming data.image_key / data.label_key when not a feature."""
  for field, key in (('image_key', data_config.image_key),
                     ('label_key', data_config.label_key)):
    if key and key not in features:
      raise ValueError(
          f'data.{field}={key!r} is not a feature of data.dataset='
          f'{_dataset_name(data_config)!r} (features: '
          f'{sorted(features.keys())}).'
      )


def _tfds_source(data_config, *, split: str, seed: int, process_index: int,
                 process_count: int, train: bool):
  """Returns (per-host tfds dataset of {'image'[, 'label']}, total size or None).

  Raises a ValueError with the command that fixes it when the dataset is not
  prepared in `data.data_dir` (nothing is downloaded here).
  """
  builder = _tfds_builder(data_config)
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
  _check_tfds_features(data_config, builder.info.features)

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


# ---------------------------------------------------------------- dataset


def create_dataset(
    data_config,
    per_host_batch_size: int,
    *,
    split: str,
    seed: int,
    process_index: int,
    process_count: int,
    train: bool = True,
) -> tf.data.Dataset:
  """Returns this host's batches of {'image', ['label'], ['mask']}.

  'image' is float32 [B, H, W, C] in [-1, 1] with H = W = data.resolution and
  C = data.channels; 'label' is int32 [B] when `has_labels(data_config)`.

  train=True: an endless, shuffled stream of this host's part, reproducible for a
  fixed seed and host count (random flips are drawn from stateless ops keyed by
  seed, host and stream position); training itself uses `step_indexed_dataset`.
  train=False: one ordered pass, no augmentation, every image rounded to the
  8-bit grid (so likelihoods are scored on the discrete data); the last batch is
  padded to full size and a float32 'mask' [B] marks real examples (1) versus
  padding (0). Every host yields the same number of equally shaped batches,
  which multi-host collectives require.
  """
  if per_host_batch_size <= 0:
    raise ValueError(
        f'per_host_batch_size must be > 0, got {per_host_batch_size}.')
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} not in [0, {process_count}).')
  resolution = int(data_config.resolution)
  channels = int(data_config.channels)
  if resolution <= 0:
    raise ValueError(f'data.resolution must be > 0, got {resolution}.')
  if channels not in (1, 3):
    raise ValueError(f'data.channels must be 1 or 3, got {channels}.')

  name = _dataset_name(data_config)
  if name == 'digits':
    ds, total = _digits_source(process_index, process_count)
  elif name == 'folder':
    ds, total = _folder_source(data_config, process_index, process_count)
  else:
    ds, total = _tfds_source(
        data_config, split=split, seed=seed, process_index=process_index,
        process_count=process_count, train=train)
  labelled = has_labels(data_config)

  def preprocess(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = {'image': _preprocess(example['image'], data_config)}
    if labelled:
      out['label'] = tf.cast(example['label'], tf.int32)
    return out

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  if data_config.cache:
    ds = ds.cache()

  if train:
    ds = _train_stream(ds, data_config, seed=seed, process_index=process_index)
    ds = ds.batch(per_host_batch_size, drop_remainder=True)
  else:
    ds = _eval_pass(ds, labelled, resolution, channels, per_host_batch_size,
                    total=total, process_count=process_count)
  return _finish(ds, data_config)


def _finish(ds: tf.data.Dataset, data_config) -> tf.data.Dataset:
  """Makes `ds` deterministic and prefetches data.prefetch batches (0: none)."""
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  prefetch = int(data_config.prefetch)
  return ds.prefetch(prefetch) if prefetch > 0 else ds


def _train_stream(ds: tf.data.Dataset, data_config, *, seed: int,
                  process_index: int) -> tf.data.Dataset:
  """Shuffles, repeats, flips and scales: an endless reproducible stream."""
  buffer_size = max(int(data_config.shuffle_buffer), 1)
  ds = ds.shuffle(buffer_size, seed=seed + process_index,
                  reshuffle_each_iteration=True)
  ds = ds.repeat()
  random_flip = bool(data_config.random_flip)
  base_seed = tf.constant([seed, process_index], tf.int64)

  def augment(index: tf.Tensor, example: Mapping[str, tf.Tensor]):
    image = example['image']
    if random_flip:
      # Keyed by the position in the stream, so every epoch draws new flips and
      # the stream does not depend on tf.data's threading.
      key = tf.random.experimental.stateless_fold_in(base_seed, index)
      flip = tf.random.stateless_uniform([], seed=key) < 0.5
      image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]),
                      lambda: image)
    return {**example, 'image': image / 127.5 - 1.0}

  return ds.enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)


def _eval_pass(ds: tf.data.Dataset, labelled: bool, resolution: int,
               channels: int, batch_size: int, *, total: int | None,
               process_count: int) -> tf.data.Dataset:
  """One ordered pass, padded so all hosts yield the same number of batches.

  Resized images are rounded to integers before scaling to [-1, 1]: every eval
  image lies on the 8-bit grid {k / 127.5 - 1}, the discrete data that the
  variational bound's decoder and the ODE NLL's dequantization score.
  """
  if total is not None:
    # Host parts differ by at most one example (strided or tfds even splits).
    per_host = math.ceil(total / process_count)
  else:  # Split sizes unknown to tfds (e.g. mocked data): use this host's.
    per_host = int(ds.cardinality())
    if per_host < 0:  # Unknown cardinality: count by reading once.
      per_host = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  num_batches = max(math.ceil(per_host / batch_size), 1)

  def real(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {**example, 'image': tf.round(example['image']) / 127.5 - 1.0,
            'mask': tf.constant(1.0, tf.float32)}

  pad = {'image': tf.zeros([resolution, resolution, channels], tf.float32),
         'mask': tf.constant(0.0, tf.float32)}
  if labelled:
    pad['label'] = tf.constant(0, tf.int32)
  padding = tf.data.Dataset.from_tensors(pad).repeat()
  ds = ds.map(real).concatenate(padding).take(num_batches * batch_size)
  return ds.batch(batch_size, drop_remainder=True)


# ---------------------------------------------------------------- resumable training order


def host_batch_rows(sharding: jax.sharding.Sharding,
                    global_batch_size: int) -> np.ndarray:
  """Rows of a global batch that this host's devices hold under `sharding` (sorted)."""
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  rows = set()
  for index in index_map.values():
    rows.update(range(global_batch_size)[index[0]] if index else range(global_batch_size))
  return np.asarray(sorted(rows), np.int64)


def _epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(size)


def _step_indices(size: int, global_batch_size: int, rows: np.ndarray, *,
                  seed: int, start_step: int) -> Iterator[tuple[int, int]]:
  """Yields (stream position, example index) for `rows` of batches start_step, ...

  The stream is the concatenation of one permutation of the examples per epoch, seeded by
  (seed, epoch); the batch at step s is stream[s * B:(s + 1) * B] (0-based s).
  """
  cache: dict[int, np.ndarray] = {}
  step = start_step
  while True:
    for row in rows:
      position = step * global_batch_size + int(row)
      epoch, offset = divmod(position, size)
      if epoch not in cache:
        cache.clear()
        cache[epoch] = _epoch_permutation(seed, epoch, size)
      yield position, int(cache[epoch][offset])
    step += 1


@dataclasses.dataclass(frozen=True)
class _IndexedSource:
  """Examples addressable by index 0 .. size - 1: what a step-indexed stream reads.

  read(indices) returns the records of those examples as columns (field -> sequence of
  len(indices) values, e.g. a file path or encoded bytes, and 'label' when labelled); it
  runs in Python, one host batch per call. decode(record) turns one record (tensors of
  `signature`) into an image tensor [H, W, C] of any integer dtype, inside tf.data.
  """
  size: int
  read: Callable[[Sequence[int]], Mapping[str, Sequence[Any]]]
  signature: Mapping[str, tf.TensorSpec]
  decode: Callable[[Mapping[str, tf.Tensor]], tf.Tensor]


def _label_spec() -> tf.TensorSpec:
  return tf.TensorSpec([], tf.int32)


def _digits_indexed(labelled: bool) -> _IndexedSource:
  """The digits held in memory (resized/recoloured by the shared preprocessing)."""
  images, labels = load_digits()

  def read(indices: Sequence[int]) -> dict[str, Any]:
    out = {'image': images[np.asarray(indices)]}
    if labelled:
      out['label'] = labels[np.asarray(indices)]
    return out

  signature = {'image': tf.TensorSpec(images.shape[1:], tf.uint8)}
  if labelled:
    signature['label'] = _label_spec()
  return _IndexedSource(len(images), read, signature, lambda r: r['image'])


def _folder_indexed(data_config) -> _IndexedSource:
  """The sorted image files of data.folder; a file is read and decoded per example."""
  paths, labels = _folder_examples(data_config)
  paths_np = np.asarray(paths, object)
  labels_np = None if labels is None else np.asarray(labels, np.int32)

  def read(indices: Sequence[int]) -> dict[str, Any]:
    out = {'path': paths_np[np.asarray(indices)]}
    if labels_np is not None:
      out['label'] = labels_np[np.asarray(indices)]
    return out

  signature = {'path': tf.TensorSpec([], tf.string)}
  if labels_np is not None:
    signature['label'] = _label_spec()
  return _IndexedSource(len(paths), read, signature, lambda r: _read_image_file(r['path']))


def _open_tfds_data_source(builder: tfds.core.DatasetBuilder, split: str,
                           decoders: Mapping[str, Any] | None) -> Sequence[Any]:
  """tfds' random-access view of `split` (ArrayRecord/Parquet files); tests wrap it."""
  return builder.as_data_source(split, decoders=decoders)


def _has_random_access(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the prepared files of `builder` can be read by index (e.g. ArrayRecord)."""
  formats = builder.info.available_file_formats()
  return bool(formats & tfds.core.FileFormat.with_random_access())


def _tfds_indexed(data_config, builder: tfds.core.DatasetBuilder,
                  split: str) -> _IndexedSource:
  """A prepared random-access tfds split: example i is record i of `split`.

  Encoded images (tfds Image features: PNG/JPEG bytes) are read undecoded and decoded by
  tf.io.decode_image inside tf.data, as the folder source and tfds' own as_dataset do;
  other image features come decoded by tfds as numpy arrays.
  """
  features = builder.info.features
  _check_tfds_features(data_config, features)
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
  source = _open_tfds_data_source(builder, split, decoders)
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
    signature['label'] = _label_spec()
  return _IndexedSource(len(source), read, signature, decode)


def _indexed_records(source: _IndexedSource, global_batch_size: int, rows: np.ndarray, *,
                     seed: int, start_step: int) -> Iterator[dict[str, Any]]:
  """Yields this host's records of steps start_step, start_step + 1, ... with their positions.

  Reads one host batch (len(rows) examples) per `source.read` call, only when the stream
  reaches it: nothing before start_step is read.
  """
  indices = _step_indices(source.size, global_batch_size, rows, seed=seed,
                          start_step=start_step)
  while True:
    picked = [next(indices) for _ in range(len(rows))]
    columns = source.read([index for _, index in picked])
    for j, (position, _) in enumerate(picked):
      yield {'position': np.int64(position), **{k: v[j] for k, v in columns.items()}}


_WARNED_SEQUENTIAL: set[str] = set()


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


def step_indexed_dataset(
    data_config,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int,
    rows: np.ndarray,
    process_index: int = 0,
    process_count: int = 1,
    steps_per_batch: int = 1,
) -> tf.data.Dataset | Iterator[dict[str, np.ndarray]]:
  """This host's training batches from step `start_step` on, a pure function of the step.

  Resuming needs no iterator state: the batch at (0-based) step s only depends on
  (seed, s), so a restarted run continues exactly where the checkpoint left off.

  * Random-access sources: 'digits', 'folder' and tfds datasets prepared as ArrayRecord
    (or another format tfds reads by index; `tfds build NAME --file_format=array_record`).
    One permutation of all examples per epoch seeded by (seed, epoch); the global batch at
    step s is positions [s * B, (s + 1) * B) of the concatenated permutations and this host
    reads `rows` of it (`host_batch_rows`), so the global batch does not depend on the
    number of hosts. Every example goes through the shared preprocessing (`_preprocess`);
    random flips are keyed by (seed, stream position). Starting at step s reads only the
    examples of steps s, s + 1, ...: resuming at step 400k costs what step 10 costs.
    The digits at their native 8x8x1 come as plain numpy batches (no tf.data at all).
  * tfds datasets prepared only as TFRecord files (no random access): the seeded,
    deterministic `create_dataset` stream of this host's split part, with the `start_step`
    already-consumed batches skipped: resuming reads and decodes start_step * B / hosts
    examples per host (minutes for ~1M-image runs), and the order depends on the number
    of hosts. A warning says so once, with the `tfds build` command that fixes it.

  With steps_per_batch = k > 1 consecutive batches are stacked: arrays are [k, B_host, ...].
  """
  name = _dataset_name(data_config)
  labelled = has_labels(data_config)
  rows = np.asarray(rows, np.int64)
  if name == 'digits':
    crop = int(data_config.center_crop)
    if (int(data_config.resolution), int(data_config.channels)) == (8, 1) and crop in (0, 8):
      return _digits_batches(global_batch_size, rows, seed=seed, start_step=start_step,
                             random_flip=bool(data_config.random_flip), labelled=labelled,
                             steps_per_batch=steps_per_batch)
    source = _digits_indexed(labelled)
  elif name == 'folder':
    source = _folder_indexed(data_config)
  else:
    builder = _tfds_builder(data_config)
    if not _has_random_access(builder):
      per_host = global_batch_size // process_count
      ds = create_dataset(data_config, per_host, split=data_config.split, seed=seed,
                          process_index=process_index, process_count=process_count,
                          train=True)
      _warn_sequential_once(data_config)
      ds = ds.skip(start_step)
      return ds.batch(steps_per_batch, drop_remainder=True) if steps_per_batch > 1 else ds
    source = _tfds_indexed(data_config, builder, data_config.split)
  if source.size <= 0:
    raise ValueError(f'data.dataset={name!r} (split {data_config.split!r}) has no examples.')

  random_flip = bool(data_config.random_flip)
  flip_seed = tf.constant([seed, 0x5EED], tf.int64)

  def example(record: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = _preprocess(source.decode(record), data_config)
    if random_flip:
      key = tf.random.experimental.stateless_fold_in(flip_seed, record['position'])
      flip = tf.random.stateless_uniform([], seed=key) < 0.5
      image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    out = {'image': image / 127.5 - 1.0}
    if labelled:
      out['label'] = record['label']
    return out

  signature = {'position': tf.TensorSpec([], tf.int64), **source.signature}
  ds = tf.data.Dataset.from_generator(
      lambda: _indexed_records(source, global_batch_size, rows, seed=seed,
                               start_step=start_step),
      output_signature=signature)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(len(rows), drop_remainder=True)
  if steps_per_batch > 1:
    ds = ds.batch(steps_per_batch, drop_remainder=True)
  return _finish(ds, data_config)


def _flip_of(seed: int, position: int) -> bool:
  """Whether the example at stream `position` is flipped: a pure function of (seed, position)."""
  return bool(np.random.default_rng([seed, 0x5EED, position]).random() < 0.5)


def _digits_batches(global_batch_size: int, rows: np.ndarray, *, seed: int, start_step: int,
                    random_flip: bool, labelled: bool, steps_per_batch: int
                    ) -> Iterator[dict[str, np.ndarray]]:
  """The digits at their native 8x8x1 as plain numpy batches: no tf.data, no TF threads.

  Same order as every step-indexed source (`_step_indices`); images in [-1, 1] float32.
  """
  images, labels = load_digits()
  scaled = images.astype(np.float32) / 127.5 - 1.0
  indices = _step_indices(len(images), global_batch_size, np.asarray(rows, np.int64),
                          seed=seed, start_step=start_step)
  num_rows = len(rows)

  def one_batch() -> dict[str, np.ndarray]:
    picked = [next(indices) for _ in range(num_rows)]
    index = np.asarray([i for _, i in picked], np.int64)
    batch = scaled[index]
    if random_flip:
      flips = np.asarray([_flip_of(seed, position) for position, _ in picked])
      batch = np.where(flips[:, None, None, None], batch[:, :, ::-1], batch)
    out = {'image': batch}
    if labelled:
      out['label'] = labels[index]
    return out

  while True:
    if steps_per_batch == 1:
      yield one_batch()
    else:
      batches = [one_batch() for _ in range(steps_per_batch)]
      yield {k: np.stack([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------- to JAX


def _sharding_for(sharding: jax.sharding.Sharding,
                  ndim: int) -> jax.sharding.Sharding:
  """Trims a NamedSharding's spec to `ndim` dims so one sharding fits all keys."""
  if isinstance(sharding, jax.sharding.NamedSharding) and len(
      sharding.spec) > ndim:
    return jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[:ndim]))
  return sharding


def global_batches(
    dataset: tf.data.Dataset | Iterator[dict[str, np.ndarray]],
    sharding: jax.sharding.Sharding
) -> Iterator[dict[str, jax.Array]]:
  """Yields global `jax.Array` batches assembled from every host's local batch.

  `dataset` is a tf.data.Dataset or an iterator of numpy batches. `sharding` splits dim 0 over
  the data axis (usually NamedSharding(mesh, P('data'))); each host contributes its per-host
  batch as its slice.
  """
  local = dataset.as_numpy_iterator() if isinstance(dataset, tf.data.Dataset) else dataset
  for batch in local:
    yield {
        key: jax.make_array_from_process_local_data(
            _sharding_for(sharding, np.ndim(value)), value)
        for key, value in batch.items()
    }


__all__ = [
    'create_dataset',
    'global_batches',
    'has_labels',
    'host_batch_rows',
    'image_size_of',
    'load_digits',
    'num_classes_of',
    'step_indexed_dataset',
]
