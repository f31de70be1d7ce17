"""Multi-host array helpers: the full value of a global array on every host, and this host's rows."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) global array on every host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """(row numbers, values) of the rows of a batch-sharded `x` held by this process's devices.

  Each row is returned once (replica 0 of its shard), so over all processes every row appears
  exactly once. Sorted by row number.
  """
  starts, values = [], []
  for shard in x.addressable_shards:
    if shard.replica_id != 0:
      continue
    data = np.asarray(shard.data)
    start = (shard.index[0].start or 0) if shard.index else 0
    starts.append(np.arange(start, start + data.shape[0]))
    values.append(data)
  if not values:
    return np.zeros((0,), np.int64), np.zeros((0,) + x.shape[1:], x.dtype)
  rows, values = np.concatenate(starts), np.concatenate(values)
  order = np.argsort(rows, kind='stable')
  return rows[order], values[order]
