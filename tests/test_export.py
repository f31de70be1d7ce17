"""`--mode=export` and `diffusion_jax.serving`: the exported sampler reproduces --mode=sample.

The run is test_sampling_cli.py's tiny class-conditional U-Net with random parameters saved
as checkpoint 1, plus a config.json written before the `export` config section existed (so
main.py must take that section from --config). The export goes through the real command line;
the exported sampler is then loaded in a fresh Python process that must not import the model,
diffusion or sampler code, and its images are compared bit for bit with --mode=sample's
(sample_mode.generate) and with the float output of the sample function --mode=sample compiles
(sampler.make_sample_fn). Both run on one device, as the exported sampler does: sharded over
the 8 virtual CPU devices XLA computes each device's slice of the batch with other kernels,
which changes the last bit of some floats (see README, "Export a sampler").
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

import test_main  # pylint: disable=g-bad-import-order
import test_sampling_cli as tsc
from test_main import cli_env  # pylint: disable=unused-import  (a fixture)

from diffusion_jax.training import checkpoints
from diffusion_jax.training import restore
from diffusion_jax.sampling import class_labels
from diffusion_jax.serving import export
from diffusion_jax.nn import backbones
from diffusion_jax.config import run_config
from diffusion_jax.modes import export as export_mode
from diffusion_jax.modes import sample as sample_mode
from diffusion_jax.pipelines import sampler
from diffusion_jax import serving
from diffusion_jax.parallel import sharding
from diffusion_jax.config.errors import ConfigError

SEED = 5
# ddim with eta > 0 draws noise inside the loop; guidance doubles the batch through the network;
# dynamic thresholding takes a per-example quantile: all of it over the symbolic batch.
SAMPLE_FIELDS = {'sampler': 'ddim', 'steps': 4, 'eta': 0.5, 'guidance_scale': 2.0,
                 'thresholding': 'dynamic', 'class_labels': '3,7,1', 'seed': SEED}
FORBIDDEN = ('diffusion_jax.nn', 'diffusion_jax.sampling', 'diffusion_jax.processes',
             'diffusion_jax.objectives', 'diffusion_jax.pipelines', 'diffusion_jax.training',
             'flax')


def _config():
  config = tsc._config(tsc.NUM_CLASSES)  # pylint: disable=protected-access
  for field, value in SAMPLE_FIELDS.items():
    config.sample[field] = value
  return config


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory, cli_env):  # pylint: disable=redefined-outer-name
  """(workdir, export folder) written by `main.py --mode=export` on a tiny random run."""
  workdir = tmp_path_factory.mktemp('export_run')
  config = tsc._config(tsc.NUM_CLASSES)  # pylint: disable=protected-access
  tsc._save_random_checkpoint(config, str(workdir))  # pylint: disable=protected-access
  saved = json.loads(run_config.config_to_json(config))
  del saved['export']  # A run trained before the export section existed.
  run_config.config_path(str(workdir)).write_text(json.dumps(saved))
  overrides = [f'--config.sample.{k}={v}' for k, v in SAMPLE_FIELDS.items()]
  proc = test_main.run_cli(cli_env, f'--workdir={workdir}', '--mode=export',
                           f'--config.model.num_classes={tsc.NUM_CLASSES}', *overrides)
  assert proc.returncode == 0, test_main._tail(proc)  # pylint: disable=protected-access
  found = re.search(r'Exported sampler written to (\S+)', proc.stdout)
  assert found, test_main._tail(proc)  # pylint: disable=protected-access
  return str(workdir), found.group(1)


_SERVE_SCRIPT = """
import sys
import numpy as np
from diffusion_jax import serving
sampler = serving.load(sys.argv[1])
seed = int(sys.argv[3])
out = {'b8_0': sampler.sample(8, seed, batch_index=0),
       'b8_1': sampler.sample(8, seed, batch_index=1),
       'b16': sampler.sample(16, seed),
       'b16_float': sampler.sample(16, seed, as_uint8=False),
       'labels16': sampler.default_labels(16)}
