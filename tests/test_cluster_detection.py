"""Cluster detection for jax.distributed (diffusion_jax/distributed.py) with fake environments.

Every test here runs with the network cut off (sockets and `requests` raise), so no detection
path may query the GCE metadata server. The agreement tests hold our pure detection against
JAX's own ClusterEnv classes on the same fake environment, so a JAX upgrade that changes the
variables it reads fails here rather than on a pod.
"""

import logging
import os
import socket
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffusion_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

SLURM_16 = {'SLURM_JOB_ID': '77', 'SLURM_STEP_NODELIST': 'gpu[001-002]', 'SLURM_NTASKS': '16',
            'SLURM_PROCID': '5', 'SLURM_LOCALID': '5', 'SLURM_NNODES': '2'}
OMPI_4 = {'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1,10.148.0.1:34911',
          'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '3',
          'OMPI_COMM_WORLD_LOCAL_RANK': '1'}
GKE_TPU = {'TPU_WORKER_HOSTNAMES': 'w-0.svc,w-1.svc,w-2.svc,w-3.svc', 'TPU_WORKER_ID': '2'}

# Every variable any detection path reads: cleared before a fake environment is installed.
_CLUSTER_VARIABLES = sorted(set(SLURM_16) | set(OMPI_4) | set(GKE_TPU) | {
    'TPU_PROCESS_ADDRESSES', 'MEGASCALE_NUM_SLICES', 'MEGASCALE_SLICE_ID',
    'MEGASCALE_COORDINATOR_ADDRESS', 'JAX_COORDINATOR_PORT'})


