"""Faults: SIGKILL + restart is bit-identical, SIGTERM saves and exits 0 (one process, and two
processes through JAX's preemption sync point), FSDP checkpoints move between device counts,
non-finite steps are skipped, keep-every-M checkpoints are kept; fast restarts (ahead-of-time
compile with its FLOPs/memory log line, the persistent compilation cache under the workdir).

(A corrupt newest checkpoint falling back to the previous one is tested in test_checkpoints.py.)
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_distributed as td  # pylint: disable=g-import-not-at-top
from diffusion_jax.training import checkpoints
from diffusion_jax.data import pipeline
from diffusion_jax.parallel import sharding
from diffusion_jax.modes import train as train_mode
from diffusion_jax.training import hooks
from diffusion_jax.training import loop


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
  real = pipeline.global_batches

  def poisoned(dataset, batch_sharding):
    for i, batch in enumerate(real(dataset, batch_sharding)):
      yield dict(batch, image=batch['image'] * jnp.nan) if i == 2 else batch

  monkeypatch.setattr(pipeline, 'global_batches', poisoned)
  config = td.small_config(num_train_steps=8, checkpoint_every_steps=2, log_every_steps=4,
                           sample_every_steps=0, keep_checkpoints=1, keep_every_steps=4,
                           on_nonfinite='skip', num_grid_samples=8)
  config.sample.steps = 2
  config.mesh.data = 1
  config.mesh.allow_idle_devices = True  # One device of the 8 on purpose.
  state = train_mode.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 8
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
  assert td.logged_losses(tmp_path, 'skipped_steps') == {4: 1.0, 8: 1.0}
  assert _steps_on_disk(tmp_path) == [4, 8]
  # The window with the skipped step averages its 3 finite steps: a number, not NaN.
  losses = td.logged_losses(tmp_path, 'loss')
  assert sorted(losses) == [4, 8] and all(np.isfinite(v) for v in losses.values())
  # One tag per meaning: ours is the log window's rate, clu's 'steps_per_sec' the run's.
  assert sorted(td.logged_losses(tmp_path, 'train/steps_per_sec_window')) == [4, 8]
  # 7 updates were applied in 8 steps: the schedule and the EMAs count applied updates.
  assert int(state.opt_state[1][0].count) == 7
  assert int(state.num_updates) == 7
  assert not (tmp_path / 'samples').exists()  # sample_every_steps=0: never, not even the last.


# ------------------------------------------------------------------ multi-process preemption


def _two_processes(workdir, cache, flags):
  port = td._free_port()  # pylint: disable=protected-access
  return [td.run_main(workdir, 2, cache, list(flags) + [
      f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'])
          for i in range(2)]


def _wait_all(procs, timeout=500):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def test_two_processes_sigterm_save_the_same_step_and_resume_bit_identically(tmp_path, cache):
  """2 processes x 2 CPU devices (gloo): SIGTERM to both while training -> JAX's preemption
  sync point -> both save the same step (< num_train_steps) and exit 0; the resumed run ends
  bit-identical to an uninterrupted one. steps_per_call=2, so the sync point is found although
  a call ends only at every second step (JAX needs sync ids one apart)."""
  # Both processes get SIGTERM before their first step, and the sync point comes some calls
  # later: how many depends on the load. 20 steps (under a second) could all end first on a busy
  # machine, which saved step 20 and failed the test; 100 leave a few seconds.
  steps = 100
  flags = [f'--config.training.num_train_steps={steps}', '--config.training.steps_per_call=2',
           f'--config.training.checkpoint_every_steps={steps}',
           f'--config.training.log_every_steps={steps}']
  run = tmp_path / 'run'
  procs = _two_processes(run, cache, flags)
  start = time.time()  # Process 0 writes the hparams event right before the first step.
  while not (run.is_dir() and any(p.startswith('events.out') for p in os.listdir(run))):
    assert time.time() - start < 500, 'training did not start'
    for p in procs:
      assert p.poll() is None, p.communicate()[0][-4000:]
    time.sleep(0.1)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outs = _wait_all(procs)
  saved = [re.findall(r'Preempted: saved checkpoint (\d+)', out) for out in outs]
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  step = int(saved[0][0])
  assert 0 < step < steps and step % 2 == 0, step
  assert _steps_on_disk(run) == [step]

  resumed = _wait_all(_two_processes(run, cache, flags))
  assert f'Resumed from checkpoint {step}' in resumed[0]
  _wait_all(_two_processes(tmp_path / 'ref', cache, flags))
  (ref, ref_step), (got, got_step) = td.final_state(tmp_path / 'ref'), td.final_state(run)
  assert ref_step == got_step == steps
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):  # Params, EMA, Adam: bit for bit.
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _FakeSyncManager:
  """JAX's preemption sync rule (xla PreemptionSyncManager): once notified, the sync point is
  max(last id each process passed) + 1, and only a call with exactly that id returns True."""

  def __init__(self):
    self.ids, self.sync_point = [], None

  def notify(self):
    self.sync_point = max(self.ids, default=0) + 1

  def __call__(self, step_id):
    self.ids.append(step_id)
    return step_id == self.sync_point


@pytest.mark.parametrize('k', [1, 2, 4])
def test_preemption_sync_ids_go_up_by_one_with_steps_per_call(monkeypatch, k):
  """With k steps per call the loop still passes ids 1, 2, 3, ... (calling with the step, as
  the old loop did, passes k, 2k, ... and never meets max + 1 when k > 1)."""
  fake = _FakeSyncManager()
  monkeypatch.setattr(checkpoints, 'reached_preemption', fake)
  flag = hooks.PreemptionFlag()
  stopped_at = None
  for step in range(k, 40 * k + 1, k):
    if step == 10 * k:
      fake.notify()  # A SIGTERM arrives during the 10th call: sync point 9k + 1.
    if hooks.preemption_requested(flag, step, k):
      stopped_at = step
      break
  assert fake.ids == list(range(1, len(fake.ids) + 1))
  assert stopped_at == 10 * k  # After the call holding the sync point.


# ------------------------------------------------------------------ fast restarts


def test_aot_compile_logs_cost_and_fills_a_fresh_workdir_cache(tmp_path):
  """A tiny run with no cache configured compiles its train step and sampler ahead of time,
  logs FLOPs and per-device memory (arguments = the replicated train state + this device's
  batch rows), and leaves the compiled programs in <workdir>/compilation_cache. The grid has 3
  images on 2 devices: its sampling batch is padded to 4."""
  workdir = tmp_path / 'run'
  env = td._env(2, tmp_path / 'unused')  # pylint: disable=protected-access
  del env['JAX_COMPILATION_CACHE_DIR']
  cmd = [sys.executable, os.path.join(td.ROOT, 'main.py'),
         '--config=' + os.path.join(td.ROOT, 'configs', 'tiny.py'), f'--workdir={workdir}',
         '--config.training.num_train_steps=2', '--config.training.log_every_steps=2',
         '--config.training.checkpoint_every_steps=2', '--config.training.num_grid_samples=3',
         '--config.sample.steps=2']
  out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=500, check=False).stdout
  assert 'Train step' in out and 'GFLOP per call' in out, out[-4000:]
  line = re.search(r'Train step \(1 step\(s\) per call\): ([0-9.e+-]+) GFLOP per call; per '
                   r'device: arguments ([0-9.e+-]+) MiB, outputs ([0-9.e+-]+) MiB '
                   r'\(([0-9.e+-]+) MiB aliased', out)
  assert line, out[-4000:]
  gflop, arguments, outputs, aliased = map(float, line.groups())
  state, step = td.final_state(workdir)
  assert step == 2
  state_mib = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)) / 2**20
  batch_mib = 8 * 8 * 8 * 1 * 4 / 2**20 + 8 * 4 / 2**20  # 8 of the 16 rows, image + label.
  assert gflop > 0
  np.testing.assert_allclose(arguments, state_mib + batch_mib, rtol=1e-3)
  assert aliased == pytest.approx(state_mib, rel=1e-3) and outputs >= aliased  # Donated state.
  assert 'Sample grid (3 images, batch 4)' in out
  assert os.listdir(workdir / 'samples') == ['train_step_00000002.png']
  assert len(os.listdir(workdir / 'compilation_cache')) >= 2  # Train step and sampler at least.
  assert 'Persistent compilation cache: ' + str(workdir / 'compilation_cache') in out


def test_compilation_cache_setting_keeps_a_configured_directory(tmp_path):
  """'' -> <workdir>/compilation_cache, a path -> that path, 'none' -> off; a directory set
  outside the config (here conftest's session cache) is never replaced."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  session = jax.config.jax_compilation_cache_dir
  assert session  # conftest.py's.
  assert loop.enable_compilation_cache('', str(tmp_path)) == session
  assert loop.enable_compilation_cache('none', str(tmp_path)) == session
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    assert loop.enable_compilation_cache('none', str(tmp_path)) is None
    assert not jax.config.jax_compilation_cache_dir
    assert loop.enable_compilation_cache('', str(tmp_path)) == str(tmp_path / 'compilation_cache')
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'compilation_cache')
    jax.config.update('jax_compilation_cache_dir', None)
    assert loop.enable_compilation_cache(str(tmp_path / 'c'), 'unused') == str(tmp_path / 'c')
  finally:
    jax.config.update('jax_compilation_cache_dir', session)
    compilation_cache.reset_cache()
