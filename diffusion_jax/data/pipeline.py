"""Input pipeline: images in [-1, 1], one disjoint part of every batch per host.

`config.data.dataset` picks the source through the registry (data/sources.py; the protocol is in
data/base.py): 'digits' (scikit-learn's 8x8 digits, digits.py), 'folder' (image files under
`data.folder`, folder.py), any other name a tensorflow-datasets dataset prepared in
`data.data_dir` (tfds_source.py). Everything that is not a source lives here, once.

Training (`step_indexed_dataset`) reads examples by index, so the batch at step s is a
function of (seed, s) alone: every source whose `indexed` gives random access (digits, folders,
tfds datasets prepared as ArrayRecord: `tfds build NAME --file_format=array_record`). A source
without random access (a tfds dataset prepared only as TFRecord files) is streamed by tf.data
and resuming re-reads the consumed batches. Evaluation (`create_dataset(train=False)`) is one
ordered pass per host.

Every image goes through the same preprocessing (`_preprocess`): channel conversion, a
centered square crop (`data.center_crop`, or the short side), an area (down) or bilinear
(up) resize to `data.resolution`. `global_batches` assembles the per-host batches into
globally sharded `jax.Array`s. TensorFlow is only used in this package (and for summaries),
and it is kept off the accelerators.
"""

from collections.abc import Iterator, Mapping
import math
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from diffusion_jax.data import base
from diffusion_jax.data import sources
from diffusion_jax.data.digits import load_digits


def _hide_accelerators_from_tensorflow() -> None:
  """Keeps TensorFlow (which only feeds data) off GPU/TPU memory owned by JAX."""
  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError):  # Already initialised, or unknown type.
      pass


_hide_accelerators_from_tensorflow()


# ---------------------------------------------------------------- preprocessing


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


# Examples per `read` call when `create_dataset` streams a source through its `indexed` records.
_READ_CHUNK = 256


# ---------------------------------------------------------------- sources


def _dataset_name(data_config) -> str:
  return str(data_config.dataset)


def has_labels(data_config) -> bool:
  """Whether batches carry a 'label' key (digits always; else data.label_key)."""
  return bool(sources.source_of(data_config).has_labels(data_config))


def num_classes_of(data_config) -> int:
  """Number of classes of the configured data (0 when it is unlabelled).

  For tfds datasets this reads the builder's metadata (no download); for a
  folder it counts the class sub-folders.
  """
  if not has_labels(data_config):
    return 0
  return int(sources.source_of(data_config).num_classes(data_config))


def image_size_of(data_config) -> tuple[int, int] | None:
  """(height, width) shared by every image of the configured data, or None if unknown.

  Known for the digits (8x8) and for tfds image features of static shape (read from the
  builder's metadata, no download); image folders and variable-size features give None.
  Lets validation reject a data.center_crop larger than the images before any compile.
  """
  return sources.source_of(data_config).image_size(data_config)