class NetworkUsed(AssertionError):
  pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any socket connection, name lookup or HTTP request fails the test."""
  def refuse(*args, **kwargs):
    raise NetworkUsed(f'network access attempted: {args!r}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)
  monkeypatch.setattr(socket, 'gethostbyname', refuse)
  try:
    import requests  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(requests, 'get', refuse)
  except ImportError:
    pass


def test_network_guard_is_active():
  with pytest.raises(NetworkUsed):
    socket.create_connection(('metadata.google.internal', 80))
  from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
  with pytest.raises(NetworkUsed):  # JAX's metadata query itself is cut off too.
    cloud_tpu_cluster.get_metadata('agent-worker-number')


# ------------------------------------------------------------------ each environment


def test_slurm_with_several_tasks():
  cluster = distributed.detect_cluster(SLURM_16, on_cloud_tpu_vm=False)
  assert cluster == distributed.Cluster('slurm', 16, 5)
  assert cluster.is_multi_process
  assert cluster.describe() == 'SLURM (srun): 16 processes, this is process 5'
  one_task = dict(SLURM_16, SLURM_NTASKS='1', SLURM_PROCID='0')
  assert distributed.detect_cluster(one_task, False) == distributed.Cluster('slurm', 1, 0)
  assert not distributed.detect_cluster(one_task, False).is_multi_process


def test_slurm_batch_shell_without_job_step_is_not_a_cluster():
  """The sbatch script itself (no srun step: no SLURM_STEP_NODELIST) is one process, as in JAX."""
  batch_shell = {k: v for k, v in SLURM_16.items() if k != 'SLURM_STEP_NODELIST'}
  assert distributed.detect_cluster(batch_shell, False).environment == 'none'


def test_open_mpi_and_its_precedence_over_slurm():
  assert distributed.detect_cluster(OMPI_4, False) == distributed.Cluster('ompi', 4, 3)
  # mpirun inside a SLURM allocation: JAX checks Open MPI first, and so do we.
  assert distributed.detect_cluster(dict(SLURM_16, **OMPI_4), True).environment == 'ompi'


def test_gke_tpu_single_and_multi_slice():
  assert distributed.detect_cluster(GKE_TPU, on_cloud_tpu_vm=True) == distributed.Cluster(
      'gke_tpu', 4, 2)
  two_slices = dict(GKE_TPU, MEGASCALE_NUM_SLICES='2', MEGASCALE_SLICE_ID='1')
  assert distributed.detect_cluster(two_slices, True) == distributed.Cluster('gke_tpu', 8, 6)
  # TPU_PROCESS_ADDRESSES is read before TPU_WORKER_HOSTNAMES (as JAX does).
  addresses = dict(GKE_TPU, TPU_PROCESS_ADDRESSES='10.0.0.1:8476,10.0.0.2:8476')
  assert distributed.detect_cluster(addresses, True).num_processes == 2
  single_host = {'TPU_WORKER_HOSTNAMES': 'w-0.svc', 'TPU_WORKER_ID': '0'}
  assert not distributed.detect_cluster(single_host, True).is_multi_process
  # Worker variables on a host without TPU chips: not a TPU cluster (JAX would not use it).
  assert distributed.detect_cluster(GKE_TPU, on_cloud_tpu_vm=False).environment == 'none'


def test_cloud_tpu_vm_leaves_the_metadata_query_to_jax():
  """`gcloud ... tpu-vm ssh --worker=all`: no worker variables, TPU chips + libtpu present."""
  cluster = distributed.detect_cluster({'HOME': '/home/me'}, on_cloud_tpu_vm=True)
  assert cluster == distributed.Cluster('cloud_tpu_vm', None, None)
  assert cluster.is_multi_process  # Initialise; JAX reads the worker count from the metadata.
  assert cluster.describe() == ('Cloud TPU VM: process count from the TPU metadata server, '
                                'this process id from the metadata server')


def test_explicit_flags_win_and_are_checked():
  cluster = distributed.detect_cluster(SLURM_16, False, 'node7:1234', 3, 2)
  assert cluster == distributed.Cluster('flags', 3, 2, 'node7:1234')
  assert cluster.describe().endswith('3 processes, this is process 2, coordinator node7:1234')
  with pytest.raises(ValueError, match='--coordinator_address needs --num_processes and '
                     '--process_id'):
    distributed.detect_cluster({}, False, 'node7:1234', 3, None)
  with pytest.raises(ValueError, match='--process_id=3 must be in 0..--num_processes-1'):
    distributed.detect_cluster({}, False, 'node7:1234', 3, 3)
  with pytest.raises(ValueError, match='must be host:port'):
    distributed.detect_cluster({}, False, 'node7', 3, 0)
  with pytest.raises(ValueError, match='need --coordinator_address'):
    distributed.detect_cluster({}, False, None, 2, 0)


def test_no_cluster_and_bad_variables():
  cluster = distributed.detect_cluster({'HOME': '/home/me', 'SLURM_JOB_ID': '9'}, False)
  assert cluster == distributed.Cluster('none', 1, 0)
  assert not cluster.is_multi_process
  assert cluster.describe().startswith('no cluster detected')
  with pytest.raises(ValueError, match="SLURM_NTASKS='sixteen' is not an integer"):
    distributed.detect_cluster(dict(SLURM_16, SLURM_NTASKS='sixteen'), False)
  with pytest.raises(ValueError, match='OMPI_COMM_WORLD_RANK is not set'):
    distributed.detect_cluster({k: v for k, v in OMPI_4.items() if 'RANK' not in k}, False)
  with pytest.raises(ValueError, match='TPU_WORKER_ID is not set'):
    distributed.detect_cluster({'TPU_WORKER_HOSTNAMES': 'a,b'}, True)


# ------------------------------------------------------------------ agreement with JAX


def _install_environment(monkeypatch, environ, on_cloud_tpu_vm):
  from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
  for name in _CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  for name, value in environ.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', on_cloud_tpu_vm)


@pytest.mark.parametrize('environ,on_tpu', [
    (SLURM_16, False), (OMPI_4, False), (dict(SLURM_16, **OMPI_4), False),
    (dict(GKE_TPU, MEGASCALE_NUM_SLICES='1', MEGASCALE_SLICE_ID='0'), True),
    (dict(GKE_TPU, MEGASCALE_NUM_SLICES='2', MEGASCALE_SLICE_ID='1'), True), (GKE_TPU, False),
    ({}, False)], ids=['slurm', 'ompi', 'ompi+slurm', 'gke', 'gke-2-slices', 'gke-no-chips',
                       'none'])
def test_agrees_with_jax_cluster_envs(monkeypatch, environ, on_tpu):
  """JAX's is_env_present (in its order) picks the environment we detect, with our counts.

  The GKE cases name MEGASCALE_NUM_SLICES: without it JAX asks the metadata server for the
  slice count (cut off here), where we assume one slice.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  _install_environment(monkeypatch, environ, on_tpu)
  ours = distributed.detect_cluster(os.environ, on_tpu)
  jax_envs = [clusters.OmpiCluster, clusters.SlurmCluster, clusters.GkeTpuCluster]
  found = next((env for env in jax_envs if env.is_env_present()), None)
  if ours.environment == 'none':
    assert found is None
    return
  assert found.name == distributed._JAX_CLUSTER_METHOD[ours.environment]  # pylint: disable=protected-access
  assert (found.get_process_count(), found.get_process_id()) == (ours.num_processes,
                                                                  ours.process_id)


# ------------------------------------------------------------------ calling jax.distributed


