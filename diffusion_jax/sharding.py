"""Device mesh and shardings: the batch is split over the `data` axis, the train state replicated.

The same code runs on 1 CPU, 8 GPUs or a multi-host TPU pod: every array is a global
`jax.Array` whose layout is given by a `NamedSharding` over one `jax.sharding.Mesh`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh(mesh_config, devices=None) -> Mesh:
  """A 1-D mesh with axis 'data' over `mesh.data` devices (-1 = all of `devices`)."""
  devices = list(jax.devices() if devices is None else devices)
  size = len(devices) if mesh_config.data == -1 else mesh_config.data
  if size <= 0 or size > len(devices) or len(devices) % size:
    raise ValueError(f'mesh.data={mesh_config.data} does not fit {len(devices)} devices; '
                     'use -1 (all devices) or a divisor of the device count.')
  return Mesh(np.asarray(devices[:size]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) dimension over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device of the mesh."""
  return NamedSharding(mesh, P())
