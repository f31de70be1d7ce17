"""`--mode=sample`: sharded samples.npz, class labels, animation.gif and config errors.

The checkpoints are tiny U-Nets with random parameters saved as a training run saves them
(step 1), so nothing but the sampler is compiled; what is tested is everything after: restoring,
the sharded sampler on the 8 virtual CPU devices of conftest.py, the per-process shard files,
their merge, the grid and the animation.
"""

import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image, ImageSequence

from configs import tiny
from diffusion_jax.training import checkpoints
from diffusion_jax.sampling import class_labels
from diffusion_jax import images
from diffusion_jax.modes import sample as sample_mode
from diffusion_jax.pipelines import sampler
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes.validation import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10


def _config(num_classes: int = 0):
  config = tiny.get_config()
  config.model.num_classes = num_classes
  config.training.cond_drop_prob = 0.1 if num_classes else 0.0
  config.sample.batch_size = 16
  return config


def _save_random_checkpoint(config, workdir: str) -> None:
  """Saves a train state of random parameters as checkpoint 1 of `workdir`.

  The shapes come from `jax.eval_shape` and the values from NumPy, so nothing is compiled.
  """
  mesh = sharding.create_mesh(config.mesh)
  abstract = train_state.abstract_train_state(config)
  rng = np.random.default_rng(0)
  random = lambda s: jax.device_put(
      (0.1 * rng.standard_normal(s.shape)).astype(s.dtype) if s.ndim else np.ones((), s.dtype),
      sharding.replicated(mesh))
  state = jax.tree.map(random, abstract)
  manager = checkpoints.create_manager(workdir, async_save=False)
  checkpoints.save(manager, 1, state)
  manager.wait_until_finished()
  manager.close()


def _sample_dir(workdir: str, prefix: str) -> epath.Path:
  """The one sample folder whose tag is `prefix` plus the 8-hex hash of the sample fields."""
  found = [d for d in (epath.Path(workdir) / 'samples').iterdir()
           if re.fullmatch(re.escape(prefix) + r'_[0-9a-f]{8}', d.name)]
  assert len(found) == 1, found
  return found[0]


def test_sample_tags_differ_in_every_image_changing_field():
  """Two runs that differ in any sample field but the animation ones get different folders.

  (A shared folder made the second run delete the first one's shards.)
  """
  config = _config()
  base = sampler.sample_tag(config, 7)
  assert re.fullmatch(r'step7_ddim_5_seed0_ema_[0-9a-f]{8}', base), base
  changes = {'spacing': 'trailing', 'thresholding': 'dynamic', 'variance': 'fixed_large',
             'solver_order': 3, 'rho': 5.0, 's_churn': 1.0, 'batch_size': 8,
             'clip_denoised': False}
  tags = {base}
  for field, value in changes.items():
    changed = _config()
    changed.sample[field] = value
    tag = sampler.sample_tag(changed, 7)
    assert tag not in tags, field
    tags.add(tag)
  assert sampler.sample_tag(config, 8) != base
  same = _config()
  same.sample.animation = True
  same.sample.animation_num_images = 4
  assert sampler.sample_tag(same, 7) == base


@pytest.fixture(scope='module')
def uncond_workdir(tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp('uncond'))
  _save_random_checkpoint(_config(), workdir)
  return workdir


@pytest.fixture(scope='module')
def cond_workdir(tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp('cond'))
  _save_random_checkpoint(_config(NUM_CLASSES), workdir)
  return workdir


def _shard_contents(out_dir):
  shard_files = sorted((out_dir / 'shards').glob('*.npz'))
  shards = [dict(np.load(str(f))) for f in shard_files]
  return shard_files, shards