@pytest.fixture
def recorded_initialize(monkeypatch):
  """jax.distributed.initialize replaced by a recorder; the collectives setting restored."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  previous = jax.config.jax_cpu_collectives_implementation
  jax.config.update('jax_cpu_collectives_implementation', None)
  yield calls
  jax.config.update('jax_cpu_collectives_implementation', previous)


@pytest.mark.parametrize('cluster,force,expected_call', [
    (distributed.Cluster('slurm', 16, 5), None, {'cluster_detection_method': 'slurm'}),
    (distributed.Cluster('ompi', 4, 3), None, {'cluster_detection_method': 'ompi'}),
    (distributed.Cluster('gke_tpu', 4, 2), None, {'cluster_detection_method': 'gketpu'}),
    (distributed.Cluster('cloud_tpu_vm', None, None), None,
     {'cluster_detection_method': 'gcetpu'}),
    (distributed.Cluster('cloud_tpu_vm', None, None), True,
     {'cluster_detection_method': 'gcetpu'}),
    (distributed.Cluster('flags', 3, 2, 'node7:1234'), None,
     {'coordinator_address': 'node7:1234', 'num_processes': 3, 'process_id': 2,
      'cluster_detection_method': 'deactivate'}),
    (distributed.Cluster('none', 1, 0), True, {}),
])
def test_initialize_calls_jax_with_the_detected_method(recorded_initialize, caplog, cluster,
                                                       force, expected_call):
  with caplog.at_level(logging.INFO):
    assert distributed.initialize_distributed(cluster, force)
  assert recorded_initialize == [expected_call]
  assert jax.config.jax_cpu_collectives_implementation == 'gloo'
  assert f'Calling jax.distributed.initialize(): {cluster.describe()}.' in caplog.text
  assert 'jax.distributed initialised: process 0 of 1.' in caplog.text


@pytest.mark.parametrize('cluster,force,log', [
    (distributed.Cluster('none', 1, 0), None, 'Single process: no cluster detected'),
    (distributed.Cluster('slurm', 1, 0), None, 'Single process: SLURM (srun): 1 process, this'),
    (distributed.Cluster('slurm', 16, 5), False,
     'Single process: SLURM (srun): 16 processes, this is process 5 (--distributed=false).'),
    (distributed.Cluster('cloud_tpu_vm', None, None), False, 'Single process: Cloud TPU VM'),
])
def test_single_process_does_not_call_jax(recorded_initialize, caplog, cluster, force, log):
  with caplog.at_level(logging.INFO):
    assert not distributed.initialize_distributed(cluster, force)
  assert recorded_initialize == []
  assert log in caplog.text


def test_this_host_is_not_a_cloud_tpu_vm_unless_jax_says_so(monkeypatch):
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  assert distributed.cloud_tpu_vm_present() == cloud_tpu_init.running_in_cloud_tpu_vm
  monkeypatch.setattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', True)
  assert distributed.cloud_tpu_vm_present()


# ------------------------------------------------------------------ for real, two processes

_PROBE = """
import logging, os, jax, numpy as np
logging.basicConfig(level=logging.INFO)
from jax.experimental import multihost_utils
from diffusion_jax.parallel import distributed
cluster = distributed.detect_cluster(os.environ, distributed.cloud_tpu_vm_present())
assert distributed.initialize_distributed(cluster, None)
ranks = multihost_utils.process_allgather(np.asarray(jax.process_index() * 10 + 1))
print('probe', cluster.environment, jax.process_index(), jax.process_count(), ranks.tolist())
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('kind', ['slurm', 'ompi'])
def test_two_cpu_processes_initialise_from_a_fake_cluster_environment(kind, tmp_path):
  """2 processes with SLURM (or Open MPI) variables only: detected, connected, all-gathered."""
  port = str(_free_port())
  base = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARIABLES}
  base.update(PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', JAX_COORDINATOR_PORT=port,
              XLA_FLAGS='--xla_force_host_platform_device_count=1', TF_CPP_MIN_LOG_LEVEL='2')
  procs = []
  for rank in range(2):
    if kind == 'slurm':
      env = dict(base, SLURM_JOB_ID='4242', SLURM_STEP_NODELIST='localhost', SLURM_NTASKS='2',
                 SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
    else:
      env = dict(base, OMPI_MCA_orte_hnp_uri='4096.0;tcp://127.0.0.1:1', OMPI_COMM_WORLD_SIZE='2',
                 OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_RANK=str(rank))
    procs.append(subprocess.Popen([sys.executable, '-c', _PROBE], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    outs.append(out)
  for rank, out in enumerate(outs):
    assert f'probe {kind} {rank} 2 [1, 11]' in out, out[-3000:]
  assert 'this is process 1' in outs[1]
