"""Distribution: multi-process (jax.distributed + gloo), FSDP, steps per call, accumulation, bf16.

Compiles dominate on CPU, so every test uses configs/tiny.py for a few steps. The
multi-process test runs main.py in subprocesses (2 processes x 2 devices against 1 process x 4
devices); the others run in this process on the 8 virtual devices of conftest.py.
"""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import tiny  # pylint: disable=g-import-not-at-top
from diffusion_jax.training import checkpoints
from diffusion_jax.modes import validation
from diffusion_jax.data import pipeline
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import policy
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state


def small_config(**training):
  config = tiny.get_config()
  config.model.unet.dropout = 0.0
  config.optim.warmup_steps = 0
  config.optim.learning_rate = 2e-3
  config.training.update(training)
  return config


def build(config, mesh, **step_kwargs):
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  state = train_state.create_train_state(config, mesh)
  step = train_state.make_train_step(model, tx, config, mesh, **step_kwargs)
  return state, step


def host_batches(n, batch_size, seed=0):
  images, labels = pipeline.load_digits()
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(images))[:n * batch_size].reshape(n, batch_size)
  return [{'image': images[i].astype(np.float32) / 127.5 - 1.0, 'label': labels[i]} for i in idx]


def assert_trees_close(a, b, rtol, atol):
  a, b = jax.device_get((a, b))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                               jax.tree_util.tree_flatten_with_path(b)[0]):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------ mesh and FSDP rule


def test_mesh_shape_and_fsdp_rule():
  cfg = small_config().mesh
  assert sharding.mesh_shape(cfg, 8) == (8, 1)
  cfg.fsdp = 4
  assert sharding.mesh_shape(cfg, 8) == (2, 4)
  cfg.data, cfg.fsdp = 2, -1
  assert sharding.mesh_shape(cfg, 8) == (2, 4)
  cfg.data, cfg.fsdp = 3, 1
  with pytest.raises(ValueError, match='does not fit'):
    sharding.mesh_shape(cfg, 8)
  P = jax.sharding.PartitionSpec
  assert sharding.fsdp_spec((3, 3, 32, 64), 4, 100) == P(None, None, None, 'fsdp')
  assert sharding.fsdp_spec((64, 48), 4, 100) == P('fsdp', None)
  assert sharding.fsdp_spec((64,), 4, 100) == P()        # Too small.
  assert sharding.fsdp_spec((3, 3, 5, 7), 4, 1) == P()    # Nothing divisible.
  assert sharding.fsdp_spec((3, 3, 32, 64), 1, 1) == P()  # No fsdp axis.


def test_cpu_device_count_is_one_per_core_that_every_batch_splits_over():
  mesh = small_config().mesh
  assert mesh.cpu_devices == 0  # Auto by default.
  count = sharding.cpu_device_count
  assert count(mesh, [64, 256, 256, 64], num_cores=2) == 2
  assert count(mesh, [64, 256, 256, 64], num_cores=8) == 8
  assert count(mesh, [64, 256], num_cores=6) == 4       # 6 and 5 do not divide 64.
  assert count(mesh, [48, 64, 256], num_cores=16) == 16  # gcd 16.
  assert count(mesh, [48, 64, 256], num_cores=12) == 8
  assert count(mesh, [64, 30], num_cores=4) == 2          # gcd 2.
  assert count(mesh, [63], num_cores=2) == 1              # Odd batch: one device.
  assert count(mesh, [40, 120], num_cores=8) == 8
  assert count(mesh, [40, 120], num_cores=7) == 5
  mesh.fsdp = 4  # data = the rest: only multiples of 4 fit whole.
  assert count(mesh, [64], num_cores=6) == 4
  assert count(mesh, [64], num_cores=3) == 1  # Nothing fits; validation then names mesh.fsdp.
  mesh.data, mesh.fsdp = 2, 1  # A fixed mesh uses exactly 2 devices.
  assert count(mesh, [64], num_cores=8) == 2
  mesh.data, mesh.fsdp, mesh.cpu_devices = -1, 1, 3  # Explicit: taken as it is.
  assert count(mesh, [64], num_cores=2) == 3
  for bad in (-1, 1.5, True):  # (ConfigDict itself refuses a float or bool for an int field.)
    bad_mesh = dict(mesh.to_dict(), cpu_devices=bad)
    with pytest.raises(ValueError, match='mesh.cpu_devices'):
      count(bad_mesh, [64], num_cores=2)
    errors, _ = sharding.check_mesh_config(bad_mesh, 1)
    assert any('mesh.cpu_devices' in e for e in errors), errors


