"""Device mesh and shardings: a 2-D mesh ('data', 'fsdp'), the batch split over both axes.

The same code runs on 1 CPU, 8 GPUs or a multi-host TPU pod: every array is a global
`jax.Array` whose layout is a `NamedSharding` over one `jax.sharding.Mesh`.

* The batch (dim 0) is split over all devices of the mesh: `P(('data', 'fsdp'))`.
* Train-state tensors (params, EMA, optimizer moments) are sharded FSDP-style: a tensor with at
  least `mesh.fsdp_min_size` elements is split along its largest dimension that the `fsdp`
  axis size divides; smaller tensors (biases, norms, scalars) are replicated. Inside the
  compiled step XLA all-gathers a sharded weight where it is used and reduce-scatters its
  gradient, so each device stores ~1/fsdp of the state.
* With `mesh.fsdp = 1` (the default) this is plain data parallelism with a replicated state.
* On the CPU a process is split into several XLA devices, one per core by default
  (`mesh.cpu_devices`): XLA:CPU runs a convolution of the small shapes of a CPU-sized model on
  one thread, so data parallelism over the cores is what keeps them all busy.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
DEFAULT_FSDP_MIN_SIZE = 2**14  # Elements; smaller tensors are replicated.


def mesh_shape(mesh_config, num_devices: int) -> Tuple[int, int]:
  """(data, fsdp) sizes for `num_devices`; -1 on one axis means 'the devices that are left'."""
  data = int(mesh_config['data'])
  fsdp = int(mesh_config['fsdp'])
  if data == -1 and fsdp == -1:
    raise ValueError('mesh.data and mesh.fsdp cannot both be -1.')
  if fsdp == -1:
    fsdp = num_devices // data if data > 0 else 0
  if data == -1:
    data = num_devices // fsdp if fsdp > 0 else 0
  if data <= 0 or fsdp <= 0 or data * fsdp > num_devices or num_devices % (data * fsdp):
    raise ValueError(
        f'mesh.data={mesh_config["data"]} x mesh.fsdp={mesh_config["fsdp"]} '
        f'does not fit {num_devices} devices; use sizes whose product divides the device count '
        '(-1 on one axis = the rest).')
  return data, fsdp


def create_mesh(mesh_config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp') mesh over the first data * fsdp of `devices` (default: all).

  Devices keep the order of `jax.devices()` (grouped by process), so each host's devices
  hold one contiguous block of the batch. On TPU, a mesh over all the devices follows the
  physical torus (`mesh_utils.create_device_mesh`); over several slices (devices with distinct
  `slice_index`) the data axis spans the slices over DCN and each slice holds whole FSDP
  groups on its ICI (`create_hybrid_device_mesh`), so only the gradient all-reduce of data
  parallelism crosses slices. --mode=compile builds a pod's mesh with this same rule.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(mesh_config, len(devices))
  whole = data * fsdp == len(devices)
  devices = devices[:data * fsdp]
  grid = None
  if devices[0].platform == 'tpu' and whole:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
    if num_slices > 1:
      if data % num_slices:
        raise ValueError(
            f'mesh.data={data} must be a multiple of the {num_slices} slices (DCN carries the '
            'data axis; FSDP groups stay inside a slice); use mesh.data=-1 or a multiple.')
      grid = mesh_utils.create_hybrid_device_mesh(
          (data // num_slices, fsdp), (num_slices, 1), devices, allow_split_physical_axes=True)
    else:
      for split in (False, True):  # Whole torus axes per mesh axis where the sizes allow.
        try:
          grid = mesh_utils.create_device_mesh((data, fsdp), devices,
                                               allow_split_physical_axes=split)
          break
        except Exception:  # pylint: disable=broad-except  # Unusual topologies: plain order.
          grid = None
  if grid is None:
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES)


def _axes(mesh: Mesh) -> Tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) dimension over every device of the mesh."""
  return NamedSharding(mesh, P(_axes(mesh)))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """For [steps, batch, ...] arrays: dim 0 (steps of one call) whole, dim 1 sharded."""
  return NamedSharding(mesh, P(None, _axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  """PartitionSpec of one state tensor: its largest fsdp-divisible dimension on 'fsdp'.

  Replicated when fsdp_size == 1, the tensor has fewer than `min_size` elements, or no
  dimension is divisible by `fsdp_size`. Ties go to the last dimension (output channels).
  """
  if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0 and d >= fsdp_size]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda i: (shape[i], i))
  spec = [None] * len(shape)
  spec[dim] = FSDP_AXIS
  return P(*spec)


