"""Tests of diffusion_jax.data.pipeline and its sources: preprocessing, host splits, sharding."""

import math
import os

import jax
import numpy as np
from PIL import Image
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from configs import default
from configs import tiny
from diffusion_jax.data import pipeline
from diffusion_jax.data import tfds_source
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes.validation import validate_config


def _data_config(**overrides):
  config = default.get_config().data
  config.update(overrides)
  return config


def _digits_config(**overrides):
  kwargs = dict(dataset='digits', resolution=8, channels=1, random_flip=False,
                shuffle_buffer=2000, prefetch=1)
  kwargs.update(overrides)
  return _data_config(**kwargs)


def _eval_examples(config, batch_size, *, process_index=0, process_count=1,
                   split='train'):
  """Runs one eval pass; returns stacked real examples and the batch list."""
  ds = pipeline.create_dataset(
      config, batch_size, split=split, seed=0, process_index=process_index,
      process_count=process_count, train=False)
  batches = list(ds.as_numpy_iterator())
  real = {}
  for key in batches[0]:
    values = np.concatenate([b[key] for b in batches])
    mask = np.concatenate([b['mask'] for b in batches]) == 1
    real[key] = values[mask]
  return real, batches


def _train_examples(config, batch_size, num_examples, *, seed=0,
                    process_index=0, process_count=1):
  """Returns the first `num_examples` examples of the training stream."""
  ds = pipeline.create_dataset(
      config, batch_size, split='train', seed=seed,
      process_index=process_index, process_count=process_count, train=True)
  batches = list(ds.take(math.ceil(num_examples / batch_size))
                 .as_numpy_iterator())
  return {k: np.concatenate([b[k] for b in batches])[:num_examples]
          for k in batches[0]}


def _rows(images, labels=None):
  """Sorted byte rows: compares example multisets regardless of order."""
  images = np.ascontiguousarray(images)
  rows = [images[i].tobytes() + (b'' if labels is None else
                                 np.int32(labels[i]).tobytes())
          for i in range(len(images))]
  return sorted(rows)


def _assert_on_8bit_grid(images):
  """Every value of images in [-1, 1] is k / 127.5 - 1 for an integer k in [0, 255]."""
  levels = images.astype(np.float64) * 127.5 + 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert levels.min() > -1e-4 and levels.max() < 255 + 1e-4


@pytest.fixture(scope='module')
def digits():
  return pipeline.load_digits()


def _scaled(uint8_images):
  return uint8_images.astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------- digits


def test_load_digits_matches_sklearn(digits):
  images, labels = digits
  ref = sk_datasets.load_digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
  assert labels.shape == (1797,) and labels.dtype == np.int32
  np.testing.assert_array_equal(
      images[..., 0], np.round(ref.images * 255 / 16).astype(np.uint8))
  np.testing.assert_array_equal(labels, ref.target)
  assert images.max() == 255 and images.min() == 0


def test_digits_metadata():
  config = _digits_config(label_key='')
  assert pipeline.has_labels(config)
  assert pipeline.num_classes_of(config) == 10


def test_digits_train_epoch_is_shuffled_dataset(digits):
  images, labels = digits
  config = _digits_config()
  # Shuffling comes before repeat, so the first 1797 examples are one epoch.
  got = _train_examples(config, 599, 1797)
  assert got['image'].dtype == np.float32 and got['label'].dtype == np.int32
  assert got['image'].shape == (1797, 8, 8, 1)
  assert got['image'].min() == -1.0 and got['image'].max() == 1.0
  expected = _scaled(images)
  assert _rows(got['image'], got['label']) == _rows(expected, labels)
  assert not np.array_equal(got['label'], labels)  # Really shuffled.


def test_train_order_is_reproducible(digits):
  del digits
  config = _digits_config(shuffle_buffer=500)
  a = _train_examples(config, 50, 200, seed=3)
  b = _train_examples(config, 50, 200, seed=3)
  c = _train_examples(config, 50, 200, seed=4)
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(a['label'], c['label'])


