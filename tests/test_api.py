"""diffusion_jax.api: what the notebooks call (load a run, sample it, count evaluations)."""

import os
import subprocess
import sys

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


def test_network_evaluations(run):
  """The objective's count for the run's sampler: heun is one Euler step plus a correction per
  step, none on the last step into sigma = 0; guidance doubles the calls, except at the scales 1
  and 0, which call the conditional or the unconditional network alone."""
  counts = [api.network_evaluations(run, sampler=s, steps=10)
            for s in ('ddpm', 'ddim', 'dpm_solver_pp', 'euler', 'heun')]
  assert counts == [10, 10, 10, 10, 19]
  assert api.network_evaluations(run, sampler='ddim', spacing='ddim25') == 25  # Fixes the count.
  assert api.network_evaluations(run, sampler='heun', steps=10, guidance_scale=3.0) == 38
  assert api.network_evaluations(run, sampler='heun', steps=10, guidance_scale=0.0) == 19
  with pytest.raises(ConfigError, match='sample.sampler'):
    api.network_evaluations(run, sampler='plms', steps=10)


def test_every_public_name_resolves_and_importing_the_package_is_light():
  """`import diffusion_jax` loads neither JAX nor TensorFlow; sampling names resolve without
  TensorFlow (only the modes that read data import it); every documented name (the README's
  Python API) resolves, and an unknown one is an AttributeError naming it."""
  code = ('import sys, diffusion_jax as dj; '
          'print([m for m in ("jax", "tensorflow", "flax") if m in sys.modules]); '
          '[getattr(dj, n) for n in ("get_config", "load_run", "sample", "generate", "export", '
          '"load_export", "objectives", "backbones", "solvers")]; '
          'print("tensorflow" in sys.modules); '
          'print([n for n in dj.__all__ if getattr(dj, n, None) is None])')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       env=dict(os.environ, JAX_PLATFORMS='cpu')).stdout.splitlines()
  assert out == ['[]', 'False', '[]'], out
  import diffusion_jax as dj  # pylint: disable=g-import-not-at-top
  with pytest.raises(AttributeError, match='no_such_name'):
    dj.no_such_name  # pylint: disable=pointless-statement