def test_auto_cpu_devices_defer_to_an_explicit_xla_flag_and_to_clusters():
  mesh = small_config().mesh
  jax.devices()  # This process's backend is up: setting a count now raises.
  flag = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert sharding.configure_cpu_devices(mesh, [64], environ=flag) is None  # JAX untouched.
  # Nor in a multi-process job (GPU/TPU clusters; the CPU launcher sets its own count).
  assert sharding.configure_cpu_devices(mesh, [64], multi_process=True, environ={}) is None
  mesh.cpu_devices = 2  # An explicit count is set even over the flag (too late in this process).
  with pytest.raises(RuntimeError, match='jax_num_cpu_devices'):
    sharding.configure_cpu_devices(mesh, [64], environ=flag)


def test_one_output_is_ready_when_a_program_has_finished():
  """The premise of policy.finish_before_next_program waiting for one output (XLA:CPU's
  in-process collectives deadlocked with two programs in flight; tests/test_training_policy.py
  checks where it waits): a program's outputs become ready together on every device. A slow
  program (tens of ms) with two outputs; after waiting for the first, every shard of the second
  is ready."""
  mesh = sharding.create_mesh(small_config().mesh)

  def slow(x):
    y = jax.lax.fori_loop(0, 200, lambda _, y: jnp.tanh(y @ y.T[:, :128] @ y[:128]), x)
    return y.sum(), y * 2

  x = jax.device_put(jnp.ones((8 * 128, 128)) / 128, sharding.batch_sharding(mesh))
  total, doubled = jax.jit(slow)(x)
  policy.finish_before_next_program(mesh, (total, doubled))
  assert all(shard.data.is_ready() for shard in doubled.addressable_shards)


@pytest.mark.parametrize('cpu_devices, expect_error', [(0, False), (-2, True)])
def test_main_splits_the_cpu_into_devices_before_jax_starts(tmp_path, cpu_devices, expect_error):
  """Without XLA_FLAGS, main.py gives JAX one CPU device per core (here the first two cores),
  trains on all of them; a bad mesh.cpu_devices stops it before anything is written."""
  cores = sorted(os.sched_getaffinity(0))[:2]
  env = {k: v for k, v in _env(1, tmp_path / 'cache').items() if k != 'XLA_FLAGS'}
  workdir = tmp_path / 'run'
  main_cmd = [sys.executable, os.path.join(ROOT, 'main.py'),
              '--config=' + os.path.join(ROOT, 'configs', 'tiny.py'), f'--workdir={workdir}',
              f'--config.mesh.cpu_devices={cpu_devices}'] + TRAIN_FLAGS
  pin_then_exec = (f'import os, sys; os.sched_setaffinity(0, {set(cores)!r}); '
                   'os.execv(sys.argv[1], sys.argv[1:])')
  proc = subprocess.run([sys.executable, '-c', pin_then_exec] + main_cmd, env=env,
                        capture_output=True, text=True, timeout=400)
  if expect_error:
    assert proc.returncode != 0
    assert 'mesh.cpu_devices=-2 must be an integer >= 0' in proc.stderr, proc.stderr[-2000:]
    assert not workdir.exists()
    return
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = tiny.get_config()
  n = sharding.cpu_device_count(config.mesh, validation.batch_sizes(config), len(cores))
  assert n == len(cores)  # tiny's batches are even.
  assert f'{n} local / {n} global devices (cpu)' in proc.stderr
  assert f'The CPU is split into {n} XLA devices' in proc.stderr
  assert f'on {n} devices' in proc.stderr  # The train loop's mesh.
  assert checkpoints.latest_step_on_disk(str(workdir)) == 4