@pytest.mark.parametrize('process_count', [2, 3])
def test_digits_hosts_read_disjoint_parts(digits, process_count):
  images, labels = digits
  expected = _scaled(images)
  shapes, counts = set(), []
  for p in range(process_count):
    # Eval keeps the order: host p reads examples p, p + P, p + 2P, ...
    real, batches = _eval_examples(
        _digits_config(), 128, process_index=p, process_count=process_count)
    np.testing.assert_array_equal(real['image'], expected[p::process_count])
    np.testing.assert_array_equal(real['label'], labels[p::process_count])
    shapes.add((len(batches),
                tuple(sorted((k, v.shape) for k, v in batches[0].items()))))
    counts.append(len(real['label']))
    # Training: one host epoch is exactly the host's part, shuffled.
    n = len(labels[p::process_count])
    got = _train_examples(_digits_config(), 97, n, process_index=p,
                          process_count=process_count)
    assert got['image'].shape == (n, 8, 8, 1)
    assert _rows(got['image'], got['label']) == _rows(
        expected[p::process_count], labels[p::process_count])
  assert sum(counts) == 1797
  assert len(shapes) == 1  # Same number and shape of batches on every host.


def test_random_flip(digits):
  images, _ = digits
  expected = _scaled(images)
  config = _digits_config(random_flip=True, shuffle_buffer=1)  # Keeps order.
  n = 2 * 1797
  got = _train_examples(config, 599, n, seed=7)['image']
  ref = np.concatenate([expected, expected])
  mirrored = ref[:, :, ::-1]
  same = np.all(got == ref, axis=(1, 2, 3))
  flipped = np.all(got == mirrored, axis=(1, 2, 3))
  assert np.all(same | flipped)  # Each image is either itself or mirrored.
  asymmetric = ~np.all(ref == mirrored, axis=(1, 2, 3))
  fraction = flipped[asymmetric].mean()
  assert 0.45 < fraction < 0.55, fraction
  # Flips are redrawn every epoch, not fixed per example.
  assert not np.array_equal(flipped[:1797], flipped[1797:])
  again = _train_examples(config, 599, n, seed=7)['image']
  np.testing.assert_array_equal(got, again)
  other = _train_examples(config, 599, n, seed=8)['image']
  assert not np.array_equal(got, other)


def test_no_flip_when_disabled(digits):
  images, _ = digits
  got = _train_examples(_digits_config(shuffle_buffer=1), 599, 1797)['image']
  np.testing.assert_array_equal(got, _scaled(images))


