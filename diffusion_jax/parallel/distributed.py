"""Which cluster this process runs in, and `jax.distributed.initialize()` when it is one.

`detect_cluster` is a pure function of an environment mapping (and of whether this host is a
Cloud TPU VM), so every launcher's environment can be checked with a fake one. It mirrors the
cluster detection of JAX itself (`jax/_src/clusters`: each `ClusterEnv.is_env_present`, in the
same order: Open MPI, SLURM, GKE TPU, Cloud TPU VM), reads only variables and never the network,
and `initialize_distributed` then hands JAX the name of the environment found
(`cluster_detection_method`), so that JAX reads the same environment the log line reports.

A Cloud TPU VM (`gcloud compute tpus tpu-vm ssh --worker=all`) has no variable naming its
workers: JAX learns them from the GCE metadata server. It is recognised here as JAX does, by TPU
chips on the PCI bus plus libtpu (`jax._src.cloud_tpu_init.running_in_cloud_tpu_vm`, read from
`/sys` when jax is imported); only then is JAX allowed to query the metadata server, inside
`jax.distributed.initialize()`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

import jax

# Names of `jax.distributed.initialize(cluster_detection_method=...)`, per environment.
_JAX_CLUSTER_METHOD = {'ompi': 'ompi', 'slurm': 'slurm', 'gke_tpu': 'gketpu',
                       'cloud_tpu_vm': 'gcetpu'}

_DESCRIPTION = {
    'ompi': 'Open MPI (mpirun)',
    'slurm': 'SLURM (srun)',
    'gke_tpu': 'Cloud TPU on GKE',
    'cloud_tpu_vm': 'Cloud TPU VM',
    'flags': '--coordinator_address/--num_processes/--process_id',
    'none': 'no cluster',
}

# The variables JAX's own ClusterEnv classes test (jax/_src/clusters/*.py, jax 0.10).
_OMPI_PRESENT = ('OMPI_MCA_orte_hnp_uri',)
_SLURM_PRESENT = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                  'SLURM_LOCALID')
_GKE_TPU_WORKERS = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')  # The first one set wins.


@dataclasses.dataclass(frozen=True)
class Cluster:
  """What `detect_cluster` found.

  environment: 'ompi' | 'slurm' | 'gke_tpu' | 'cloud_tpu_vm' | 'flags' | 'none'.
  num_processes, process_id: None where only JAX can tell (a Cloud TPU VM asks the metadata
    server for its workers).
  coordinator_address: 'host:port' for 'flags' (JAX derives it itself elsewhere).
  """
  environment: str
  num_processes: int | None
  process_id: int | None
  coordinator_address: str | None = None

  @property
  def is_multi_process(self) -> bool:
    """True unless the environment is known to hold a single process."""
    return self.environment != 'none' and (self.num_processes is None or self.num_processes > 1)

  def describe(self) -> str:
    """One line for the log: environment, process count, this process."""
    if self.environment == 'none':
      return ('no cluster detected (no SLURM job step, Open MPI job, Cloud TPU VM or '
              '--coordinator_address)')
    count = ('process count from the TPU metadata server' if self.num_processes is None
             else f'{self.num_processes} process{"es" if self.num_processes != 1 else ""}')
    this = 'this process id from the metadata server' if self.process_id is None else (
        f'this is process {self.process_id}')
    where = f', coordinator {self.coordinator_address}' if self.coordinator_address else ''
    return f'{_DESCRIPTION[self.environment]}: {count}, {this}{where}'


def _int_variable(environ: Mapping[str, str], name: str) -> int:
  if name not in environ:
    raise ValueError(f'Environment variable {name} is not set, although the other variables of '
                     'its cluster are: start the job with its launcher (srun, mpirun, the TPU '
                     'runtime) or give --coordinator_address/--num_processes/--process_id.')
  try:
    return int(environ[name])
  except ValueError as e:
    raise ValueError(f'Environment variable {name}={environ[name]!r} is not an integer; '
                     'the cluster launcher set it wrongly (unset it to run single-process).') from e


def _from_flags(coordinator_address: str, num_processes: int | None,
                process_id: int | None) -> Cluster:
  if num_processes is None or process_id is None:
    raise ValueError('--coordinator_address needs --num_processes and --process_id as well '
                     '(e.g. --num_processes=2 --process_id=0 on the first host).')
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} must be in 0..--num_processes-1 '
                     f'(--num_processes={num_processes}).')
  if ':' not in coordinator_address:
    raise ValueError(f'--coordinator_address={coordinator_address!r} must be host:port '
                     '(process 0 listens on that port), e.g. 10.0.0.2:1234.')
  return Cluster('flags', num_processes, process_id, coordinator_address)


def detect_cluster(environ: Mapping[str, str], on_cloud_tpu_vm: bool,
                   coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None) -> Cluster:
  """The cluster this process belongs to, from its environment variables (no I/O at all).

  Explicit flags win; then JAX's own order: Open MPI, SLURM, GKE TPU, Cloud TPU VM.

  Args:
    environ: the environment, e.g. `os.environ`.
    on_cloud_tpu_vm: whether this host has TPU chips and libtpu (`cloud_tpu_vm_present()`).
    coordinator_address, num_processes, process_id: main.py's flags (None when not given).

  Raises:
    ValueError: partial or inconsistent flags, or a cluster variable that is not an integer.
  """
  if coordinator_address:
    return _from_flags(coordinator_address, num_processes, process_id)
  if num_processes is not None or process_id is not None:
    raise ValueError('--num_processes/--process_id need --coordinator_address=host:port '
                     '(the address of process 0) as well.')
  if all(name in environ for name in _OMPI_PRESENT):
    return Cluster('ompi', _int_variable(environ, 'OMPI_COMM_WORLD_SIZE'),
                   _int_variable(environ, 'OMPI_COMM_WORLD_RANK'))
  if all(name in environ for name in _SLURM_PRESENT):
    return Cluster('slurm', _int_variable(environ, 'SLURM_NTASKS'),
                   _int_variable(environ, 'SLURM_PROCID'))
  if not on_cloud_tpu_vm:
    return Cluster('none', 1, 0)
  workers = next((environ[name] for name in _GKE_TPU_WORKERS if name in environ), None)
  if workers is None:
    return Cluster('cloud_tpu_vm', None, None)
  # One slice has len(workers) hosts; a multi-slice job numbers hosts slice after slice.
  hosts_per_slice = len(workers.split(','))
  num_slices = _int_variable(environ, 'MEGASCALE_NUM_SLICES') if environ.get(
      'MEGASCALE_NUM_SLICES') else 1
  slice_id = _int_variable(environ, 'MEGASCALE_SLICE_ID') if environ.get(
      'MEGASCALE_SLICE_ID') else 0
  return Cluster('gke_tpu', hosts_per_slice * num_slices,
                 _int_variable(environ, 'TPU_WORKER_ID') + slice_id * hosts_per_slice)


def cloud_tpu_vm_present() -> bool:
  """JAX's own verdict, taken from `/sys` when jax was imported: TPU chips and libtpu here."""
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def initialize_distributed(cluster: Cluster, force: bool | None) -> bool:
  """Calls `jax.distributed.initialize()` for `cluster`; returns whether it did.

  Args:
    cluster: from `detect_cluster`.
    force: main.py's --distributed: True always initialises (with nothing detected JAX tries
      every environment it knows, Kubernetes included), False never, None when `cluster` has
      several processes (or a count only JAX can read).

  CPU processes exchange collectives over gloo (multi-process CPU runs, tests, debugging); the
  setting has no effect on GPU or TPU.
  """
  wanted = cluster.is_multi_process if force is None else force
  if not wanted:
    reason = ' (--distributed=false)' if force is False and cluster.environment != 'none' else ''
    logging.info('Single process: %s%s.', cluster.describe(), reason)
    return False
  logging.info('Calling jax.distributed.initialize(): %s.', cluster.describe())
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if cluster.environment == 'flags':
    jax.distributed.initialize(coordinator_address=cluster.coordinator_address,
                               num_processes=cluster.num_processes,
                               process_id=cluster.process_id,
                               cluster_detection_method='deactivate')
  elif cluster.environment == 'none':
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(cluster_detection_method=_JAX_CLUSTER_METHOD[cluster.environment])
  logging.info('jax.distributed initialised: process %d of %d.', jax.process_index(),
               jax.process_count())
  return True