def test_fsdp_matches_data_parallel_and_is_sharded():
  """data=2 x fsdp=4 with sharded params/EMA/Adam moments == pure data parallel on 8 devices."""
  fsdp_config = small_config()
  fsdp_config.mesh.data, fsdp_config.mesh.fsdp, fsdp_config.mesh.fsdp_min_size = 2, 4, 256
  dp_config = small_config()
  fsdp_mesh, dp_mesh = sharding.create_mesh(fsdp_config.mesh), sharding.create_mesh(dp_config.mesh)
  assert dict(fsdp_mesh.shape) == {'data': 2, 'fsdp': 4}
  s_fsdp, step_fsdp = build(fsdp_config, fsdp_mesh)
  s_dp, step_dp = build(dp_config, dp_mesh)
  assert_trees_close(s_fsdp, s_dp, 0, 0)  # Same initial values, other layout.

  kernel = max(jax.tree.leaves(s_fsdp.params), key=lambda x: x.size)
  big = [x for x in jax.tree.leaves(s_fsdp) if x.size >= 256]
  sharded = [x for x in big if x.addressable_shards[0].data.size * 4 == x.size]
  assert len(sharded) >= len(big) // 2 and len(sharded) > 10
  mu = [x for x in jax.tree.leaves(s_fsdp.opt_state) if x.ndim == 4]
  assert any(x.addressable_shards[0].data.size * 4 == x.size for x in mu)  # Adam moments too.
  assert 'fsdp' in tuple(kernel.sharding.spec), kernel.sharding
  assert all(np.prod(s.data.shape) * 4 == kernel.size for s in kernel.addressable_shards)

  for b in host_batches(2, 16):
    s_fsdp, m_fsdp = step_fsdp(s_fsdp, jax.device_put(b, sharding.batch_sharding(fsdp_mesh)))
    s_dp, m_dp = step_dp(s_dp, jax.device_put(b, sharding.batch_sharding(dp_mesh)))
    np.testing.assert_allclose(float(m_fsdp['loss']), float(m_dp['loss']), rtol=1e-5)
  assert max(jax.tree.leaves(s_fsdp.params), key=lambda x: x.size).sharding == kernel.sharding
  assert_trees_close(s_fsdp.params, s_dp.params, rtol=1e-5, atol=1e-5)
  assert_trees_close(s_fsdp.ema_params, s_dp.ema_params, rtol=1e-5, atol=1e-5)


