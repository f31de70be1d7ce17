"""Sample/eval restore only the (EMA) parameters, FSDP-sharded, and sample from them sharded.

One tiny run trains 2 steps with mesh.fsdp=8 (the 8 virtual CPU devices of conftest.py); the
tests then restore it the way `--mode=sample|eval` and the converters do
(`restore.restore_params`) and check that only the EMA item is read, that the parameters
arrive in the train state's FSDP layout, that the compiled sampler needs less memory per device
than the whole train state, and that it draws the same images as from replicated parameters.
"""

import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import tiny  # pylint: disable=g-import-not-at-top
from diffusion_jax.training import restore
from diffusion_jax.nn import backbones
from diffusion_jax.pipelines import sampler
from diffusion_jax.parallel import sharding
from diffusion_jax.modes import train as train_mode
from diffusion_jax.training import train_state


def fsdp_config():
  """configs/tiny.py on an 8-way FSDP mesh (tensors of >= 256 elements sharded), 2 steps."""
  config = tiny.get_config()
  config.mesh.fsdp, config.mesh.fsdp_min_size = 8, 256
  config.training.num_train_steps = 2
  config.training.checkpoint_every_steps = 2
  config.training.log_every_steps = 2
  config.training.sample_every_steps = 2  # The final grid only (sampled from sharded EMA).
  config.training.batch_size = 8
  config.training.num_grid_samples = 8
  config.sample.batch_size = 8
  return config


@pytest.fixture(scope='module')
def fsdp_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('fsdp_run')
  config = fsdp_config()
  state = train_mode.train_and_evaluate(config, str(workdir))
  return config, workdir, state


def _largest(tree):
  return max(jax.tree.leaves(tree), key=lambda x: x.size)


def test_restore_params_reads_only_ema_into_fsdp_shardings(fsdp_run, monkeypatch):
  config, workdir, state = fsdp_run
  step_dir = workdir / 'checkpoints' / '2'
  assert (step_dir / 'opt_state').is_dir() and (step_dir / 'params').is_dir()
  opened = []
  for method in ('restore', 'metadata'):
    real = getattr(ocp.StandardCheckpointHandler, method)

    def spy(self, directory, *args, _real=real, **kwargs):
      opened.append(os.path.basename(str(directory)))
      return _real(self, directory, *args, **kwargs)
    monkeypatch.setattr(ocp.StandardCheckpointHandler, method, spy)

  mesh = sharding.create_mesh(config.mesh)
  params, step = restore.restore_params(config, str(workdir), mesh, use_ema=True)
  assert step == 2
  assert opened and set(opened) == {'ema_params'}  # Neither opt_state nor params was opened.

  # The trained EMA parameters, bit for bit, in the layout the train state gives them.
  expected = train_state.state_shardings(config, mesh).ema_params
  for leaf, trained, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params),
                                 jax.tree.leaves(expected)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(trained))
  kernel = _largest(params)
  assert not kernel.sharding.is_fully_replicated
  assert kernel.addressable_shards[0].data.size * 8 == kernel.size  # 1/8 per device.
  sharded = [x for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated]
  assert sum(x.size for x in sharded) > 0.5 * sum(x.size for x in jax.tree.leaves(params))


def test_restore_params_needs_no_optimizer_state_on_disk(fsdp_run, tmp_path):
  """A copy of the run without opt_state/ and params/ still samples: they are never read."""
  import shutil  # pylint: disable=g-import-not-at-top
  config, workdir, state = fsdp_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir / 'checkpoints', copy / 'checkpoints')
  for item in ('opt_state', 'params'):
    shutil.rmtree(copy / 'checkpoints' / '2' / item)
  mesh = sharding.create_mesh(config.mesh)
  params, step = restore.restore_params(config, str(copy), mesh, use_ema=True)
  assert step == 2
  np.testing.assert_array_equal(np.asarray(_largest(params)), np.asarray(_largest(state.ema_params)))
  assert sorted(p.name for p in (copy / 'checkpoints').iterdir()) == ['2']  # Nothing moved.


def test_sharded_sampler_memory_and_samples_match_replicated(fsdp_run):
  config, workdir, state = fsdp_run
  mesh = sharding.create_mesh(config.mesh)
  params, _ = restore.restore_params(config, str(workdir), mesh, use_ema=True)
  model = backbones.create_model(config.model, config.data.channels)
  batch = config.sample.batch_size
  sample_fn = sampler.make_sample_fn(model, config, mesh, batch)
  rng, labels = jax.random.PRNGKey(3), np.zeros((batch,), np.int32)

  def bytes_per_device(tree):
    stats = sample_fn.lower(tree, rng, labels).compile().memory_analysis()
    return stats.argument_size_in_bytes, stats.temp_size_in_bytes

  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))  # The whole train state.
  ema_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  args, temp = bytes_per_device(params)
  assert args + temp < state_bytes, (args, temp, state_bytes)
  # The parameters enter as shards: far less than one full EMA copy per device ...
  assert args < 0.5 * ema_bytes, (args, ema_bytes)
  # ... whereas replicated parameters put the whole EMA tree on every device.
  replicated = jax.device_put(params, sharding.replicated(mesh))
  args_replicated, _ = bytes_per_device(replicated)
  assert args_replicated >= ema_bytes

  x_sharded = np.asarray(sample_fn(params, rng, labels))
  x_replicated = np.asarray(sample_fn(replicated, rng, labels))
  assert np.all(np.isfinite(x_sharded)) and np.std(x_sharded) > 0.05
  np.testing.assert_allclose(x_sharded, x_replicated, atol=1e-5, rtol=0)
