"""--mode=compile: a config's programs compiled for a TPU pod (or GPU nodes) on this CPU.

The TPU devices come from libtpu and the GPU ones from the CUDA plugin (the `compile` extra),
with no accelerator present; a test that needs a plugin skips without it, except the one that
checks what the mode says when libtpu is missing.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes import compile as compile_mode
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.parallel import topology
from diffusion_jax.training import loop, train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not topology.compiler_available('tpu'),
                                  reason="libtpu is not installed (pip install -e '.[compile]')")
needs_cuda_plugin = pytest.mark.skipif(
    not topology.compiler_available('cuda'),
    reason="the CUDA plugin is not installed (pip install -e '.[compile]')")


def _config(topology_name='v5e-4', programs=('train', 'sample_grid', 'sample'), **mesh):
  config = tiny.get_config()
  config.compile.topology = topology_name
  config.compile.programs = programs
  config.training.batch_size = 16
  config.mesh.update(mesh)
  return config


def _cli(tmp_path, *args, prelude='pass'):
  """Runs main.py --mode=compile (after `prelude` in the same interpreter)."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  code = (f'{prelude}; import runpy, sys; sys.argv = ["main.py", *sys.argv[1:]]; '
          'runpy.run_path("main.py", run_name="__main__")')
  return subprocess.run([sys.executable, '-c', code, '--config=configs/tiny.py',
                         f'--workdir={tmp_path / "plan"}', '--mode=compile', *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                        check=False)


@pytest.fixture(scope='module')
def tiny_v5e(tmp_path_factory):
  """The tiny config compiled for a 4-chip v5e (replicated state), its report and mesh."""
  if not topology.compiler_available('tpu'):
    pytest.skip('libtpu is not installed')
  config = _config()
  report = compile_mode.compile_for_topology(config, str(tmp_path_factory.mktemp('v5e')))
  mesh = sharding.create_mesh(config.mesh, topology.describe(topology.parse('v5e-4')))
  return config, report, mesh


# ------------------------------------------------------------------ names and devices


@pytest.mark.parametrize('name,chips,grid,accelerator', [
    ('v4-32', 16, (2, 2, 4), 'v4-32'), ('v5p-128', 64, (4, 4, 4), 'v5p-128'),
    ('v5e-256', 256, (16, 16), 'v5e-256'), ('v5litepod-16', 16, (4, 4), 'v5e-16'),
    ('v6e-64', 64, (8, 8), 'v6e-64'), ('V5E:4x4', 16, (4, 4), 'v5e-16'),
    ('v5p:4x4x8', 128, (4, 4, 8), 'v5p-256'), ('h100-16', 16, (2, 8), 'h100-16'),
    ('h200-4', 4, (1, 4), 'h200-4')])
def test_the_names_users_type_are_parsed(name, chips, grid, accelerator):
  """Accelerator types count TensorCores for v4/v5p (2 per chip) and chips for v5e/v6e."""
  parsed = topology.parse(name)
  assert (parsed.num_chips, parsed.grid, parsed.accelerator_type) == (chips, grid, accelerator)


@pytest.mark.parametrize('name,hint', [
    ('v5p-3', 'counts TensorCores'), ('v5e-12', 'v5e-16'), ('v9-8', 'v5p-128'),
    ('v5e:2x2x2', 'AxB (2D torus)'), ('h100-12', 'multiple of 8'), ('tpu', 'v6e-64')])
def test_bad_topology_names_are_refused_with_the_valid_forms(name, hint):
  with pytest.raises(ValueError, match='compile.topology') as info:
    topology.parse(name)
  assert hint in str(info.value)


def test_a_bad_topology_fails_before_anything_is_compiled(tmp_path):
  """The command exits non-zero naming the field and the valid forms; no report is written
  and libtpu is never loaded (the message comes first even without it)."""
  proc = _cli(tmp_path, '--config.compile.topology=v5p-100',
              prelude='import sys; sys.modules["libtpu"] = None')
  assert proc.returncode != 0
  assert 'compile.topology' in proc.stderr and 'v5p-128' in proc.stderr
  assert 'pip install' not in proc.stderr
  assert not (tmp_path / 'plan').exists()


def test_without_libtpu_the_mode_says_how_to_install_it(tmp_path):
  proc = _cli(tmp_path, '--config.compile.topology=v5e-4',
              prelude='import sys; sys.modules["libtpu"] = None')
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if "pip install -e '.[compile]'" in l]
  assert len(lines) == 1 and 'tpu compiler plugin' in lines[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'plan').exists()


