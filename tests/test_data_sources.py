"""The data source registry (diffusion_jax/data/sources.py): a new source is one module of the
protocol in data/base.py plus one registry entry, and the pipeline and the config checks read it
without any other change."""

import ast
import itertools
import pathlib
import types

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.data import base, digits, folder, pipeline, sources, tfds_source
from diffusion_jax.modes.validation import validate_config

DATA = pathlib.Path(__file__).resolve().parents[1] / 'diffusion_jax' / 'data'
NUM, HEIGHT, WIDTH = 7, 6, 9


def _ramps() -> tuple[np.ndarray, np.ndarray]:
  """NUM RGB images 6x9: a ramp offset by 20 x their index (so flips and crops show)."""
  yy, xx, cc = np.mgrid[0:HEIGHT, 0:WIDTH, 0:3]
  images = np.stack([20 * i + 3 * xx + 2 * yy + 5 * cc for i in range(NUM)]).astype(np.uint8)
  return images, (np.arange(NUM) % 3).astype(np.int32)


def _toy_source():
  """A source defined here: NUM labelled images read by index, as `base.Source` asks."""
  images, labels = _ramps()

  def indexed(data_config, split):
    del data_config, split

    def read(indices):
      index = np.asarray(indices, np.int64)
      return {'pixels': images[index], 'label': labels[index]}

    signature = {'pixels': tf.TensorSpec((HEIGHT, WIDTH, 3), tf.uint8),
                 'label': tf.TensorSpec([], tf.int32)}
    return base.IndexedSource(NUM, read, signature, lambda record: record['pixels'])

  def check(data_config):
    if data_config.label_key == 'label':
      return []
    return [f"data.label_key={data_config.label_key!r}: data.dataset='toy_ramps' needs 'label'."]

  return types.SimpleNamespace(
      NAME='toy_ramps', has_labels=lambda data_config: True,
      num_classes=lambda data_config: 3, image_size=lambda data_config: (HEIGHT, WIDTH),
      indexed=indexed, check=check)


@pytest.fixture
def toy():
  source = _toy_source()
  sources.register(source)
  try:
    yield source
  finally:
    sources.unregister(source.NAME)


def _toy_config(**overrides):
  config = tiny.get_config()
  config.data.dataset = 'toy_ramps'
  config.data.label_key = 'label'
  config.data.update(overrides)
  return config


def test_the_registry_dispatches_every_name():
  assert sources.names() == ('digits', 'folder')
  for name, module in (('digits', digits), ('folder', folder), ('cifar10', tfds_source),
                       ('imagenet_resized/64x64', tfds_source)):
    assert sources.source_of(types.SimpleNamespace(dataset=name)) is module
  for module in (digits, folder, tfds_source):
    for attr in base.REQUIRED[1:]:
      assert callable(getattr(module, attr)), (module, attr)
  assert not hasattr(digits, 'streamed') and not hasattr(folder, 'streamed')
  assert callable(tfds_source.streamed)  # No random access for TFRecord files: streamed.


def test_register_rejects_incomplete_sources_and_built_in_names():
  with pytest.raises(ValueError, match='lacks'):
    sources.register(types.SimpleNamespace(NAME='half', has_labels=lambda c: True))
  with pytest.raises(ValueError, match='already registered'):
    sources.register(types.SimpleNamespace(**{**vars(_toy_source()), 'NAME': 'digits'}))
  with pytest.raises(ValueError, match='built-in'):
    sources.unregister('folder')
  assert sources.names() == ('digits', 'folder')


def test_sources_import_no_tensorflow_at_module_level():
  """The registry and the config checks import every source, and `--mode=sample` imports the
  checks: only pipeline.py may import TensorFlow at the top (the others, where they read)."""
  for path in sorted(DATA.glob('*.py')):
    if path.name == 'pipeline.py':
      continue
    tree = ast.parse(path.read_text())
    for node in tree.body:  # Module level only (`if TYPE_CHECKING:` blocks are not run).
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'sklearn')
                     for n in names), f'{path.name}:{node.lineno} imports {names}'


