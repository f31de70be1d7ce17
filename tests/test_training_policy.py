"""The backend policy (parallel/policy.py): which choices each mesh and config get, and that the
policy shapes the train step's program but not its result.

Runs on the 8 virtual CPU devices of conftest.py; a GPU mesh is faked (only its platform, size
and axis sizes are read).
"""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.data import pipeline
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import policy as policy_lib
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state
from test_distributed import small_config  # pylint: disable=g-bad-import-order

CPU_INIT_OPTIONS = (('xla_backend_optimization_level', 0),)


def _config(**model):
  config = small_config()  # tiny, no dropout, no warm-up.
  config.model.update(model)
  return config


def _fake_mesh(platform, data, fsdp=1):
  device = type('Device', (), {'platform': platform})()
  return type('FakeMesh', (), {'size': data * fsdp, 'shape': {'data': data, 'fsdp': fsdp},
                               'devices': np.array([device] * (data * fsdp))})()


def test_cpu_meshes_get_the_measured_choices():
  config = _config()
  eight = policy_lib.policy_for(sharding.create_mesh(config.mesh), config)
  assert eight == policy_lib.BackendPolicy(
      per_device_grads=True, check_vma=True, unroll_loops=True, skip_with_cond=True,
      init_compiler_options=CPU_INIT_OPTIONS, serialize_programs=True)
  assert eight.compiler_options() == {'xla_backend_optimization_level': 0}
  one = policy_lib.policy_for(sharding.create_mesh(config.mesh, jax.devices()[:1]), config)
  assert one == policy_lib.BackendPolicy(
      per_device_grads=False, check_vma=True, unroll_loops=True, skip_with_cond=True,
      init_compiler_options=CPU_INIT_OPTIONS, serialize_programs=False)
  fsdp_config = _config()
  fsdp_config.mesh.data, fsdp_config.mesh.fsdp = 2, 4
  fsdp = policy_lib.policy_for(sharding.create_mesh(fsdp_config.mesh), fsdp_config)
  assert not fsdp.per_device_grads and fsdp.serialize_programs  # A sharded state: no shard_map.


def test_dropout_of_the_active_backbone_and_the_conv_backend_decide():
  mesh = sharding.create_mesh(_config().mesh)
  dropout = _config()
  dropout.model.unet.dropout = 0.1  # Masks must not depend on the device count.
  assert not policy_lib.policy_for(mesh, dropout).per_device_grads
  dit = _config(arch='dit')
  dit.model.unet.dropout = 0.1  # Not the backbone that runs: the DiT's own dropout is 0.
  assert dit.model.dit.dropout == 0.0
  assert policy_lib.policy_for(mesh, dit).per_device_grads
  dit.model.dit.dropout = 0.1
  assert not policy_lib.policy_for(mesh, dit).per_device_grads
  for backend, check in (('xla', True), ('onednn', False), ('onednn_winograd', False)):
    chosen = policy_lib.policy_for(mesh, _config(conv_backend=backend))
    assert chosen.check_vma is check and chosen.per_device_grads, backend


def test_other_backends_and_config_free_loops_keep_the_defaults():
  config = _config()
  for mesh in (_fake_mesh('gpu', 8), _fake_mesh('tpu', 4, 2)):
    assert policy_lib.policy_for(mesh, config) == policy_lib.BackendPolicy()
  assert policy_lib.BackendPolicy().compiler_options() is None
  sampling = policy_lib.policy_for(sharding.create_mesh(config.mesh))  # No config.
  assert not sampling.per_device_grads and sampling.check_vma and sampling.serialize_programs


def test_finish_before_next_program_waits_only_when_the_policy_says_so():
  """XLA:CPU's in-process collectives deadlocked with two programs in flight: loops wait on a
  multi-device CPU mesh, for one output, and nowhere else."""

  class Pending:
    waited = 0

    def block_until_ready(self):
      Pending.waited += 1
      return self

  outputs = {'state': Pending(), 'metrics': [Pending()]}
  policy_lib.finish_before_next_program(sharding.create_mesh(_config().mesh), outputs)
  assert Pending.waited == 1
  policy_lib.finish_before_next_program(
      sharding.create_mesh(_config().mesh, jax.devices()[:1]), outputs)
  policy_lib.finish_before_next_program(_fake_mesh('gpu', 8), outputs)
  assert Pending.waited == 1