@needs_libtpu
def test_pod_devices_are_described_without_a_tpu():
  v5p = topology.describe(topology.parse('v5p-128'))
  assert len(v5p) == 64 and {d.device_kind for d in v5p} == {'TPU v5'}
  assert len({d.process_index for d in v5p}) == 16  # 4 chips per host.
  v4 = topology.describe(topology.parse('v4-32'))
  assert len(v4) == 16  # Megacore: one device per chip, as JAX on a v4 pod.
  v5e = topology.describe(topology.parse('v5e-256'))
  assert len({d.process_index for d in v5e}) == 32  # 8 chips per host.
  two = topology.describe(topology.parse('v5e-16', num_slices=2))
  assert len(two) == 32 and sorted({d.slice_index for d in two}) == [0, 1]


@needs_libtpu
def test_the_mesh_follows_the_torus_and_keeps_fsdp_groups_inside_a_slice():
  """One slice: training's mesh rule gives mesh_utils' physical order. Two slices: the data
  axis spans them and every FSDP group (a row of the mesh) is inside one slice."""
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  devices = topology.describe(topology.parse('v5e-16'))
  mesh = sharding.create_mesh(_config(fsdp=4).mesh, devices)
  expected = mesh_utils.create_device_mesh((4, 4), devices)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in expected.flat]
  two = topology.describe(topology.parse('v5e-16', num_slices=2))
  mesh = sharding.create_mesh(_config(fsdp=8).mesh, two)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 8}
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert all(len(set(row)) == 1 for row in slices)
  assert sorted(slices[:, 0]) == [0, 0, 1, 1]
  with pytest.raises(ValueError, match='multiple of the 2 slices'):
    sharding.create_mesh(_config(data=1, fsdp=-1).mesh, two)


# ------------------------------------------------------------------ the report


def test_the_report_is_the_compiled_programs_own_analysis(tiny_v5e, tmp_path):
  """The train step compiled here independently gives the same memory_analysis and FLOPs as
  the report, the state bytes are the leaves' shard sizes, and the JSON is the report."""
  config, report, mesh = tiny_v5e
  abstract = train_state.abstract_train_state(config, mesh)
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  compiled = train_state.make_train_step(model, tx, config, mesh).lower(
      abstract, loop.abstract_batch(config, mesh, 1)).compile()
  memory = compiled.memory_analysis()
  got = report['programs']['train']['memory']
  assert got == {'argument_bytes': memory.argument_size_in_bytes,
                 'output_bytes': memory.output_size_in_bytes,
                 'alias_bytes': memory.alias_size_in_bytes,
                 'temp_bytes': memory.temp_size_in_bytes,
                 'generated_code_bytes': memory.generated_code_size_in_bytes}
  assert report['programs']['train']['xla_flops'] == compiled.cost_analysis()['flops'] > 0
  params = sum(x.size * 4 for x in jax.tree.leaves(abstract.params))  # Replicated float32.
  state = report['state_bytes_per_chip']
  assert state['parameters'] == state['ema'] == params
  assert state['optimizer_state'] >= 2 * params  # Adam's two moments (and its counters).
  assert got['argument_bytes'] >= state['total']  # The state is an argument of the step.
  assert report['fits'] and report['budget_bytes'] == topology.CHIPS['v5e'].hbm_bytes
  peak = (got['argument_bytes'] + got['output_bytes'] - got['alias_bytes'] + got['temp_bytes']
          + got['generated_code_bytes'])
  assert report['programs']['train']['peak_bytes'] == peak
  assert set(report['programs']) == {'train', 'sample_grid', 'sample'}
  saved = json.loads(open(report['path']).read())
  assert saved == {k: v for k, v in report.items() if k != 'path'}
  text = compile_mode.format_report(report)
  assert 'XLA cost model, not a measurement' in text or 'no time estimate' in text
  # Replicated: the gradients are all-reduced whole and nothing is gathered.
  ops = report['programs']['train']['collectives']
  assert ops['all-gather']['count'] == 0 and ops['all-reduce']['bytes'] >= 0.9 * params