# Runs the script argv[1] as __main__ with the arguments after it, and prints at exit whether
# TensorFlow was imported.
_REPORT_TENSORFLOW = ("import atexit, runpy, sys\n"
                      "atexit.register(lambda: print('tensorflow imported:', "
                      "'tensorflow' in sys.modules))\n"
                      "sys.argv = sys.argv[1:]\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_cli_writes_exactly_num_samples_distinct_in_shards(uncond_workdir):
  """The real CLI: 40 samples with batch 16 (3 batches, the last partly used) on 8 devices,
  without importing TensorFlow (only training and evaluation need it: ~4 s of start-up)."""
  num_samples = 40
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  result = subprocess.run(
      [sys.executable, '-c', _REPORT_TENSORFLOW, 'main.py', '--config=configs/tiny.py',
       f'--workdir={uncond_workdir}',
       '--mode=sample', f'--config.sample.num_samples={num_samples}',
       '--config.sample.batch_size=16', '--config.sample.sampler=ddim',
       '--config.sample.steps=4', '--config.sample.seed=3'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out_dir = _sample_dir(uncond_workdir, 'step1_ddim_4_seed3_ema')
  assert f'Samples written to {out_dir}' in result.stdout
  assert 'tensorflow imported: False' in result.stdout, result.stdout[-2000:]

  with np.load(str(out_dir / 'samples.npz')) as data:
    assert sorted(data.files) == ['arr_0']  # Unconditional: no labels.
    arr_0 = data['arr_0']
  assert arr_0.dtype == np.uint8 and arr_0.shape == (num_samples, 8, 8, 1)
  assert len(np.unique(arr_0.reshape(num_samples, -1), axis=0)) == num_samples

  shard_files, shards = _shard_contents(out_dir)
  # One process, batches 0..2; the last batch holds 8 wanted rows of 16.
  assert [f.name for f in shard_files] == [f'samples_p000_b0000{b}.npz' for b in range(3)]
  indices = np.concatenate([s['index'] for s in shards])
  np.testing.assert_array_equal(np.sort(indices), np.arange(num_samples))
  for s in shards:
    np.testing.assert_array_equal(arr_0[s['index']], s['image'])
  grid = np.asarray(Image.open(str(out_dir / 'grid.png')))
  assert grid.shape == images.make_grid(arr_0, upscale=8, label='step').shape[:2]  # + caption.


def test_conditional_labels_and_animation(cond_workdir):
  """Requested class labels land in arr_1; animation.gif has one frame per 2 of 6 steps.

  12 samples with batch 16: one batch (so one compiled program, with the trajectory), cut.
  """
  config = _config(NUM_CLASSES)
  config.sample.num_samples = 12
  config.sample.steps = 6
  config.sample.guidance_scale = 2.0
  config.sample.class_labels = '3, 7,1'
  config.sample.animation = True
  config.sample.animation_every = 2
  config.sample.animation_num_images = 4
  out_dir = sample_mode.generate(config, cond_workdir)
  assert re.fullmatch(r'step1_ddim_6_g2_y3-7-1_seed0_ema_[0-9a-f]{8}', out_dir.name), out_dir

  with np.load(str(out_dir / 'samples.npz')) as data:
    arr_0, arr_1 = data['arr_0'], data['arr_1']
  assert arr_0.shape == (12, 8, 8, 1) and arr_0.dtype == np.uint8
  np.testing.assert_array_equal(arr_1, np.resize([3, 7, 1], 12))
  assert len(np.unique(arr_0.reshape(12, -1), axis=0)) == 12
  _, shards = _shard_contents(out_dir)
  np.testing.assert_array_equal(np.sort(np.concatenate([s['index'] for s in shards])),
                                np.arange(12))
  for s in shards:
    np.testing.assert_array_equal(s['label'], arr_1[s['index']])

  gif = Image.open(str(out_dir / 'animation.gif'))
  frames = [np.asarray(f.convert('L')) for f in ImageSequence.Iterator(gif)]
  assert len(frames) == 3  # ceil(6 steps / 2).
  grid = images.make_grid(np.zeros((4, 8, 8, 1), np.uint8), upscale=8)  # 2x2 of 64x64 digits.
  expected = (grid.shape[0] + images.PROGRESS_BAR, 2 * grid.shape[1] + images.FRAME_GAP)
  assert all(f.shape == expected for f in frames)
  # The x_t half of the last frame is the output: the first 4 samples.
  last_x_t = frames[-1][:grid.shape[0], :grid.shape[1]]
  np.testing.assert_array_equal(last_x_t, images.make_grid(arr_0[:4], upscale=8)[..., 0])


_TWO_PROCESS_SCRIPT = """
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from configs import tiny
from diffusion_jax.modes import sample as sample_mode
from diffusion_jax.pipelines import sampler
config = tiny.get_config()
config.model.num_classes = 10
config.sample.num_samples, config.sample.batch_size, config.sample.seed = 40, 16, 5
print('OUT', sample_mode.generate(config, sys.argv[3]))
"""


def test_two_processes_write_disjoint_shards(cond_workdir):
  """Two JAX processes of 4 CPU devices each: every sample is written once, by its process."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    address = f'localhost:{s.getsockname()[1]}'
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  procs = [subprocess.Popen([sys.executable, '-c', _TWO_PROCESS_SCRIPT, address, str(i),
                             cond_workdir], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  out_dir = _sample_dir(cond_workdir, 'step1_ddim_5_g1_seed5_ema')
  with np.load(str(out_dir / 'samples.npz')) as data:
    arr_0, arr_1 = data['arr_0'], data['arr_1']
  assert arr_0.shape == (40, 8, 8, 1)
  np.testing.assert_array_equal(arr_1, np.arange(40) % NUM_CLASSES)
  assert len(np.unique(arr_0.reshape(40, -1), axis=0)) == 40
  shard_files, shards = _shard_contents(out_dir)
  by_process = {0: [], 1: []}
  for f, shard in zip(shard_files, shards):
    by_process[int(f.name[len('samples_p'):][:3])].append(shard['index'])
    np.testing.assert_array_equal(arr_0[shard['index']], shard['image'])
  # Devices 0-3 belong to process 0: it computed rows 0-7 of every batch of 16.
  np.testing.assert_array_equal(np.concatenate(by_process[0]),
                                [i for i in range(40) if i % 16 < 8])
  np.testing.assert_array_equal(np.concatenate(by_process[1]),
                                [i for i in range(40) if i % 16 >= 8])


@pytest.mark.parametrize('labels, num_classes, message', [
    ('12', NUM_CLASSES, 'outside the classes 0..9'),
    ('3,-1', NUM_CLASSES, 'outside the classes 0..9'),
    ('three', NUM_CLASSES, 'is not a class id'),
    ('3', 0, 'needs a class-conditional model'),
])
def test_bad_class_labels_name_the_field(labels, num_classes, message):
  config = _config(num_classes)
  config.sample.class_labels = labels
  with pytest.raises(ConfigError, match='sample.class_labels') as error:
    validate_config(config, mode='sample')
  assert message in str(error.value)
  with pytest.raises(ConfigError, match='sample.class_labels'):
    sample_mode.generate(config, '/nonexistent/workdir')  # Fails before looking for checkpoints.


def test_labels_cycle_by_global_index():
  parsed = class_labels.parse_class_labels(' 4,2 ', 5)
  np.testing.assert_array_equal(parsed, [4, 2])
  np.testing.assert_array_equal(class_labels.labels_for(np.arange(5, 10), parsed, 5),
                                [2, 4, 2, 4, 2])
  np.testing.assert_array_equal(class_labels.labels_for(np.arange(3, 8), None, 5), [3, 4, 0, 1, 2])
  assert class_labels.parse_class_labels('', 5) is None


def test_merge_rejects_missing_or_repeated_samples(tmp_path):
  shard_dir = epath.Path(tmp_path) / 'shards'
  shard_dir.mkdir()
  out = epath.Path(tmp_path) / 'samples.npz'
  image = lambda idx: np.asarray(idx, np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1),
                                                                                np.uint8)
  # Process 1's shard sorts after process 0's but holds the first samples.
  sample_mode.write_shard(sample_mode.shard_path(shard_dir, 0, 0), np.array([2, 3]),
                          image([2, 3]), None)
  sample_mode.write_shard(sample_mode.shard_path(shard_dir, 1, 0), np.array([1, 0]),
                          image([1, 0]), None)
  head, arr_1 = sample_mode.merge_shards(shard_dir, out, 4, conditional=False, head=3)
  assert arr_1 is None and head.shape == (3, 2, 2, 1)
  np.testing.assert_array_equal(head[:, 0, 0, 0], [0, 1, 2])
  with np.load(str(out)) as data:
    assert data.files == ['arr_0']
    np.testing.assert_array_equal(data['arr_0'], image([0, 1, 2, 3]))
  out.unlink()
  with pytest.raises(RuntimeError, match='1 missing'):
    sample_mode.merge_shards(shard_dir, out, 5, conditional=False)
  sample_mode.write_shard(sample_mode.shard_path(shard_dir, 1, 1), np.array([3]), image([3]),
                          None)
  with pytest.raises(RuntimeError, match='1 repeated'):
    sample_mode.merge_shards(shard_dir, out, 4, conditional=False)
  assert not out.exists() and not list(epath.Path(tmp_path).glob('samples.npz*'))


def _sample_image(index, shape=(64, 64, 3)):
  """A distinct uint8 image per sample index."""
  return np.random.default_rng(index).integers(0, 256, size=shape, dtype=np.uint8)


def test_merge_streams_many_shards_in_bounded_memory(tmp_path):
  """40 shards of 16 images of 64x64x3 (196 KB each, 7.9 MB in all) and their labels, written
  by 2 'processes' in an order unlike the sample indices (one shard's rows permuted): the merged
  samples.npz holds them in index order, for np.load and for a streaming reader as
  guided-diffusion's evaluator reads arr_0, while tracemalloc's peak stays a few shards."""
  import tracemalloc  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  shard_dir = epath.Path(tmp_path) / 'shards'
  shard_dir.mkdir()
  num_shards, per_shard = 40, 16
  num_samples = num_shards * per_shard
  order = np.random.default_rng(0).permutation(num_shards)
  for k, block in enumerate(order):
    idx = block * per_shard + np.arange(per_shard)
    if k == 3:
      idx = idx[::-1]
    write = np.stack([_sample_image(i) for i in idx])
    sample_mode.write_shard(sample_mode.shard_path(shard_dir, k % 2, k // 2), idx, write,
                            (idx % 7).astype(np.int32))
  shard_bytes = per_shard * 64 * 64 * 3
  out = epath.Path(tmp_path) / 'samples.npz'

  tracemalloc.start()
  head, labels = sample_mode.merge_shards(shard_dir, out, num_samples, conditional=True,
                                          head=20)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  # One shard read (its bytes and its array), the head, zip buffers: ~6 shards measured;
  # holding every image, as np.savez of the merged array does, is over 40 (~120 measured).
  assert peak < 8 * shard_bytes, (peak, shard_bytes)

  want = np.stack([_sample_image(i) for i in range(num_samples)])
  np.testing.assert_array_equal(head, want[:20])
  np.testing.assert_array_equal(labels, np.arange(num_samples) % 7)
  with np.load(str(out)) as data:
    assert sorted(data.files) == ['arr_0', 'arr_1']
    assert data['arr_0'].dtype == np.uint8
    np.testing.assert_array_equal(data['arr_0'], want)
    np.testing.assert_array_equal(data['arr_1'], np.arange(num_samples) % 7)
  with zipfile.ZipFile(str(out)) as archive:  # Header, then batches of rows, as it streams.
    with archive.open('arr_0.npy') as member:
      assert np.lib.format.read_magic(member) == (1, 0)
      shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
      assert shape == (num_samples, 64, 64, 3) and not fortran_order and dtype == np.uint8
      batch = np.frombuffer(member.read(5 * 64 * 64 * 3), np.uint8).reshape(5, 64, 64, 3)
      np.testing.assert_array_equal(batch, want[:5])


def test_write_gif_frames(tmp_path):
  frames = [np.full((5, 7, 1), v, np.uint8) for v in (0, 100, 200)]
  path = str(tmp_path / 'a.gif')
  images.write_gif(path, frames, [50, 50, 300])
  gif = Image.open(path)
  read = [np.asarray(f.convert('L')) for f in ImageSequence.Iterator(gif)]
  assert len(read) == 3 and read[1].shape == (5, 7) and int(read[1][0, 0]) == 100