def state_shardings(abstract_state: PyTree, mesh: Mesh,
                    min_size: int = DEFAULT_FSDP_MIN_SIZE) -> PyTree:
  """NamedShardings for every leaf of a (params, EMA, optimizer) state by `fsdp_spec`."""
  fsdp_size = mesh.shape.get(FSDP_AXIS, 1)
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size, min_size)),
      abstract_state)


def fsdp_min_size(mesh_config) -> int:
  """`mesh.fsdp_min_size` (tensors with fewer elements stay replicated)."""
  return int(mesh_config['fsdp_min_size'])


def _cpu_devices_error(value: Any) -> Optional[str]:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    return (f'mesh.cpu_devices={value!r} must be an integer >= 0: the XLA devices one process '
            'splits its CPU into, 0 = one per core (as many as every batch splits over).')
  return None


def cpu_device_count(mesh_config, batch_sizes: Sequence[int], num_cores: int) -> int:
  """XLA CPU devices for one process: `mesh.cpu_devices`, or for 0 (auto) the most devices, at
  most one per core, that every global batch in `batch_sizes` splits evenly over and that the
  mesh uses whole (none idle).

  Measured on 2 cores (benchmarks/RESULTS.md): 2 devices train the digits U-Net 1.4-1.6x and
  sample it 1.6-2x as fast as 1; 4 devices on those 2 cores are slower than 2.
  """
  error = _cpu_devices_error(mesh_config['cpu_devices'])
  if error:
    raise ValueError(error)
  if mesh_config['cpu_devices'] > 0:
    return int(mesh_config['cpu_devices'])
  common = math.gcd(*[b for b in batch_sizes if b > 0]) or 1
  for n in range(max(num_cores, 1), 0, -1):
    if common % n:
      continue
    try:
      data, fsdp = mesh_shape(mesh_config, n)
    except ValueError:
      continue
    if data * fsdp == n:
      return n
  return 1


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def configure_cpu_devices(mesh_config, batch_sizes: Sequence[int], multi_process: bool = False,
                          environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
  """Splits the CPU into `cpu_device_count` XLA devices (`jax_num_cpu_devices`); call it before
  JAX starts a backend. Only the CPU backend reads the count.

  Returns it, or None where auto (`mesh.cpu_devices=0`) leaves JAX alone: in a multi-process
  job (a GPU or TPU cluster; `launch/local_cpu.sh` chooses its own count) and under an explicit
  `--xla_force_host_platform_device_count` in XLA_FLAGS (as the tests set it).
  """
  environ = os.environ if environ is None else environ
  if mesh_config['cpu_devices'] == 0 and (
      multi_process or 'xla_force_host_platform_device_count' in environ.get('XLA_FLAGS', '')):
    return None
  count = cpu_device_count(mesh_config, batch_sizes, usable_cores())
  jax.config.update('jax_num_cpu_devices', count)
  return count


def check_mesh_config(mesh_config, num_devices: int) -> Tuple[List[str], int]:
  """(problems with `config.mesh` on `num_devices`, the devices that share the batch = data x
  fsdp). A mesh leaving devices idle is an error unless mesh.allow_idle_devices (then a loud
  warning)."""
  errors: List[str] = []
  cpu_devices_error = _cpu_devices_error(mesh_config['cpu_devices'])
  if cpu_devices_error:
    errors.append(cpu_devices_error)
  if mesh_config["fsdp_min_size"] < 0:
    errors.append(f'mesh.fsdp_min_size={mesh_config["fsdp_min_size"]} must be >= 0.')
  try:  # The batch is split over both mesh axes.
    data_size, fsdp_size = mesh_shape(mesh_config, num_devices)
  except ValueError as e:
    errors.append(str(e))
    return errors, num_devices
  used = data_size * fsdp_size
  if used < num_devices:
    message = (f'mesh.data={mesh_config["data"]} x mesh.fsdp={mesh_config["fsdp"]} uses {used} of '
               f'the {num_devices} devices, leaving {num_devices - used} idle; use -1 on one '
               'axis (= the rest) or set mesh.allow_idle_devices=True on purpose.')
    if mesh_config["allow_idle_devices"]:
      logging.warning('IDLE DEVICES: %s', message)
    else:
      errors.append(message)
  return errors, used


def check_batch(field: str, value: int, data_devices: int, num_processes: int) -> List[str]:
  """A global batch (`field`) must split evenly over the devices sharing it and the processes."""
  if value <= 0 or value % data_devices or value % num_processes:
    step = max(data_devices, num_processes)
    return [f'{field}={value} must be a positive multiple of the {data_devices} devices on the '
            f'data axis and of the {num_processes} processes; e.g. '
            f'{step * max(1, -(-value // step))}.']
  return []