def _digits_batches(n, batch_size):
  images, labels = pipeline.load_digits()
  rng = np.random.default_rng(1)
  idx = rng.permutation(len(images))[:n * batch_size].reshape(n, batch_size)
  return [{'image': images[i].astype(np.float32) / 127.5 - 1.0, 'label': labels[i]} for i in idx]


@pytest.mark.parametrize('k', [1, 2])
def test_the_policy_shapes_the_program_not_the_result(k):
  """On 2 CPU devices, the CPU policy (per-device gradients in a shard_map, unrolled scans,
  lax.cond) and the all-off policy of GPUs and TPUs (XLA's reductions, rolled scans, where)
  train the same: 2 steps per call of 2 micro-batches (k=2) or single steps, one batch NaN.
  Only the order of float sums differs."""
  config = _config()
  config.training.grad_accum_steps = 2
  config.training.steps_per_call = k
  config.training.on_nonfinite = 'skip'
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:2])
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  batches = _digits_batches(4, 8)
  batches[1]['image'] = batches[1]['image'] * np.nan
  if k > 1:
    batches = [jax.tree.map(lambda *x: np.stack(x), *batches[i:i + k])
               for i in range(0, len(batches), k)]
  rows = sharding.stacked_batch_sharding(mesh) if k > 1 else sharding.batch_sharding(mesh)
  init = jax.device_get(train_state.create_train_state(config, mesh))
  results = []
  for policy in (policy_lib.policy_for(mesh, config), policy_lib.BackendPolicy()):
    step = train_state.make_train_step(model, tx, config, mesh, policy=policy)
    state, nonfinite = jax.device_put(init, sharding.replicated(mesh)), []
    for batch in batches:
      state, metrics = step(state, jax.device_put(batch, rows))
      nonfinite += list(np.ravel(jax.device_get(metrics['nonfinite'])))
    results.append((jax.device_get(state), nonfinite))
  (cpu, cpu_skips), (plain, plain_skips) = results
  assert cpu_skips == plain_skips == [0.0, 1.0, 0.0, 0.0]
  assert (int(cpu.step), int(cpu.num_updates)) == (int(plain.step), int(plain.num_updates)) == (
      4, 3)
  for a, b in zip(jax.tree.leaves(cpu), jax.tree.leaves(plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  moved = np.abs(np.asarray(cpu.params['conv_out']['kernel'])
                 - np.asarray(init.params['conv_out']['kernel'])).max()
  assert moved > 1e-3  # Not vacuous: three updates of lr 2e-3 moved the weights.


def test_training_imports_no_contrib_unless_the_config_asks():
  """oneDNN is optional: importing the training modes and describing an XLA-backend run (a
  fresh interpreter) loads nothing of diffusion_jax.contrib; checking a oneDNN config does."""
  import subprocess  # pylint: disable=g-import-not-at-top
  script = (
      'import sys; sys.path.insert(0, "."); from configs import tiny\n'
      'from diffusion_jax.modes import train\n'
      'from diffusion_jax.nn import backbones\n'
      'from diffusion_jax.training import hooks, loop, posthoc_ema, restore, train_state\n'
      'config = tiny.get_config()\n'
      'contrib = lambda: sorted(m for m in sys.modules if m.startswith("diffusion_jax.contrib"))\n'
      'for backend in ("xla", "onednn"):\n'
      '  config.model.conv_backend = backend\n'
      '  backbones.check_model_config(config.model, config.data.resolution)\n'
      '  train_state.abstract_train_state(config)\n'
      '  print(backend, contrib())\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run([sys.executable, '-c', script], cwd=root, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()[-2:]
  assert lines == ['xla []', "onednn ['diffusion_jax.contrib', 'diffusion_jax.contrib.onednn', "
                   "'diffusion_jax.contrib.onednn.conv']"], proc.stdout
