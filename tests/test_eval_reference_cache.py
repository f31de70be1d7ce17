"""The cache of data.split's reference features is keyed by everything that changes them: each
field that changes the reference images (or how Inception sees them) is another cache file, and
fields that do not are the same file, read without computing anything again."""

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from diffusion_jax.evaluation import feature_sets, sample_metrics

CHECKSUM = 'ab' * 32


def _pixel_features(batch):
  return {'pool3': np.asarray(batch).reshape(len(batch), -1)[:, :6].astype(np.float64)}


@pytest.fixture
def reads(monkeypatch):
  """The configs whose data.split was read (the images are stand-ins: the key is tested)."""
  calls = []

  def fake_dataset_batches(config, split, batch_size, limit, mesh):
    del batch_size, limit, mesh
    calls.append((config.data.dataset, split))
    yield np.random.default_rng(len(calls)).integers(0, 256, size=(10, 8, 8, 1), dtype=np.uint8)

  monkeypatch.setattr(sample_metrics, '_dataset_batches', fake_dataset_batches)
  return calls


def _config(tmp_path):
  config = tiny.get_config()
  config.eval.update(fid_stats_dir=str(tmp_path / 'stats'), num_kept_features=4)
  return config


def _reference(config, tmp_path, checksum=CHECKSUM):
  return sample_metrics.reference_features(config, str(tmp_path / 'run'), _pixel_features,
                                           checksum, 4, None)[1]


# (field, another value): each changes the reference images or Inception's view of them.
KEY_FIELDS = [
    ('data.dataset', 'mnist'), ('data.data_dir', '/elsewhere/tfds'), ('data.split', 'test'),
    ('data.resolution', 16), ('data.center_crop', 6), ('data.channels', 3),
    ('data.image_key', 'picture'), ('eval.reference_num_images', 5),
    ('eval.fid_resize', 'torch_bilinear'),
]
# Fields the reference images do not depend on.
OTHER_FIELDS = [('data.label_key', 'label'), ('data.random_flip', False),
                ('eval.num_samples', 7), ('data.eval_split', 'validation')]


def test_each_field_of_the_reference_is_its_own_cache_file(tmp_path, reads):
  config = _config(tmp_path)
  base = _reference(config, tmp_path)
  assert len(reads) == 1
  paths = {base}
  for field, value in KEY_FIELDS:
    section, name = field.split('.')
    old = config[section][name]
    config[section][name] = value
    path = _reference(config, tmp_path)
    assert path not in paths, field  # A new file, computed from the images.
    assert len(reads) == len(paths) + 1, field
    paths.add(path)
    config[section][name] = old
    assert _reference(config, tmp_path) == base and len(reads) == len(paths), field
  for field, value in OTHER_FIELDS:
    section, name = field.split('.')
    config[section][name] = value
    assert _reference(config, tmp_path) == base and len(reads) == len(paths), field
  assert sorted(p.name for p in (tmp_path / 'stats').iterdir()) == sorted(
      p.split('/')[-1] for p in paths)


def test_the_inception_checksum_is_keyed_in_full(tmp_path, reads):
  config = _config(tmp_path)
  first = _reference(config, tmp_path, 'ab' * 32)
  other = _reference(config, tmp_path, 'ab' * 31 + 'ac')  # Differs in the last hex digit only.
  assert first != other and len(reads) == 2
  assert _reference(config, tmp_path, 'ab' * 32) == first and len(reads) == 2
  key = sample_metrics.reference_cache_key(config, 'ab' * 32)
  assert key['inception_sha256'] == 'ab' * 32
  assert feature_sets.read_stats_info(first, 'cache_key') == feature_sets.cache_key_json(key)


def test_a_file_holding_another_key_is_computed_again(tmp_path, reads):
  config = _config(tmp_path)
  path = _reference(config, tmp_path)
  stale = feature_sets.load_stats_file(path)
  feature_sets.save_feature_set(path, stale, cache_key='{"center_crop": 99}')
  assert _reference(config, tmp_path) == path and len(reads) == 2
  assert feature_sets.read_stats_info(path, 'cache_key') == feature_sets.cache_key_json(
      sample_metrics.reference_cache_key(config, CHECKSUM))
  assert _reference(config, tmp_path) == path and len(reads) == 2


def test_a_folder_with_other_files_is_another_reference(tmp_path, reads):
  folder = tmp_path / 'images'
  folder.mkdir()
  for i in range(3):
    Image.fromarray(np.full((8, 8), i, np.uint8)).save(folder / f'{i}.png')
  config = _config(tmp_path)
  config.data.update(dataset='folder', folder=str(folder))
  first = _reference(config, tmp_path)
  assert _reference(config, tmp_path) == first and len(reads) == 1
  Image.fromarray(np.full((8, 8), 9, np.uint8)).save(folder / '3.png')  # An image added.
  added = _reference(config, tmp_path)
  assert added != first and len(reads) == 2
  noise = np.random.default_rng(0).integers(0, 256, size=(8, 8), dtype=np.uint8)
  Image.fromarray(noise).save(folder / '3.png')  # Replaced by another image (another size).
  assert _reference(config, tmp_path) not in (first, added) and len(reads) == 3
  (folder / '3.png').unlink()
  assert _reference(config, tmp_path) == first and len(reads) == 3