def test_a_registered_source_trains_and_validates(toy):
  """The toy source, registered, feeds the step-indexed order (resume, host rows, flips,
  labels), the global batches, the evaluation pass, and validate_config; unregistered, its name
  is an unknown dataset again."""
  images, labels = _ramps()
  crop = images[:, :, 1:7].astype(np.float32) / 127.5 - 1.0  # Centered 6x6 of 6x9.
  data = _toy_config(resolution=6, channels=3, random_flip=True, prefetch=1).data
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))

  def steps(start, count, rows=range(8), process_index=0, process_count=1):
    ds = pipeline.step_indexed_dataset(data, 8, seed=5, start_step=start, rows=np.asarray(rows),
                                       process_index=process_index, process_count=process_count)
    return list(ds.take(count).as_numpy_iterator())

  stream = pipeline.step_indexed_dataset(data, 8, seed=5, start_step=0, rows=np.arange(8))
  one = list(itertools.islice(pipeline.global_batches(stream, sharding), 3))  # 24 of 7 examples.
  order = pipeline._step_indices(NUM, 8, np.arange(8), seed=5, start_step=0)
  flips = 0
  for batch in one:
    assert batch['image'].shape == (8, 6, 6, 3) and batch['image'].dtype == np.float32
    assert batch['image'].sharding.is_equivalent_to(sharding, 4)
    index = np.asarray([next(order)[1] for _ in range(8)])
    np.testing.assert_array_equal(np.asarray(batch['label']), labels[index])
    for x, i in zip(np.asarray(batch['image']), index):
      mirrored = np.allclose(x, crop[i][:, ::-1], atol=1e-6)
      assert mirrored or np.allclose(x, crop[i], atol=1e-6)
      flips += mirrored
  assert 4 <= flips <= 20  # 24 fair coins.
  late = steps(1, 2)
  halves = [steps(0, 3, rows, p, 2) for p, rows in enumerate((range(4), range(4, 8)))]
  for s, batch in enumerate(one):
    if s:
      np.testing.assert_array_equal(late[s - 1]['image'], np.asarray(batch['image']))
    np.testing.assert_array_equal(
        np.concatenate([halves[0][s]['label'], halves[1][s]['label']]), batch['label'])

  # Evaluation: one ordered pass per host (p, p + P, ...) read through `indexed`.
  for p in range(2):
    ds = pipeline.create_dataset(data, 2, split='train', seed=0, process_index=p,
                                 process_count=2, train=False)
    got = list(ds.as_numpy_iterator())
    mask = np.concatenate([b['mask'] for b in got]) == 1
    np.testing.assert_allclose(np.concatenate([b['image'] for b in got])[mask], crop[p::2],
                               atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in got])[mask], labels[p::2])
  assert pipeline.has_labels(data) and pipeline.num_classes_of(data) == 3
  assert pipeline.image_size_of(data) == (HEIGHT, WIDTH)

  validate_config(_toy_config(), 'train', num_devices=1, num_processes=1)
  conditional = _toy_config()
  conditional.model.num_classes = 3
  validate_config(conditional, 'train', num_devices=1, num_processes=1)
  for overrides, message in (({'center_crop': 7}, r'data\.center_crop=7 is larger than the 6x9'),
                             ({'label_key': 'y'}, r"data\.label_key='y': data\.dataset='toy")):
    with pytest.raises(ConfigError, match=message):
      validate_config(_toy_config(**overrides), 'train', num_devices=1, num_processes=1)
  conditional.model.num_classes = 4
  with pytest.raises(ConfigError, match="data.dataset='toy_ramps' has 3 classes"):
    validate_config(conditional, 'train', num_devices=1, num_processes=1)

  sources.unregister('toy_ramps')
  with pytest.raises(ConfigError, match=r"data\.dataset='toy_ramps' is neither \('digits', "
                                        r"'folder'\) nor a tensorflow-datasets name"):
    validate_config(_toy_config(), 'train', num_devices=1, num_processes=1)
