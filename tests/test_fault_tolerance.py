"""Faults: SIGKILL + restart is bit-identical, SIGTERM saves and exits 0, FSDP checkpoints move
between device counts, non-finite steps are skipped, keep-every-M checkpoints are kept.

(A corrupt newest checkpoint falling back to the previous one is tested in test_checkpoints.py.)
"""

import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_distributed as td  # pylint: disable=g-import-not-at-top
from diffusion_jax import checkpoints, input_pipeline, sharding, train, train_state


def _steps_on_disk(workdir):
  directory = os.path.join(str(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def _wait_for_checkpoint(workdir, proc, timeout=400):
  start = time.time()
  while time.time() - start < timeout:
    if _steps_on_disk(workdir):
      return _steps_on_disk(workdir)
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    time.sleep(0.05)
  raise TimeoutError('no checkpoint appeared')


KILL_FLAGS = ['--config.training.num_train_steps=24', '--config.training.checkpoint_every_steps=2',
              '--config.training.log_every_steps=2', '--config.training.keep_checkpoints=2']


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


def test_sigkill_and_restart_is_bit_identical(tmp_path, cache):
  reference = td.run_main(tmp_path / 'ref', 2, cache, KILL_FLAGS)
  td._wait(reference, 500)  # pylint: disable=protected-access
  killed = td.run_main(tmp_path / 'run', 2, cache, KILL_FLAGS)
  seen = _wait_for_checkpoint(tmp_path / 'run', killed)
  killed.send_signal(signal.SIGKILL)
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL
  assert seen and max(seen) < 24, seen  # Killed mid-run.
  restarted = td.run_main(tmp_path / 'run', 2, cache, KILL_FLAGS)
  out = td._wait(restarted, 500)  # pylint: disable=protected-access
  assert 'Resumed from checkpoint' in out

  ref_losses, run_losses = td.logged_losses(tmp_path / 'ref'), td.logged_losses(tmp_path / 'run')
  assert sorted(ref_losses) == sorted(run_losses) == list(range(2, 25, 2))
  assert ref_losses == run_losses  # Bit for bit (floats compared exactly).
  (ref, ref_step), (run, run_step) = td.final_state(tmp_path / 'ref'), td.final_state(
      tmp_path / 'run')
  assert ref_step == run_step == 24
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(run)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_current_step_and_exits_zero(tmp_path, cache):
  flags = ['--config.training.num_train_steps=100000', '--config.training.checkpoint_every_steps=1000',
           '--config.training.log_every_steps=1000', '--config.training.sample_every_steps=0']
  proc = td.run_main(tmp_path / 'run', 2, cache, flags)
  # Wait until training runs (the first log of ReportProgress is not guaranteed; poll events).
  start = time.time()
  while time.time() - start < 400:
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    if any(p.startswith('events.out') for p in os.listdir(tmp_path / 'run')) if os.path.isdir(
        tmp_path / 'run') else False:
      break
    time.sleep(0.2)
  time.sleep(3.0)  # A few steps.
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-4000:]
  assert 'Preempted' in out
  steps = _steps_on_disk(tmp_path / 'run')
  assert len(steps) == 1 and 0 < steps[0] < 100000 and steps[0] % 1000, steps
  state, step = td.final_state(tmp_path / 'run')
  assert step == steps[0] == int(state.step)


def test_fsdp_checkpoint_restores_on_other_device_counts(tmp_path):
  """Saved FSDP-sharded from 8 devices, restored on 1 and onto 2 (replicated) and back to 8."""
  config = td.small_config()
  config.mesh.fsdp, config.mesh.fsdp_min_size = 8, 256
  mesh8 = sharding.create_mesh(config.mesh)
  state8, _ = td.build(config, mesh8)
  state8 = state8.replace(step=jnp.asarray(5, jnp.int32))
  host = jax.device_get(state8)
  manager = checkpoints.create_manager(str(tmp_path), async_save=True)
  checkpoints.save(manager, 5, state8)
  manager.wait_until_finished()
  manager.close()

  restored1, step = td.final_state(tmp_path)  # Same model, one-device mesh.
  assert step == 5
  for a, b in zip(jax.tree.leaves(restored1), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  small = td.small_config()
  small.mesh.data = 2
  mesh2 = sharding.create_mesh(small.mesh)
  target2 = jax.device_put(host, sharding.replicated(mesh2))
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  restored2, _ = checkpoints.restore_latest(manager, target2)
  checkpoints.save(manager, 6, restored2.replace(step=jnp.asarray(6, jnp.int32)))
  manager.close()
  assert restored2.params['conv_out']['kernel'].sharding.mesh.devices.size == 2

  manager = checkpoints.create_manager(str(tmp_path), async_save=False, read_only=True)
  restored8, step = checkpoints.restore_latest(manager, checkpoints.abstract_like(state8))
  manager.close()
  assert step == 6
  # The largest tensor is FSDP-sharded (small ones such as conv_out stay replicated).
  largest = lambda tree: max(jax.tree.leaves(tree), key=lambda x: x.size)
  kernel = largest(restored8.params)
  assert kernel.sharding == largest(state8.params).sharding
  assert 'fsdp' in tuple(kernel.sharding.spec)
  assert np.prod(kernel.addressable_shards[0].data.shape) * 8 == kernel.size
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(largest(host.params)))


def test_skip_nonfinite_steps_and_keep_every(tmp_path, monkeypatch):
  """on_nonfinite='skip': a NaN batch is skipped (counted), training finishes, no NaN anywhere;
  keep_checkpoints=1 with keep_every_steps=4 keeps 4 and 8 of 2, 4, 6, 8."""
  real = input_pipeline.global_batches

  def poisoned(dataset, batch_sharding):
    for i, batch in enumerate(real(dataset, batch_sharding)):
      yield dict(batch, image=batch['image'] * jnp.nan) if i == 2 else batch

  monkeypatch.setattr(input_pipeline, 'global_batches', poisoned)
  config = td.small_config(num_train_steps=8, checkpoint_every_steps=2, log_every_steps=4,
                           sample_every_steps=0, keep_checkpoints=1, keep_every_steps=4,
                           on_nonfinite='skip', num_grid_samples=8)
  config.sample.steps = 2
  config.mesh.data = 1
  config.mesh.allow_idle_devices = True  # One device of the 8 on purpose.
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 8
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
  assert td.logged_losses(tmp_path, 'skipped_steps') == {4: 1.0, 8: 1.0}
  assert _steps_on_disk(tmp_path) == [4, 8]
  # The window with the skipped step averages its 3 finite steps: a number, not NaN.
  losses = td.logged_losses(tmp_path, 'loss')
  assert sorted(losses) == [4, 8] and all(np.isfinite(v) for v in losses.values())
  # One tag per meaning: ours is the log window's rate, clu's 'steps_per_sec' the run's.
  assert sorted(td.logged_losses(tmp_path, 'train/steps_per_sec_window')) == [4, 8]
  # 7 updates were applied in 8 steps: the schedule counts applied updates.
  assert int(state.opt_state[1][0].count) == 7