forbidden = [m for m in sys.argv[4].split(',') if m in sys.modules]
assert not forbidden, forbidden
np.savez(sys.argv[2], **out)
print('modules', sorted(m for m in sys.modules if m.startswith('diffusion_jax')))
"""


def test_exported_sampler_in_a_fresh_process_matches_sample_mode(export_dir, cli_env, tmp_path):  # pylint: disable=redefined-outer-name
  """Batch sizes 8 (batches 0 and 1) and 16 give --mode=sample's uint8 samples bit for bit; the
  float32 images in [-1, 1] are those of the function --mode=sample compiles to 1e-6 (two XLA
  compilations of one program may round the eps-from-clipped-x0 division differently)."""
  workdir, out_dir = export_dir
  served = tmp_path / 'served.npz'
  # The fresh process runs while this one computes the references.
  proc = subprocess.Popen([sys.executable, '-c', _SERVE_SCRIPT, out_dir, str(served), str(SEED),
                           ','.join(FORBIDDEN)], cwd=str(tmp_path), env=cli_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    want_uint8, want_labels, want_uint8_16, want_float = _sample_mode_references(workdir)
    stdout, stderr = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, f'stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}'
  assert "'diffusion_jax.serving'" in stdout
  got = dict(np.load(served))
  np.testing.assert_array_equal(np.concatenate([got['b8_0'], got['b8_1']]), want_uint8)
  np.testing.assert_array_equal(got['labels16'], want_labels)  # 3, 7, 1, 3, ... by index.
  assert len(np.unique(want_uint8.reshape(16, -1), axis=0)) == 16
  assert got['b16_float'].dtype == np.float32 and want_float.dtype == np.float32
  np.testing.assert_array_equal(got['b16'], want_uint8_16)
  np.testing.assert_allclose(got['b16_float'], want_float, rtol=0, atol=1e-6)


def _sample_mode_references(workdir: str):
  """(samples.npz's images and labels of --mode=sample with batch 8 and 16 samples, its images
  with batch 16, and the float images of the sample function --mode=sample compiles for a batch
  of 16), on one device."""
  # --mode=sample with batch 8: two batches, keys fold_in(PRNGKey(5), 0) and (.., 1).
  config = _config()
  config.sample.batch_size, config.sample.num_samples = 8, 16
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
  with np.load(str(sample_mode.generate(config, workdir, mesh) / 'samples.npz')) as data:
    arr_0, arr_1 = data['arr_0'], data['arr_1']

  # Batch 16: --mode=sample's images, and the float images of the function it compiles.
  config.sample.batch_size = 16
  with np.load(str(sample_mode.generate(config, workdir, mesh) / 'samples.npz')) as data:
    arr_0_16 = data['arr_0']
  params, _ = restore.restore_params(config, workdir, mesh, use_ema=True)
  sample_fn = sampler.make_sample_fn(backbones.create_model(config.model, config.data.channels),
                                     config, mesh, 16)
  labels = class_labels.labels_for(np.arange(16), np.array([3, 7, 1]), tsc.NUM_CLASSES)
  want = np.asarray(sample_fn(params, jax.random.fold_in(jax.random.PRNGKey(SEED), 0), labels))
  return arr_0, arr_1, arr_0_16, want


def test_card_weights_and_symbolic_inputs(export_dir):  # pylint: disable=redefined-outer-name
  """The card's checksums, step and sampler; the weights are the checkpoint's EMA params and an
  input of the artifact (not constants), whose batch dimension is symbolic."""
  workdir, out_dir = export_dir
  out = epath.Path(out_dir)
  assert out.parent == epath.Path(workdir) / 'export'
  card = json.loads((out / export.CARD_FILE).read_text())
  for name in (export.ARTIFACT_FILE, export.WEIGHTS_FILE):
    assert card['files'][name]['sha256'] == hashlib.sha256((out / name).read_bytes()).hexdigest()
  assert card['step'] == 1 and card['use_ema'] is True
  assert card['platforms'] == ['cpu', 'cuda', 'tpu']  # configs/default.py's export.platforms.
  assert {k: card['sampler'][k] for k in SAMPLE_FIELDS} == SAMPLE_FIELDS
  assert card['config']['model']['num_classes'] == tsc.NUM_CLASSES
  assert card['labels'] == {'num_classes': tsc.NUM_CLASSES, 'class_labels': [3, 7, 1]}
  assert card['outputs']['images']['shape'] == ['b', 8, 8, 1]

  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  weights = safetensors_numpy.load_file(str(out / export.WEIGHTS_FILE))
  config = _config()
  ema, _ = restore.restore_params(config, workdir, sharding.create_mesh(config.mesh), True)
  want = {'/'.join(str(k.key) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(ema)}
  assert sorted(weights) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(weights[name], value, err_msg=name)

  exported = jax.export.deserialize(bytearray((out / export.ARTIFACT_FILE).read_bytes()))
  assert len(exported.in_avals) == len(want) + 2  # Every weight, the key and the labels.
  assert str(exported.in_avals[-1].shape[0]) == 'b'
  assert str(exported.out_avals[0].shape[0]) == 'b'
  assert tuple(exported.platforms) == ('cpu', 'cuda', 'tpu')


@pytest.mark.parametrize('name', [serving.WEIGHTS_FILE, serving.ARTIFACT_FILE])
def test_a_tampered_file_is_refused(export_dir, tmp_path, name):  # pylint: disable=redefined-outer-name
  """One changed byte in the weights (or the artifact) fails the card's checksum, naming it."""
  copy = tmp_path / 'export'
  shutil.copytree(export_dir[1], copy)
  data = bytearray((copy / name).read_bytes())
  data[len(data) // 2] ^= 1
  (copy / name).write_bytes(bytes(data))
  with pytest.raises(serving.ChecksumError, match=re.escape(str(copy / name))):
    serving.load(copy)
  os.remove(copy / name)
  with pytest.raises(FileNotFoundError, match=re.escape(name)):
    serving.load(copy)


def _copy_with_card(export_dir, tmp_path, edit):  # pylint: disable=redefined-outer-name
  """A copy of the export folder whose card.json `edit(card)` changed (the checksums hold)."""
  copy = tmp_path / 'edited'
  shutil.copytree(export_dir[1], copy)
  card = json.loads((copy / serving.CARD_FILE).read_text())
  edit(card)
  (copy / serving.CARD_FILE).write_text(json.dumps(card))
  return copy


def _no_deserialize(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('deserialized before the card was checked')
  monkeypatch.setattr(jax.export, 'deserialize', refuse)


@pytest.mark.parametrize('offset', [1, -1])
def test_a_calling_convention_this_jax_cannot_run_is_refused(export_dir, tmp_path, monkeypatch,
                                                             offset):  # pylint: disable=redefined-outer-name
  """A version above what this JAX runs asks for a newer jax, one below for a new export; both
  name the versions, before anything is deserialized."""
  low = jax.export.minimum_supported_calling_convention_version
  high = jax.export.maximum_supported_calling_convention_version
  version = high + 1 if offset > 0 else low - 1

  def edit(card):
    card['calling_convention_version'] = version
    card['jax_version'] = '9.9.9' if offset > 0 else '0.4.1'
  copy = _copy_with_card(export_dir, tmp_path, edit)
  _no_deserialize(monkeypatch)
  with pytest.raises(serving.IncompatibleExportError) as e:
    serving.load(copy)
  message = str(e.value)
  assert f'calling convention version {version}' in message and f'{low}..{high}' in message
  assert jax.__version__ in message
  assert ('pip install jax==9.9.9' in message if offset > 0
          else 'export the run again' in message and '0.4.1' in message)


def test_another_prng_implementation_is_refused(export_dir, tmp_path, monkeypatch):  # pylint: disable=redefined-outer-name
  copy = _copy_with_card(export_dir, tmp_path, lambda card: card['rng'].update(prng_impl='rbg'))
  _no_deserialize(monkeypatch)
  with pytest.raises(serving.IncompatibleExportError,
                     match=r"jax_default_prng_impl='rbg'.*'threefry2x32'.*jax_default_prng_impl"):
    serving.load(copy)


def test_another_jax_version_that_runs_it_loads_with_a_warning(export_dir, tmp_path):  # pylint: disable=redefined-outer-name
  """Only the jax version differs: a warning naming both, and the same images."""
  import warnings  # pylint: disable=g-import-not-at-top
  copy = _copy_with_card(export_dir, tmp_path, lambda card: card.update(jax_version='0.4.99'))
  with pytest.warns(serving.JaxVersionWarning,
                    match=r'jax 0\.4\.99, loaded by jax ' + re.escape(jax.__version__)):
    edited = serving.load(copy)
  with warnings.catch_warnings():
    warnings.simplefilter('error', serving.JaxVersionWarning)  # Its own version: no warning.
    original = serving.load(export_dir[1])
  np.testing.assert_array_equal(edited.sample(2, seed=SEED), original.sample(2, seed=SEED))
  for edit in (lambda card: card.pop('calling_convention_version'),
               lambda card: card['rng'].pop('prng_impl')):
    with pytest.raises(ValueError, match='has no (calling_convention_version|rng.prng_impl)'):
      serving.load(_copy_with_card(export_dir, tmp_path / str(id(edit)), edit))


def test_bad_platform_and_missing_checkpoint_write_nothing(export_dir, tmp_path):  # pylint: disable=redefined-outer-name
  """An unknown platform is a ConfigError naming export.platforms; an empty workdir a
  NoCheckpointError; neither lowers anything or writes an export folder."""
  workdir, _ = export_dir
  before = sorted(p.name for p in (epath.Path(workdir) / 'export').iterdir())
  config = _config()
  config.export.platforms = ('cpu', 'gpu')
  with pytest.raises(ConfigError, match=r"export\.platforms=.*\['gpu'\]"):
    export_mode.export(config, workdir)
  assert sorted(p.name for p in (epath.Path(workdir) / 'export').iterdir()) == before

  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(checkpoints.NoCheckpointError, match='No checkpoint'):
    export_mode.export(_config(), str(empty))
  assert not (empty / 'export').exists()