@needs_libtpu
def test_fsdp_divides_the_state_and_gathers_and_scatters(tiny_v5e, tmp_path):
  """mesh.fsdp = 4: parameters, optimizer state and EMA per chip fall to ~1/4, and the step
  all-gathers weights and reduce-scatters gradients instead of all-reducing them whole."""
  _, replicated, _ = tiny_v5e
  config = _config(programs=('train',), data=1, fsdp=4, fsdp_min_size=1024)
  report = compile_mode.compile_for_topology(config, str(tmp_path))
  full, sharded = replicated['state_bytes_per_chip'], report['state_bytes_per_chip']
  for part in ('parameters', 'optimizer_state', 'ema'):
    assert sharded[part] <= 0.3 * full[part], (part, sharded[part], full[part])
  ops = report['programs']['train']['collectives']
  assert ops['all-gather']['bytes'] >= 0.5 * full['parameters']  # Each weight, at least once.
  assert ops['reduce-scatter']['count'] > 0
  assert ops['reduce-scatter']['bytes'] > 0.3 * full['parameters']
  assert ops['all-reduce']['bytes'] < 0.5 * full['parameters']


@needs_libtpu
def test_a_program_over_the_chips_memory_is_reported_and_fails(tmp_path, monkeypatch):
  """With a v5e of 40 MiB the tiny train step (about 60 MiB per chip) does not fit but its
  sampler does: the report says which, the JSON is written, the error names the levers."""
  small = dataclasses.replace(topology.CHIPS['v5e'], hbm_bytes=40 * 2**20)
  monkeypatch.setitem(topology.CHIPS, 'v5e', small)
  config = _config(programs=('train', 'sample'))
  with pytest.raises(compile_mode.DoesNotFitError) as info:
    compile_mode.compile_for_topology(config, str(tmp_path))
  report = info.value.report
  assert not report['fits'] and not report['programs']['train']['fits']
  assert report['programs']['sample']['fits']
  assert report['programs']['train']['headroom_bytes'] < 0
  assert json.loads(open(report['path']).read())['fits'] is False
  message = str(info.value)
  for lever in ('mesh.fsdp=', 'model.remat=True', 'training.batch_size', 'bfloat16'):
    assert lever in message
  assert isinstance(info.value, ConfigError)


@needs_libtpu
def test_a_state_too_big_for_the_pod_exits_nonzero_without_compiling(tmp_path):
  """tiny with 2048 channels holds ~40 GiB of state per v5e chip: the command says so, with
  the FSDP size that would fit, and exits 1 without compiling anything."""
  proc = _cli(tmp_path, '--config.compile.topology=v5e-4', '--config.model.unet.ch=2048')
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'the train state alone needs' in proc.stderr and 'mesh.fsdp=4' in proc.stderr
  report = json.loads((tmp_path / 'plan' / 'compile' / 'v5e_4.json').read_text())
  assert report['programs'] == {} and not report['fits']
  assert report['state_bytes_per_chip']['total'] > topology.CHIPS['v5e'].hbm_bytes
  assert not (tmp_path / 'plan' / 'checkpoints').exists()


@needs_cuda_plugin
def test_gpu_nodes_compile_without_a_gpu(tmp_path):
  """Two H100 nodes from the command line: 16 devices over 2 processes, data parallel, the
  budget JAX's preallocated share of each GPU (a fresh process: the CUDA plugin registers its
  compile-only topology when JAX first looks for plugins)."""
  proc = _cli(tmp_path, '--config.compile.topology=h100-16', "--config.compile.programs=('train',)",
              '--config.training.batch_size=16')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'h100-16 (2x8): 16 chips' in proc.stdout and 'train: compiled in' in proc.stdout
  report = json.loads((tmp_path / 'plan' / 'compile' / 'h100_16.json').read_text())
  assert report['num_chips'] == 16 and report['num_hosts'] == 2 and report['fits']
  assert report['mesh'] == {'data': 16, 'fsdp': 1}
  assert report['budget_bytes'] == math.floor(topology.CHIPS['h100'].hbm_bytes * 0.75)
  assert report['programs']['train']['memory']['argument_bytes'] >= report[
      'state_bytes_per_chip']['total']
