"""diffusion_jax.api: what the notebooks call (load a run, sample it, count evaluations)."""

import jax
import numpy as np
import pytest

import test_sampling_cli as tsc

from diffusion_jax import api
from diffusion_jax.config import run_config
from diffusion_jax.modes import sample as sample_mode
from diffusion_jax.parallel import sharding
from diffusion_jax.config.errors import ConfigError


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny random class-conditional run (config.json + checkpoint), loaded on one device."""
  workdir = str(tmp_path_factory.mktemp('api_run'))
  config = tsc._config(tsc.NUM_CLASSES)  # pylint: disable=protected-access
  tsc._save_random_checkpoint(config, workdir)  # pylint: disable=protected-access
  run_config.save_run_config(config, workdir)
  return api.load_run(workdir, mesh=sharding.create_mesh(config.mesh, jax.devices()[:1]))


def test_sample_is_batch_zero_of_sample_mode(run):
  """api.sample(run, n, seed, **fields) draws --mode=sample's first batch of n with those
  fields: the same images (bit for bit on one device) and the same cycling labels."""
  fields = dict(sampler='ddim', steps=3, eta=0.5, guidance_scale=2.0, class_labels='3,7')
  images, labels = api.sample(run, 8, seed=4, return_labels=True, **fields)
  config = api.sample_config(run, 8, **fields)  # A multiple of the 8 test devices.
  config.sample.seed = 4
  folder = sample_mode.generate(config, run.workdir, run.mesh)
  with np.load(str(folder / 'samples.npz')) as data:
    np.testing.assert_array_equal(images, data['arr_0'])
    np.testing.assert_array_equal(labels, data['arr_1'])
  np.testing.assert_array_equal(labels, [3, 7] * 4)
  # Another sampler from the same noise gives other images; explicit labels are used as given.
  other = api.sample(run, 8, seed=4, labels=[1] * 8, sampler='dpm_solver_pp', steps=3)
  assert other.shape == images.shape and not np.array_equal(other, images)


def test_trajectory_ends_at_the_images(run):
  images, trajectory = api.sample(run, 4, seed=0, sampler='ddim', steps=4, trajectory_every=2,
                                  trajectory_images=2)
  assert trajectory.x_t.shape[:2] == (2, 2)  # Steps 2 and 4 of 4, the first 2 samples.
  last = np.clip(np.round((np.clip(trajectory.x_t[-1], -1, 1) + 1) * 127.5), 0, 255)
  np.testing.assert_array_equal(last.astype(np.uint8), images[:2])


def test_bad_fields_and_labels_are_named(run):
  with pytest.raises(ConfigError, match=r'sample\.sampler_steps'):
    api.sample(run, 4, sampler_steps=3)
  with pytest.raises(ConfigError, match=r'sample\.sampler'):
    api.sample(run, 4, sampler='euler_ancestral')
  with pytest.raises(ValueError, match='model.num_classes'):
    api.sample(run, 2, labels=[0, tsc.NUM_CLASSES], steps=2)
  with pytest.raises(FileNotFoundError, match='config.json'):
    api.load_run(run.workdir + '_missing')


def test_network_evaluations():
  # Heun: one Euler step plus a correction per step, none on the last step into sigma = 0.
  assert [api.network_evaluations(s, 10) for s in ('ddpm', 'ddim', 'dpm_solver_pp', 'euler',
                                                    'heun')] == [10, 10, 10, 10, 19]
  assert api.network_evaluations('heun', 10, guidance_scale=3.0) == 38
  with pytest.raises(ValueError, match='sample.sampler'):
    api.network_evaluations('plms', 10)