def _sharding_constraints(jaxpr):
  """(shape, sharding) of every with_sharding_constraint in `jaxpr` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'sharding_constraint':
      found.append((tuple(eqn.outvars[0].aval.shape), eqn.params['sharding']))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _sharding_constraints(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _sharding_constraints(sub)
  return found


def test_grad_accum_sum_stays_in_the_fsdp_layout():
  """Under FSDP the float32 gradient sum of grad_accum_steps (the scan's initial zeros and its
  carry) is constrained to each parameter's own sharding, so a device holds 1/fsdp of it
  rather than a replicated copy of every gradient. (Before, the only constraints were the
  micro-batch splits.)"""
  config = small_config(grad_accum_steps=2)
  config.mesh.data, config.mesh.fsdp, config.mesh.fsdp_min_size = 2, 4, 256
  mesh = sharding.create_mesh(config.mesh)
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  shape = train_state.image_shape(config)
  abstract = train_state.abstract_train_state(config, mesh)
  rows = sharding.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((16,) + shape, jnp.float32, sharding=rows),
           'label': jax.ShapeDtypeStruct((16,), jnp.int32, sharding=rows)}
  step = train_state.make_train_step(model, tx, config, mesh)
  constraints = _sharding_constraints(step.trace(abstract, batch).jaxpr.jaxpr)
  sharded = [p for p in jax.tree.leaves(abstract.params) if 'fsdp' in str(p.sharding.spec)]
  assert len(sharded) > 10
  for param in sharded:
    matching = [c for c_shape, c in constraints if c_shape == param.shape and
                c.is_equivalent_to(param.sharding, len(param.shape))]
    # The zeros and the carry after each micro-batch (every parameter of this shape).
    assert len(matching) >= 2, (param.shape, param.sharding.spec)


# ------------------------------------------------------------------ steps per call, accumulation


def test_steps_per_call_and_grad_accum_are_exact():
  mesh = sharding.create_mesh(small_config().mesh, devices=jax.devices()[:2])
  batches = host_batches(3, 16)
  ref_state, ref_step = build(small_config(), mesh)
  init = jax.device_get(ref_state)
  put_state = lambda: jax.device_put(init, sharding.replicated(mesh))
  ref_losses = []
  for b in batches:
    ref_state, m = ref_step(ref_state, jax.device_put(b, sharding.batch_sharding(mesh)))
    ref_losses.append(float(m['loss']))

  _, multi = build(small_config(steps_per_call=3), mesh)
  stacked = jax.tree.map(lambda *x: np.stack(x), *batches)
  state, metrics = multi(put_state(), jax.device_put(stacked,
                                                     sharding.stacked_batch_sharding(mesh)))
  assert metrics['loss'].shape == (3,) and int(state.step) == 3
  np.testing.assert_allclose(np.asarray(metrics['loss']), ref_losses, rtol=1e-6)
  # Scan and single-step programs fuse differently: float32 rounding of near-zero gradients,
  # which Adam normalises, moves a few entries by ~1e-6; a wrong batch or step moves them by
  # ~lr = 2e-3, so 1e-5 still tells the two apart.
  assert_trees_close(state, ref_state, rtol=1e-5, atol=1e-5)

  _, accum = build(small_config(grad_accum_steps=4), mesh)
  state = put_state()
  for b, ref in zip(batches, ref_losses):
    state, m = accum(state, jax.device_put(b, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(float(m['loss']), ref, rtol=1e-5)
  assert_trees_close(state.params, ref_state.params, rtol=1e-4, atol=1e-5)
  assert_trees_close(state.ema_params, ref_state.ema_params, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ mixed precision


def test_bfloat16_compute_trains_and_keeps_fp32_state():
  config = small_config(steps_per_call=2)  # CPU unrolls the k steps: keep the compile small.
  config.optim.learning_rate = 5e-3
  config.model.dtype = 'bfloat16'
  config.model.remat = True
  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:1])
  state, step = build(config, mesh)
  images, labels = pipeline.load_digits()
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(40):  # 80 steps.
    idx = rng.integers(0, len(images), (2, 16))
    batch = {'image': images[idx].astype(np.float32) / 127.5 - 1.0, 'label': labels[idx]}
    state, metrics = step(state, jax.device_put(batch, sharding.stacked_batch_sharding(mesh)))
    losses += list(np.asarray(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < 0.8 * losses[0], losses
  for tree in (state.params, state.ema_params):
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))
  assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state.opt_state))


# ------------------------------------------------------------------ multi-process


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(num_devices, cache_dir):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return env


TRAIN_FLAGS = ['--config.training.num_train_steps=4', '--config.training.log_every_steps=2',
               '--config.training.checkpoint_every_steps=4',
               '--config.training.sample_every_steps=0', '--config.training.num_grid_samples=4',
               '--config.sample.steps=2', '--config.model.unet.dropout=0.0']


def run_main(workdir, num_devices, cache_dir, extra=(), timeout=400):
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), '--config=' + os.path.join(
      ROOT, 'configs', 'tiny.py'), f'--workdir={workdir}'] + TRAIN_FLAGS + list(extra)
  return subprocess.Popen(cmd, env=_env(num_devices, cache_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def logged_losses(workdir, tag='loss'):
  """{step: value} from the TensorBoard events (the last value wins for repeated steps)."""
  import glob  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(str(workdir), 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(tf.make_ndarray(value.tensor)) if value.HasField(
              'tensor') else value.simple_value
  return out


def final_state(workdir, config=None):
  """The newest checkpoint of `workdir`, restored onto one device."""
  config = config or small_config()
  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:1])
  abstract = train_state.abstract_train_state(config, mesh)
  manager = checkpoints.create_manager(str(workdir), read_only=True, async_save=False)
  state, step = checkpoints.restore_latest(manager, abstract)
  manager.close()
  return jax.device_get(state), step


def _wait(proc, timeout):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


def test_two_processes_match_one_process(tmp_path):
  """2 processes x 2 CPU devices (jax.distributed + gloo) == 1 process x 4 devices."""
  cache = tmp_path / 'cache'
  single = run_main(tmp_path / 'one', 4, cache)
  _wait(single, 500)
  port = _free_port()
  procs = [run_main(tmp_path / 'two', 2, cache,
                    [f'--coordinator_address=localhost:{port}', '--num_processes=2',
                     f'--process_id={i}']) for i in range(2)]
  outs = [_wait(p, 500) for p in procs]
  assert 'JAX process 1/2' in outs[1] or 'process 1/2' in ''.join(outs)
  one, two = logged_losses(tmp_path / 'one'), logged_losses(tmp_path / 'two')
  assert sorted(one) == sorted(two) == [2, 4]
  np.testing.assert_allclose([two[s] for s in (2, 4)], [one[s] for s in (2, 4)], rtol=1e-5)
  (s1, step1), (s2, step2) = final_state(tmp_path / 'one'), final_state(tmp_path / 'two')
  assert step1 == step2 == 4
  assert_trees_close(s2.params, s1.params, rtol=1e-5, atol=1e-5)
  assert_trees_close(s2.ema_params, s1.ema_params, rtol=1e-5, atol=1e-5)
