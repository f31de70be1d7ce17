"""Every training objective on every backbone goes through the same run lifecycle.

For each (diffusion.objective, model.arch) a tiny digits run (configs/tiny.py, 8 virtual CPU
devices) must: train with a falling loss, resume from its middle checkpoint to the very same
bits as the uninterrupted run (params, every EMA, Adam moments), and draw samples through
`modes.sample.generate`, which is what `--mode=sample` runs. ddpm x unet is the default and is
covered by test_main.py / test_fault_tolerance.py; the other five pairs are here.
"""

import shutil

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import objectives
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes import sample as sample_mode
from diffusion_jax.modes import train as train_mode
from diffusion_jax.modes.validation import validate_config
from diffusion_jax.training import run_log
from tests.plugins import toy_objective

STEPS = 40
COMBOS = [('ddpm', 'dit'), ('edm', 'unet'), ('edm', 'dit'), ('flow_matching', 'unet'),
          ('flow_matching', 'dit')]
SAMPLERS = {'ddpm': 'ddim', 'edm': 'heun', 'flow_matching': 'heun'}


def _config(objective: str, arch: str):
  config = tiny.get_config()
  config.diffusion.objective = objective
  config.sample.sampler = SAMPLERS[objective]
  config.sample.steps = 4
  config.sample.num_samples = 16
  config.model.arch = arch
  config.model.unet.dropout = 0.0
  if arch == 'dit':
    config.model.dit.hidden_size = 32
    config.model.dit.depth = 2
    config.model.dit.num_heads = 2
    config.model.dit.patch_size = 2
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 0
  config.training.num_train_steps = STEPS
  config.training.log_every_steps = 10
  config.training.checkpoint_every_steps = STEPS // 2
  config.training.sample_every_steps = STEPS
  config.training.num_grid_samples = 8
  return config


@pytest.mark.parametrize('objective,arch', COMBOS)
def test_objective_and_backbone_train_resume_and_sample(objective, arch, tmp_path):
  config = _config(objective, arch)
  run = tmp_path / 'run'
  state = train_mode.train_and_evaluate(config, str(run))
  assert int(state.step) == STEPS
  final = [np.asarray(x) for x in jax.tree.leaves(state)]

  history = run_log.read_train_metrics(str(run))
  np.testing.assert_array_equal(history['step'], np.arange(10, STEPS + 1, 10))
  losses = history['loss']
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.8 * losses[0], f'{objective}/{arch}: loss did not fall: {losses}'

  # Restart from the middle checkpoint: the same bits as the uninterrupted run.
  resumed = tmp_path / 'resumed'
  shutil.copytree(run, resumed)
  shutil.rmtree(resumed / 'checkpoints' / str(STEPS))
  again = train_mode.train_and_evaluate(config, str(resumed))
  again = [np.asarray(x) for x in jax.tree.leaves(again)]
  assert len(again) == len(final)
  for a, b in zip(final, again):
    np.testing.assert_array_equal(a, b)

  out_dir = sample_mode.generate(config, str(run))
  with np.load(out_dir / 'samples.npz') as f:
    samples = f['arr_0']
  assert samples.shape == (16, 8, 8, 1) and samples.dtype == np.uint8
  # Trained for 40 steps the samples are not digits yet, but not noise at its start either:
  # neither constant nor saturated everywhere.
  assert 5 < samples.std() and 0.05 < np.mean((samples > 20) & (samples < 235)) + 0.05


@pytest.fixture
def toy():
  """tests/plugins/toy_objective.py registered as diffusion.objective='toy' (and removed)."""
  objectives.register(toy_objective)
  yield toy_objective
  objectives.unregister(toy_objective.NAME)


def test_a_new_objective_is_one_registered_module(toy, tmp_path):
  """A module of its own plus `objectives.register`: the toy objective validates, trains with a
  falling loss and samples through the modes, without a change to any other module."""
  config = _config('ddpm', 'unet')
  config.diffusion.objective = toy.NAME
  with pytest.raises(ConfigError, match='diffusion.toy, which the config lacks'):
    validate_config(config, 'train', num_devices=8, num_processes=1)
  config.diffusion.toy = toy.default_config()
  config.sample.sampler = 'euler'
  validate_config(config, 'sample', num_devices=8, num_processes=1)
  config.diffusion.toy.sigma_max = 0.01  # The objective's own check names its field.
  with pytest.raises(ConfigError, match='diffusion.toy.sigma_min=0.02 and sigma_max=0.01'):
    validate_config(config, 'sample', num_devices=8, num_processes=1)
  config.diffusion.toy.sigma_max = 20.0
  run = tmp_path / 'toy'
  state = train_mode.train_and_evaluate(config, str(run))
  assert int(state.step) == STEPS
  losses = run_log.read_train_metrics(str(run))['loss']
  assert losses[-1] < 0.8 * losses[0], losses
  out_dir = sample_mode.generate(config, str(run))
  with np.load(out_dir / 'samples.npz') as f:
    samples = f['arr_0']
  assert samples.shape == (16, 8, 8, 1) and 5 < samples.std()


def test_unknown_objective_is_refused_by_name():
  config = _config('ddpm', 'unet')
  config.diffusion.objective = 'toy'  # Not registered.
  with pytest.raises(ConfigError, match=r"diffusion.objective='toy' is unknown; use one of "
                                        r"\('ddpm', 'edm', 'flow_matching', 'noisy_classifier'\)"):
    validate_config(config, 'sample', num_devices=8, num_processes=1)