def test_eval_padding_and_mask(digits):
  images, labels = digits
  real, batches = _eval_examples(_digits_config(), 64)
  assert len(batches) == math.ceil(1797 / 64)
  for b in batches:
    assert b['image'].shape == (64, 8, 8, 1) and b['mask'].shape == (64,)
    assert b['mask'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 1797
  np.testing.assert_array_equal(mask[:1797], 1.0)
  np.testing.assert_array_equal(mask[1797:], 0.0)
  np.testing.assert_array_equal(batches[-1]['image'][1797 % 64:], 0.0)
  np.testing.assert_array_equal(real['image'], _scaled(images))
  np.testing.assert_array_equal(real['label'], labels)


def test_eval_hosts_get_equal_batch_counts(digits):
  del digits
  # 1797 = 899 + 898 and 898 = 2 * 449: host 0 needs a third batch, so host 1
  # must pad one more batch than it needs itself.
  results = [_eval_examples(_digits_config(), 449, process_index=p,
                            process_count=2) for p in range(2)]
  assert [len(b) for _, b in results] == [3, 3]
  np.testing.assert_array_equal(results[1][1][-1]['mask'], 0.0)
  assert [len(r['label']) for r, _ in results] == [899, 898]


# ---------------------------------------------------------------- folder


def _area_matrix(n, r):
  """Rows average the input pixels each output pixel covers (area resize)."""
  m = np.zeros((r, n))
  for i in range(r):
    lo, hi = i * n / r, (i + 1) * n / r
    for j in range(n):
      m[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
  return m / m.sum(1, keepdims=True)


def _bilinear_matrix(n, r):
  """Half-pixel-centred linear interpolation weights (upsampling)."""
  m = np.zeros((r, n))
  for i in range(r):
    x = min(max((i + 0.5) * n / r - 0.5, 0.0), n - 1)
    j = int(np.floor(x))
    k = min(j + 1, n - 1)
    m[i, j] += 1 - (x - j)
    m[i, k] += x - j
  return m


def _reference(array, resolution, channels):
  """Independent crop/resize/channel conversion of an HWC uint8 image."""
  h, w = array.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = array[top:top + side, left:left + side].astype(np.float64)
  if channels == 1 and crop.shape[-1] == 3:
    crop = crop @ np.array([0.2989, 0.5870, 0.1140])[:, None]
  if side == resolution:
    m = np.eye(side)
  elif side > resolution:
    m = _area_matrix(side, resolution)
  else:
    m = _bilinear_matrix(side, resolution)
  out = np.einsum('ij,jkc,lk->ilc', m, crop, m)
  return np.clip(out, 0, 255) / 127.5 - 1.0


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """Two class folders of PNG/JPEG files with known content and odd sizes."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  files = {  # relative path -> (PIL mode, height, width)
      'cats/a_wide.png': ('RGB', 12, 20),
      'cats/b_tall_gray.png': ('L', 18, 10),
      'cats/c_small.PNG': ('RGB', 5, 7),
      'cats/nested/d_exact.png': ('RGB', 8, 8),
      'dogs/e_photo.jpg': ('RGB', 16, 16),
      'dogs/f_gray.jpeg': ('L', 9, 13),
      'dogs/g_rgba.png': ('RGBA', 11, 11),
  }
  arrays = {}
  for name, (mode, h, w) in sorted(files.items()):
    channels = {'L': 1, 'RGB': 3, 'RGBA': 4}[mode]
    # Smooth content keeps JPEG error small; random on top for the PNGs.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([20 + yy * 6 + xx * 4 + 30 * c
                     for c in range(channels)], -1)
    if not name.endswith(('jpg', 'jpeg')):
      base = base + rng.integers(0, 40, base.shape)
    data = np.clip(base, 0, 255).astype(np.uint8)
    if channels == 4:
      data[..., 3] = 128  # Alpha is dropped, not blended.
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data[..., 0] if channels == 1 else data, mode).save(
        path, **({'quality': 95, 'subsampling': 0}
                 if name.endswith(('jpg', 'jpeg')) else {}))
    # The reference reads the file back, so JPEG loss is in both.
    arrays[name] = np.asarray(Image.open(path).convert('RGB'))
  (root / 'dogs' / 'notes.txt').write_text('not an image')
  return root, arrays


def _folder_config(root, **overrides):
  kwargs = dict(dataset='folder', folder=str(root), label_key='label',
                random_flip=False, shuffle_buffer=100, prefetch=1)
  kwargs.update(overrides)
  return _data_config(**kwargs)


@pytest.mark.parametrize('resolution,channels', [(8, 3), (8, 1), (10, 3)])
def test_folder_preprocessing(image_folder, resolution, channels):
  root, arrays = image_folder
  config = _folder_config(root, resolution=resolution, channels=channels)
  real, _ = _eval_examples(config, 4)
  names = sorted(arrays)  # Files are read in sorted path order.
  assert real['image'].shape == (len(names), resolution, resolution, channels)
  _assert_on_8bit_grid(real['image'])
  for image, name in zip(real['image'], names):
    # Eval images are rounded to the 8-bit grid: within half a level of the exact resize.
    tol = (3.5 if name.endswith(('jpg', 'jpeg')) else 0.5) / 127.5 + 1e-5
    np.testing.assert_allclose(
        image, _reference(arrays[name], resolution, channels), atol=tol,
        err_msg=name)
  np.testing.assert_array_equal(real['label'], [0, 0, 0, 0, 1, 1, 1])


def test_folder_grayscale_matches_pil(image_folder):
  root, arrays = image_folder
  config = _folder_config(root, resolution=8, channels=1)
  real, _ = _eval_examples(config, 8)
  name = 'cats/nested/d_exact.png'  # Lossless and already 8x8.
  pil_gray = np.asarray(Image.fromarray(arrays[name]).convert('L'), np.float32)
  np.testing.assert_allclose(real['image'][sorted(arrays).index(name), ..., 0],
                             pil_gray / 127.5 - 1.0, atol=1.01 / 127.5)


def test_folder_labels_and_metadata(image_folder):
  root, _ = image_folder
  assert pipeline.has_labels(_folder_config(root))
  assert pipeline.num_classes_of(_folder_config(root)) == 2
  unlabelled = _folder_config(root, label_key='')
  assert not pipeline.has_labels(unlabelled)
  real, batches = _eval_examples(unlabelled, 4)
  assert set(batches[0]) == {'image', 'mask'}
  assert len(real['image']) == 7


@pytest.mark.parametrize('process_count', [2, 3])
def test_folder_hosts_read_disjoint_parts(image_folder, process_count):
  root, arrays = image_folder
  config = _folder_config(root, resolution=8, channels=3)
  full, _ = _eval_examples(config, 4)
  parts, shapes = [], set()
  for p in range(process_count):
    real, batches = _eval_examples(config, 2, process_index=p,
                                   process_count=process_count)
    np.testing.assert_array_equal(real['image'], full['image'][p::process_count])
    np.testing.assert_array_equal(real['label'], full['label'][p::process_count])
    parts.append(real)
    shapes.add(tuple((len(batches),) + b['image'].shape for b in batches))
    train = pipeline.create_dataset(
        config, 2, split='train', seed=0, process_index=p,
        process_count=process_count)
    assert next(train.as_numpy_iterator())['image'].shape == (2, 8, 8, 3)
  assert len(shapes) == 1
  union = np.concatenate([r['image'] for r in parts])
  assert _rows(union) == _rows(full['image'])
  assert len(union) == len(arrays)


def test_folder_errors(tmp_path):
  missing = _folder_config(tmp_path / 'nope')
  with pytest.raises(ValueError, match='data.folder'):
    pipeline.create_dataset(missing, 2, split='train', seed=0,
                                  process_index=0, process_count=1)
  (tmp_path / 'empty' / 'sub').mkdir(parents=True)
  (tmp_path / 'empty' / 'sub' / 'readme.txt').write_text('x')
  with pytest.raises(ValueError, match='data.folder'):
    pipeline.create_dataset(_folder_config(tmp_path / 'empty'), 2,
                                  split='train', seed=0, process_index=0,
                                  process_count=1)


# ---------------------------------------------------------------- tfds


def test_tfds_cifar10_mocked():
  config = _data_config(dataset='cifar10', label_key='label', resolution=32,
                        channels=3, random_flip=False, shuffle_buffer=64)
  with tfds.testing.mock_data(num_examples=24):
    assert pipeline.num_classes_of(config) == 10
    raw = list(tfds.load('cifar10', split='test').as_numpy_iterator())
    real, batches = _eval_examples(config, 10, split='test')
    train = pipeline.create_dataset(
        config, 8, split='train', seed=0, process_index=0, process_count=1)
    batch = next(train.as_numpy_iterator())
  assert batch['image'].shape == (8, 32, 32, 3)
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert batch['image'].std() > 0.3  # Random uint8 data, not constant.
  assert len(batches) == 3 and batches[-1]['mask'].sum() == 4
  np.testing.assert_allclose(
      real['image'], _scaled(np.stack([r['image'] for r in raw])), atol=1e-6)
  np.testing.assert_array_equal(real['label'], [r['label'] for r in raw])


def test_tfds_mnist_mocked_upsampled():
  config = _data_config(dataset='mnist', label_key='label', resolution=32,
                        channels=1, random_flip=False)
  with tfds.testing.mock_data(num_examples=6):
    raw = list(tfds.load('mnist', split='train').as_numpy_iterator())
    real, _ = _eval_examples(config, 6)
  assert real['image'].shape == (6, 32, 32, 1)
  _assert_on_8bit_grid(real['image'])  # 28 -> 32 bilinear, then rounded.
  for image, example in zip(real['image'], raw):
    assert example['image'].shape == (28, 28, 1)
    np.testing.assert_allclose(image, _reference(example['image'], 32, 1),
                               atol=0.5 / 127.5 + 1e-5)


class InputPipelineTestImages(tfds.core.GeneratorBasedBuilder):
  """11 prepared examples whose pixel value encodes their index."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(6, 10, 3)),
            'label': tfds.features.ClassLabel(num_classes=5),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(11)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': np.full((6, 10, 3), 20 * i, np.uint8),
                'label': i % 5}


@pytest.fixture(scope='module')
def prepared_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('input_pipeline_test_images', data_dir=data_dir)\
      .download_and_prepare(download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return data_dir


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_tfds_hosts_read_disjoint_parts(prepared_tfds_dir, process_count):
  config = _data_config(dataset='input_pipeline_test_images',
                        data_dir=prepared_tfds_dir, label_key='label',
                        resolution=4, channels=3, random_flip=False)
  assert pipeline.num_classes_of(config) == 5
  indices, num_batches = [], set()
  for p in range(process_count):
    real, batches = _eval_examples(config, 2, process_index=p,
                                   process_count=process_count)
    num_batches.add(len(batches))
    index = np.round((real['image'][:, 0, 0, 0] + 1) * 127.5 / 20).astype(int)
    np.testing.assert_array_equal(real['label'], index % 5)
    indices.append(index)
  assert len(num_batches) == 1
  union = np.concatenate(indices)
  assert sorted(union) == list(range(11))  # Disjoint and complete.


def test_tfds_missing_dataset_raises(tmp_path):
  config = _data_config(dataset='cifar10', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='data.dataset') as error:
    pipeline.create_dataset(config, 2, split='train', seed=0,
                                  process_index=0, process_count=1)
  assert 'tfds build cifar10' in str(error.value)
  assert str(tmp_path) in str(error.value)
  assert not os.listdir(tmp_path)  # Nothing was downloaded or written.


# ---------------------------------------------------------------- to JAX


def test_global_batches_sharded_over_devices(digits):
  images, labels = digits
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  assert mesh.size == 8
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  ds = pipeline.create_dataset(_digits_config(), 16, split='train',
                                     seed=0, process_index=0, process_count=1,
                                     train=False)
  local = next(ds.as_numpy_iterator())
  batch = next(pipeline.global_batches(ds, sharding))
  assert set(batch) == {'image', 'label', 'mask'}
  for key, value in batch.items():
    assert isinstance(value, jax.Array)
    assert value.shape == local[key].shape
    assert value.sharding.is_equivalent_to(sharding, value.ndim)
    assert len(value.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(value), local[key])
    for shard in value.addressable_shards:
      assert shard.data.shape[0] == 2
      np.testing.assert_array_equal(np.asarray(shard.data),
                                    local[key][shard.index])
  np.testing.assert_array_equal(np.asarray(batch['image']),
                                _scaled(images[:16]))
  np.testing.assert_array_equal(np.asarray(batch['label']), labels[:16])


def test_digits_training_batches_are_numpy_and_host_count_independent(digits, monkeypatch):
  """The digits train stream is plain numpy (no tf.data), a pure function of (seed, step):
  two hosts' rows of step s assemble into the one-host batch of step s, and a stream started at
  step 5 continues the one started at step 0."""
  import itertools  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images, labels = digits
  config = _digits_config(random_flip=True, label_key='label')

  def no_tf_data(*args, **kwargs):
    raise AssertionError('the digits train stream must not build a tf.data pipeline')
  monkeypatch.setattr(tf.data.Dataset, 'from_generator', no_tf_data)
  monkeypatch.setattr(tf.data.Dataset, 'from_tensor_slices', no_tf_data)

  def stream(rows, start_step, count, process_index=0, process_count=1):
    ds = pipeline.step_indexed_dataset(
        config, 8, seed=3, start_step=start_step, rows=np.asarray(rows),
        process_index=process_index, process_count=process_count)
    return list(itertools.islice(ds, count))

  one = stream(range(8), 0, 8)
  assert all(isinstance(b['image'], np.ndarray) and b['image'].dtype == np.float32 for b in one)
  host0, host1 = stream([0, 1, 2, 3], 0, 8, 0, 2), stream([4, 5, 6, 7], 0, 8, 1, 2)
  for b, h0, h1 in zip(one, host0, host1):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(b[key], np.concatenate([h0[key], h1[key]]))
  late = stream(range(8), 5, 3)
  for b, c in zip(one[5:], late):
    np.testing.assert_array_equal(b['image'], c['image'])
  # Every example is a digit (maybe mirrored) with its own label, and about half are flipped.
  batch = np.concatenate([b['image'] for b in one])
  label = np.concatenate([b['label'] for b in one])
  scaled = _scaled(images)
  flipped = 0
  for x, y in zip(batch, label):
    same = np.all(scaled == x, axis=(1, 2, 3))
    mirrored = np.all(scaled[:, :, ::-1] == x, axis=(1, 2, 3))
    matches = np.flatnonzero(same | mirrored)
    assert matches.size and y in labels[matches]
    flipped += int(not same.any())
  assert 16 <= flipped <= 48  # 64 draws of a fair coin (symmetric digits count as unflipped).
  stacked = pipeline.step_indexed_dataset(config, 8, seed=3, start_step=0,
                                                rows=np.arange(8), steps_per_batch=2)
  first = next(iter(stacked))
  np.testing.assert_array_equal(first['image'], np.stack([one[0]['image'], one[1]['image']]))


# ---------------------------------------------------------------- 8-bit eval grid, center crop


def test_eval_images_lie_on_the_8bit_grid(digits):
  """Downsampled 8 -> 6 digits average pixels to fractions of a level: eval rounds them so the
  likelihood metrics score images of the discrete 8-bit data."""
  images, _ = digits
  real, _ = _eval_examples(_digits_config(resolution=6), 256)
  exact = np.stack([_reference(x, 6, 1) for x in images[:256]]) * 127.5 + 127.5
  assert np.abs(exact - np.round(exact)).max() > 0.1  # The resize really leaves the grid...
  _assert_on_8bit_grid(real['image'])  # ... and eval puts it back.
  # The nearest level (either one at float32 ties of x.5).
  np.testing.assert_allclose(real['image'][:256] * 127.5 + 127.5, exact, atol=0.5 + 1e-3)


def _write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def test_center_crop_matches_numpy(tmp_path, digits):
  """data.center_crop=6 on a 12x20 image keeps rows 3..8 and columns 7..12; resizing 6 -> 3
  averages 2x2 blocks. Checked on the training path (exact floats) and the eval path (rounded),
  and on a static-shape source (digits: crop 4 of 8x8 at resolution 4 = the central 4x4)."""
  rng = np.random.default_rng(1)
  array = rng.integers(0, 256, (12, 20, 3)).astype(np.uint8)
  _write_png(tmp_path / 'one' / 'a.png', array)
  config = _folder_config(tmp_path / 'one', label_key='', resolution=3, channels=3,
                          center_crop=6, prefetch=0)
  crop = array[3:9, 7:13].astype(np.float64)
  expected = crop.reshape(3, 2, 3, 2, 3).mean(axis=(1, 3))
  batch = next(iter(pipeline.step_indexed_dataset(
      config, 1, seed=0, start_step=0, rows=np.arange(1)).as_numpy_iterator()))
  np.testing.assert_allclose(batch['image'][0], expected / 127.5 - 1.0, atol=1e-5)
  real, _ = _eval_examples(config, 1)
  np.testing.assert_allclose(real['image'][0], np.round(expected) / 127.5 - 1.0, atol=1e-5)
  # Without a crop size the crop is the short side (rows 0..11, columns 4..15): not the same.
  full, _ = _eval_examples(_folder_config(tmp_path / 'one', label_key='', resolution=3), 1)
  assert not np.allclose(full['image'], real['image'])

  images, _ = digits
  real, _ = _eval_examples(_digits_config(resolution=4, center_crop=4), 64)
  np.testing.assert_allclose(real['image'], _scaled(images[:, 2:6, 2:6]), atol=1e-6)


def test_center_crop_larger_than_images_is_an_error(tmp_path, prepared_tfds_dir):
  # Static image shape (digits are 8x8): an error before any data is read.
  with pytest.raises(ValueError, match=r'data\.center_crop=9'):
    pipeline.create_dataset(_digits_config(center_crop=9), 4, split='train', seed=0,
                                  process_index=0, process_count=1, train=False)
  # Folders (sizes unknown until read): the first image that is too small names the field.
  _write_png(tmp_path / 'small' / 'a.png', np.zeros((5, 7, 3), np.uint8))
  config = _folder_config(tmp_path / 'small', label_key='', center_crop=6)
  ds = pipeline.step_indexed_dataset(config, 1, seed=0, start_step=0, rows=np.arange(1))
  with pytest.raises(Exception, match=r'data\.center_crop=6'):
    next(iter(ds.as_numpy_iterator()))
  # Validation knows the sizes of the digits and of tfds features of static shape (6x10 here).
  base = tiny.get_config()
  for dataset, data_dir, bad, good in (('digits', None, 9, 8),
                                       ('input_pipeline_test_images', prepared_tfds_dir, 7, 6)):
    base.data.dataset, base.data.data_dir = dataset, data_dir
    base.data.center_crop = bad
    with pytest.raises(ConfigError, match=rf'data\.center_crop={bad} is larger'):
      validate_config(base, mode='train')
    base.data.center_crop = good
    validate_config(base, mode='train')
  base.data.center_crop = -1
  with pytest.raises(ConfigError, match=r'data\.center_crop=-1 must be >= 0'):
    validate_config(base, mode='sample')


# ---------------------------------------------------------------- tfds random access


class InputPipelineTestRamps(tfds.core.GeneratorBasedBuilder):
  """13 prepared examples: a horizontal ramp (so flips show) offset by 10 x their key."""

  VERSION = tfds.core.Version('1.0.0')
  NUM = 13

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(6, 10, 3)),
            'label': tfds.features.ClassLabel(num_classes=5),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    yy, xx, cc = np.mgrid[0:6, 0:10, 0:3]
    for i in range(self.NUM):
      yield i, {'image': (10 * i + 3 * xx + 2 * yy + cc).astype(np.uint8), 'label': i % 5}


@pytest.fixture(scope='module')
def array_record_dir(tmp_path_factory):
  """The ramps prepared as ArrayRecord (random access) and, in another dir, as TFRecord."""
  root = tmp_path_factory.mktemp('tfds_formats')
  for file_format in ('array_record', 'tfrecord'):
    tfds.builder('input_pipeline_test_ramps', data_dir=str(root / file_format),
                 file_format=file_format).download_and_prepare(
                     download_config=tfds.download.DownloadConfig(
                         compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return root


def _ramps_config(root, file_format='array_record', **overrides):
  kwargs = dict(dataset='input_pipeline_test_ramps', data_dir=str(root / file_format),
                label_key='label', resolution=6, channels=3, random_flip=True, prefetch=1)
  kwargs.update(overrides)
  return _data_config(**kwargs)


def _steps(config, global_batch, rows, start_step, count, seed=5, **kwargs):
  ds = pipeline.step_indexed_dataset(config, global_batch, seed=seed,
                                           start_step=start_step, rows=np.asarray(rows),
                                           **kwargs)
  return list(ds.take(count).as_numpy_iterator())


def test_tfds_array_record_order_is_host_count_independent(array_record_dir, tmp_path):
  """One process and two (rows 0-1 / 2-3 of a global batch of 4) assemble the same global
  batches, in the order `_step_indices` defines, with the records' labels; the images are the
  same as those of an image folder holding the same records (shared preprocessing and flips)."""
  config = _ramps_config(array_record_dir)
  builder = tfds.builder('input_pipeline_test_ramps', data_dir=config.data_dir)
  assert builder.info.file_format.value == 'array_record'
  source = builder.as_data_source('train')
  records = [source[i] for i in range(len(source))]
  raw = np.stack([r['image'] for r in records])
  labels = np.asarray([r['label'] for r in records])
  ref = _scaled(raw[:, :, 2:8])  # Centered 6x6 crop of 6x10 at resolution 6: no resize.

  steps = 7  # 28 positions: crosses the epoch boundaries at 13 and 26.
  one = _steps(config, 4, range(4), 0, steps)
  two = [_steps(config, 4, rows, 0, steps, process_index=p, process_count=2)
         for p, rows in enumerate(([0, 1], [2, 3]))]
  order = pipeline._step_indices(13, 4, np.arange(4), seed=5, start_step=0)
  flips = 0
  for s in range(steps):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(one[s][key],
                                    np.concatenate([two[0][s][key], two[1][s][key]]))
    index = np.asarray([next(order)[1] for _ in range(4)])
    np.testing.assert_array_equal(one[s]['label'], labels[index])
    for x, i in zip(one[s]['image'], index):
      same, mirrored = np.allclose(x, ref[i], atol=1e-6), np.allclose(x, ref[i][:, ::-1],
                                                                       atol=1e-6)
      assert same or mirrored
      flips += mirrored
  assert 4 <= flips <= 24  # 28 fair coins.
  # A late start continues the same stream.
  late = _steps(config, 4, range(4), 5, 2)
  for a, b in zip(one[5:], late):
    np.testing.assert_array_equal(a['image'], b['image'])
  # Record k as the k-th file of a folder: the folder path yields the same batches.
  for k, image in enumerate(raw):
    _write_png(tmp_path / 'records' / f'{k:03d}.png', image)
  folder = _folder_config(tmp_path / 'records', label_key='', resolution=6, random_flip=True)
  for a, b in zip(one, _steps(folder, 4, range(4), 0, steps)):
    np.testing.assert_array_equal(a['image'], b['image'])
  # Unlabelled: no 'label' key.
  unlabelled = _steps(_ramps_config(array_record_dir, label_key=''), 4, range(4), 0, 1)
  assert set(unlabelled[0]) == {'image'}
  np.testing.assert_array_equal(unlabelled[0]['image'], one[0]['image'])


def test_tfds_array_record_resume_reads_only_what_it_uses(array_record_dir, monkeypatch):
  """Resuming at step 10_000 decodes exactly as many examples as resuming at step 1: the records
  of the batches it yields, from the start step on (counted on the wrapped data source; the
  streaming path would read and decode 10_000 x 4 records to skip them)."""
  opened = []

  class Counting:
    def __init__(self, source):
      self.source, self.reads = source, []

    def __len__(self):
      return len(self.source)

    def __getitem__(self, index):
      self.reads.append(int(index))
      return self.source[index]

    def __getitems__(self, indices):
      self.reads.extend(int(i) for i in indices)
      return self.source.__getitems__(indices)

  real_open = tfds_source._open_data_source

  def counting_open(*args, **kwargs):
    opened.append(Counting(real_open(*args, **kwargs)))
    return opened[-1]

  monkeypatch.setattr(tfds_source, '_open_data_source', counting_open)
  config = _ramps_config(array_record_dir, random_flip=False, prefetch=0)
  rows, taken = np.arange(4), 3

  # The reader behind the tf.data stream: exactly `taken` batches read for `taken` batches.
  exact = {}
  for start in (1, 10_000):
    source = tfds_source.indexed(config, 'train')
    records = pipeline._indexed_records(source, 4, rows, seed=5, start_step=start)
    got = [next(records) for _ in range(4 * taken)]
    order = pipeline._step_indices(13, 4, rows, seed=5, start_step=start)
    expected = [next(order) for _ in range(4 * taken)]
    assert opened[-1].reads == [index for _, index in expected]
    assert [int(r['position']) for r in got] == [p for p, _ in expected]
    exact[start] = len(opened[-1].reads)
  assert exact[1] == exact[10_000] == 4 * taken

  # The whole pipeline: reads whole host batches in stream order from the start step; how far
  # tf.data reads ahead (a few batches), not the start step, sets how many.
  counts = {}
  for start in (1, 10_000):
    batches = _steps(config, 4, rows, start, taken)
    reads = opened[-1].reads
    assert len(reads) % 4 == 0
    order = pipeline._step_indices(13, 4, rows, seed=5, start_step=start)
    assert reads == [next(order)[1] for _ in reads]
    labels = np.concatenate([b['label'] for b in batches])
    np.testing.assert_array_equal(labels, np.asarray(
        [opened[-1].source[i]['label'] for i in reads[:4 * taken]]))
    counts[start] = len(reads)
  for count in counts.values():
    assert 4 * taken <= count <= 4 * (taken + 32), counts


def test_tfds_tfrecord_fallback_streams_and_warns(array_record_dir, monkeypatch):
  """A TFRecord-only dataset keeps the tf.data stream (start step = skipped batches) and
  warns once with the command that makes resume O(1)."""
  warnings = []
  monkeypatch.setattr(tfds_source, '_WARNED_SEQUENTIAL', set())
  monkeypatch.setattr(tfds_source.logging, 'warning',
                      lambda msg, *args: warnings.append(msg % args))
  opened = []
  monkeypatch.setattr(tfds_source, '_open_data_source',
                      lambda *a, **k: opened.append(a))
  config = _ramps_config(array_record_dir, 'tfrecord', random_flip=False, shuffle_buffer=1)
  first = _steps(config, 4, range(4), 0, 5)
  resumed = _steps(config, 4, range(4), 3, 2)
  assert not opened  # No random access attempted.
  assert len(warnings) == 1
  assert 'tfds build input_pipeline_test_ramps' in warnings[0]
  assert '--file_format=array_record' in warnings[0]
  for a, b in zip(first[3:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # Labels travel with their images: the ramp's corner is 10 x key and label = key % 5.
  for batch in first:
    key = np.round((batch['image'][:, 0, 0, 0] + 1) * 127.5 - 6) / 10  # Crop starts at x = 2.
    np.testing.assert_array_equal(batch['label'], key.astype(int) % 5)
