"""End to end through the real command line: train, sample, and a bad override.

`python main.py --config=configs/tiny.py` runs in a subprocess from the repository root, with
command-line overrides that make it the small class-conditional config of
test_train_state.py / test_checkpoints.py, the test process's XLA_FLAGS (8 CPU devices) and the
persistent compilation cache directory those modules fill: when the files run together the CLI
loads its init, train step and sampler from the cache instead of compiling them again (run
alone it compiles them, which only takes longer).
"""

import glob
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import tiny  # pylint: disable=g-import-not-at-top

CONFIG = tiny.get_config()
NUM_CLASSES = 10
# tiny.py + these = test_train_state.small_config().
OVERRIDES = [
    f'--config.model.num_classes={NUM_CLASSES}',
    '--config.model.unet.dropout=0.0',
    '--config.training.cond_drop_prob=0.5',
    '--config.training.batch_size=8',
    '--config.optim.learning_rate=0.002',
    '--config.optim.warmup_steps=0',
    '--config.optim.lr_schedule=constant',
]
TIMEOUT_S = 900


@pytest.fixture(scope='module')
def cli_env(tmp_path_factory):
  cache = tmp_path_factory.getbasetemp() / 'jax_compilation_cache'
  cache.mkdir(exist_ok=True)
  env = dict(os.environ)
  env['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_COMPILATION_CACHE_DIR'] = str(cache)
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def run_cli(env, *args):
  return subprocess.run([sys.executable, 'main.py', '--config=configs/tiny.py', *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                        check=False)


def _tail(proc):
  return f'rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}'


@pytest.fixture(scope='module')
def trained(tmp_path_factory, cli_env):
  workdir = tmp_path_factory.mktemp('cli') / 'run'
  proc = run_cli(cli_env, f'--workdir={workdir}', *OVERRIDES)
  assert proc.returncode == 0, _tail(proc)
  from diffusion_jax.config import run_config  # pylint: disable=g-import-not-at-top
  if run_config.load_run_config(str(workdir)) is None:  # Until the train loop writes it.
    run_config.save_run_config(_overridden(CONFIG, OVERRIDES), str(workdir))
  return workdir


def _overridden(config, overrides):
  """`config` with the '--config.a.b=value' strings applied (values parsed as Python)."""
  import ast  # pylint: disable=g-import-not-at-top
  from diffusion_jax.config import run_config  # pylint: disable=g-import-not-at-top
  values = {}
  for flag in overrides:
    name, value = flag[len('--config.'):].split('=', 1)
    values[name] = ast.literal_eval(value) if value[0].isdigit() else value
  return run_config.apply_overrides(config, values)


def _png(path):
  with Image.open(path) as image:
    image.load()
    return np.asarray(image)


def _loss_steps(workdir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  steps, values = [], []
  for path in sorted(glob.glob(os.path.join(str(workdir), 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'loss':
          steps.append(event.step)
          values.append(float(tf.make_ndarray(value.tensor)) if value.HasField('tensor')
                        else value.simple_value)
  return steps, values


def test_train_writes_checkpoints_grids_and_events(trained):
  tcfg = CONFIG.training
  num_steps = tcfg.num_train_steps
  steps = sorted(int(p.name) for p in (trained / 'checkpoints').iterdir() if p.name.isdigit())
  want = [s for s in range(1, num_steps + 1) if s % tcfg.checkpoint_every_steps == 0
          or s == num_steps][-tcfg.keep_checkpoints:]
  assert steps == want and steps[-1] == num_steps

  grids = sorted((trained / 'samples').glob('train_step_*.png'))
  want_grids = [s for s in range(1, num_steps + 1) if s % tcfg.sample_every_steps == 0
                or s == num_steps]
  assert [int(re.findall(r'\d+', p.name)[0]) for p in grids] == want_grids
  for path in grids:
    grid = _png(path)
    assert grid.dtype == np.uint8 and grid.ndim == 2  # Grayscale digits.
    tile = 64 // CONFIG.data.resolution * CONFIG.data.resolution
    assert grid.shape[0] > tile and grid.shape[1] > tile
    assert grid.std() > 5  # Not blank.

  assert glob.glob(str(trained / 'events.out.tfevents.*'))
  log_steps, losses = _loss_steps(trained)
  assert log_steps == [s for s in range(1, num_steps + 1)
                       if s % tcfg.log_every_steps == 0 or s == num_steps]
  assert all(np.isfinite(losses)) and all(0 < v < 10 for v in losses)


def test_sample_mode_writes_npz_and_grid(trained, cli_env):
  num_samples = 20
  proc = run_cli(cli_env, f'--workdir={trained}', '--mode=sample',
                 f'--config.sample.num_samples={num_samples}', *OVERRIDES)
  assert proc.returncode == 0, _tail(proc)
  found = glob.glob(str(trained / 'samples' / '*' / 'samples.npz'))
  assert len(found) == 1, found
  out_dir = pathlib.Path(found[0]).parent
  assert str(out_dir) in proc.stdout  # 'Samples written to <dir>'.

  with np.load(found[0]) as npz:
    arr_0 = npz['arr_0']
    arr_1 = npz['arr_1']
  res, channels = CONFIG.data.resolution, CONFIG.data.channels
  assert arr_0.dtype == np.uint8 and arr_0.shape == (num_samples, res, res, channels)
  assert len(np.unique(arr_0)) > 32 and arr_0.std() > 10  # Spread over [0, 255], not constant.
  assert arr_0.min() < 64 and arr_0.max() > 191
  assert not all(np.array_equal(arr_0[0], a) for a in arr_0[1:])  # Different samples.
  # Class-conditional: labels cycle through the classes by sample index.
  np.testing.assert_array_equal(arr_1, np.arange(num_samples) % NUM_CLASSES)

  grid = _png(out_dir / 'grid.png')
  assert grid.dtype == np.uint8 and grid.ndim == 2
  from diffusion_jax import images  # pylint: disable=g-import-not-at-top
  grid = grid[:grid.shape[0] - images.label_band_height()]  # The caption band below the tiles.
  # The grid tiles (2-pixel gaps, then the whole grid upscaled 64 // res times) are the
  # samples in row-major order.
  up, pad = 64 // res, 2
  size = (res + pad) * up
  ncols = (grid.shape[1] - pad * up) // size
  assert ncols >= 1 and (grid.shape[1] - pad * up) % size == 0
  assert (grid.shape[0] - pad * up) % size == 0
  for i in range(num_samples):
    r, c = divmod(i, ncols)
    top, left = pad * up + r * size, pad * up + c * size
    tile = grid[top:top + res * up, left:left + res * up]
    want = arr_0[i, ..., 0].repeat(up, axis=0).repeat(up, axis=1)
    np.testing.assert_array_equal(tile, want, err_msg=f'tile {i}')


def test_bad_override_exits_nonzero_and_writes_nothing(tmp_path, cli_env):
  workdir = tmp_path / 'never'
  proc = run_cli(cli_env, f'--workdir={workdir}', '--config.sample.sampler=nope')
  assert proc.returncode != 0, _tail(proc)
  assert 'sample.sampler' in proc.stderr, _tail(proc)
  assert 'Traceback' not in proc.stderr  # A usage message, not a crash.
  assert not workdir.exists()


def test_sample_override_of_a_network_field_is_a_usage_error(trained, cli_env):
  """--mode=sample reads the run's config.json; an override of a model field is refused
  before anything is compiled or written, naming the field and both values."""
  before = sorted(str(p) for p in trained.rglob('*'))
  proc = run_cli(cli_env, f'--workdir={trained}', '--mode=sample', '--config.model.unet.ch=64',
                 *OVERRIDES)
  assert proc.returncode != 0, _tail(proc)
  assert f'model.unet.ch: run has {CONFIG.model.unet.ch}, requested 64' in proc.stderr, _tail(proc)
  assert 'Traceback' not in proc.stderr
  assert sorted(str(p) for p in trained.rglob('*')) == before


def test_readme_demo_command_trains_scores_and_samples(tmp_path, cli_env):
  """The README's first command (configs/digits_flow.py), shortened to 4 steps: the 701,345-
  parameter U-Net trains, the last step's in-training eval logs its classifier_fd line and
  writes the figure, and --mode=sample then draws distinct digits from the run's config.json."""
  workdir = tmp_path / 'digits_flow'
  short = ['--config.training.num_train_steps=4', '--config.training.eval_every_steps=4',
           '--config.training.sample_every_steps=4', '--config.training.checkpoint_every_steps=4',
           '--config.training.log_every_steps=2', '--config.training.batch_size=16',
           '--config.training.num_grid_samples=16', '--config.eval.train_num_samples=16',
           '--config.eval.batch_size=16', '--config.sample.steps=3']
  proc = subprocess.run([sys.executable, 'main.py', '--config=configs/digits_flow.py',
                         f'--workdir={workdir}', *short], cwd=REPO, env=cli_env,
                        capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert proc.returncode == 0, _tail(proc)
  assert 'Model has 701345 parameters' in proc.stderr, _tail(proc)
  line = re.search(r'classifier_fd at step 4: (\S+) \(best \S+ at step 4, saved\)', proc.stderr)
  assert line, _tail(proc)
  import json  # pylint: disable=g-import-not-at-top
  written = json.loads((workdir / 'eval' / 'classifier_fd_step4.json').read_text())
  assert written['num_samples'] == 16 and written['classifier_fd'] > 0
  assert float(line.group(1)) == pytest.approx(written['classifier_fd'], rel=1e-5)
  assert (workdir / 'samples' / 'train_step_00000004.png').exists()

  proc = subprocess.run([sys.executable, 'main.py', '--config=configs/digits_flow.py',
                         f'--workdir={workdir}', '--mode=sample', '--config.sample.num_samples=16',
                         '--config.sample.batch_size=16'], cwd=REPO, env=cli_env,
                        capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert proc.returncode == 0, _tail(proc)
  found = glob.glob(str(workdir / 'samples' / 'step4_heun_3_seed0_ema_*' / 'samples.npz'))
  assert len(found) == 1, _tail(proc)
  with np.load(found[0]) as npz:
    samples = npz['arr_0']
  assert samples.dtype == np.uint8 and samples.shape == (16, 8, 8, 1)
  assert len({s.tobytes() for s in samples}) == 16