def _indexed_host_part(records: base.IndexedSource, process_index: int,
                       process_count: int) -> tf.data.Dataset:
  """This host's examples p, p + P, ... of `records`, in order, as {'image'[, 'label']}.

  Records held in memory (`arrays`) are sliced; others are read `_READ_CHUNK` per `read`
  call. Decoded inside tf.data. A host may get no example when there are fewer than hosts
  (the signature keeps the dtypes).
  """
  indices = np.arange(process_index, records.size, process_count, dtype=np.int64)
  if records.arrays is not None:
    ds = tf.data.Dataset.from_tensor_slices({
        key: tf.constant(value[indices], records.signature[key].dtype)
        for key, value in records.arrays.items()})
  else:
    def generate() -> Iterator[dict[str, Any]]:
      for start in range(0, len(indices), _READ_CHUNK):
        chunk = indices[start:start + _READ_CHUNK]
        columns = records.read(chunk)
        for j in range(len(chunk)):
          yield {key: value[j] for key, value in columns.items()}

    ds = tf.data.Dataset.from_generator(generate, output_signature=dict(records.signature))

  def decode(record: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = {'image': records.decode(record)}
    if 'label' in record:
      out['label'] = record['label']
    return out

  return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _streamed(data_config, *, split: str, seed: int, process_index: int, process_count: int,
              train: bool) -> tuple[tf.data.Dataset, int | None]:
  """(This host's examples {'image'[, 'label']}, total size or None) of the configured source:
  its own `streamed` where it has one, else its indexed records, strided over the hosts."""
  source = sources.source_of(data_config)
  streamed = getattr(source, 'streamed', None)
  if streamed is not None:
    return streamed(data_config, split, seed=seed, process_index=process_index,
                    process_count=process_count, train=train)
  records = source.indexed(data_config, split)
  if records is None:
    raise ValueError(f'data.dataset={_dataset_name(data_config)!r} has neither random access '
                     'nor a streamed reader.')
  return _indexed_host_part(records, process_index, process_count), records.size


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

  ds, total = _streamed(data_config, split=split, seed=seed, process_index=process_index,
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



def _indexed_records(source: base.IndexedSource, global_batch_size: int, rows: np.ndarray, *,
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

  * Random-access sources (`indexed` gives records): 'digits', 'folder' and tfds datasets
    prepared as ArrayRecord (or another format tfds reads by index; `tfds build NAME
    --file_format=array_record`). One permutation of all examples per epoch seeded by
    (seed, epoch); the global batch at step s is positions [s * B, (s + 1) * B) of the
    concatenated permutations and this host reads `rows` of it (`host_batch_rows`), so the
    global batch does not depend on the number of hosts. Every example goes through the
    shared preprocessing (`_preprocess`); random flips are keyed by (seed, stream position).
    Starting at step s reads only the examples of steps s, s + 1, ...: resuming at step 400k
    costs what step 10 costs. Images held in memory at the target size (the digits at their
    native 8x8x1) come as plain numpy batches (no tf.data at all).
  * Sources without random access (tfds datasets prepared only as TFRecord files): the
    seeded, deterministic `create_dataset` stream of this host's split part, with the
    `start_step` already-consumed batches skipped: resuming reads and decodes
    start_step * B / hosts examples per host (minutes for ~1M-image runs), and the order
    depends on the number of hosts. The tfds source warns once, with the `tfds build`
    command that fixes it.

  With steps_per_batch = k > 1 consecutive batches are stacked: arrays are [k, B_host, ...].
  """
  labelled = has_labels(data_config)
  rows = np.asarray(rows, np.int64)
  source = sources.source_of(data_config).indexed(data_config, data_config.split)
  if source is None:
    per_host = global_batch_size // process_count
    ds = create_dataset(data_config, per_host, split=data_config.split, seed=seed,
                        process_index=process_index, process_count=process_count,
                        train=True)
    ds = ds.skip(start_step)
    return ds.batch(steps_per_batch, drop_remainder=True) if steps_per_batch > 1 else ds
  if _needs_no_preprocessing(source, data_config):
    return _array_batches(source, global_batch_size, rows, seed=seed, start_step=start_step,
                          random_flip=bool(data_config.random_flip), labelled=labelled,
                          steps_per_batch=steps_per_batch)
  if source.size <= 0:
    raise ValueError(f'data.dataset={_dataset_name(data_config)!r} (split '
                     f'{data_config.split!r}) has no examples.')

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


def _needs_no_preprocessing(source: base.IndexedSource, data_config) -> bool:
  """Whether `source` holds uint8 images in memory on which `_preprocess` is the identity:
  already data.resolution square with data.channels channels, and no smaller crop."""
  images = None if source.arrays is None else source.arrays.get('image')
  if images is None or source.size <= 0:
    return False
  resolution = int(data_config.resolution)
  return (images.dtype == np.uint8
          and tuple(images.shape[1:]) == (resolution, resolution, int(data_config.channels))
          and int(data_config.center_crop) in (0, resolution))


def _flip_of(seed: int, position: int) -> bool:
  """Whether the example at stream `position` is flipped: a pure function of (seed, position)."""
  return bool(np.random.default_rng([seed, 0x5EED, position]).random() < 0.5)


def _array_batches(source: base.IndexedSource, global_batch_size: int, rows: np.ndarray, *,
                   seed: int, start_step: int, random_flip: bool, labelled: bool,
                   steps_per_batch: int) -> Iterator[dict[str, np.ndarray]]:
  """Images held in memory at the target size as plain numpy batches: no tf.data, no TF threads.

  Same order as every step-indexed source (`_step_indices`); images in [-1, 1] float32.
  """
  scaled = source.arrays['image'].astype(np.float32) / 127.5 - 1.0
  labels = source.arrays.get('label')
  indices = _step_indices(source.size, global_batch_size, np.asarray(rows, np.int64),
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
