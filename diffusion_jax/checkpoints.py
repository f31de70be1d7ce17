"""Checkpoints with orbax: save the whole train state every N steps, keep K, restore the newest.

Checkpoints live in `<workdir>/checkpoints/<step>/` (the workdir may be a gs:// path). Saving is
asynchronous: training continues while the arrays are written, and a checkpoint only appears
under its final name once it is complete. Restoring places each array straight onto the
sharding of the abstract state it is given, so a run can resume on another device count.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

PyTree = Any


def checkpoint_dir(workdir: str) -> epath.Path:
  """`<workdir>/checkpoints` as an absolute path (orbax refuses relative ones)."""
  path = epath.Path(workdir)
  if '://' not in str(workdir):
    path = path.absolute()
  return path / 'checkpoints'


def latest_step_on_disk(workdir: str) -> int:
  """The newest finished checkpoint step in `workdir` (0 if none), read without orbax or writes."""
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return 0
  return max([int(p.name) for p in directory.iterdir() if p.name.isdigit()], default=0)


def create_manager(workdir: str, keep: int = 3, async_save: bool = True,
                   read_only: bool = False, keep_every: int = 0) -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `<workdir>/checkpoints` keeping the newest `keep`.

  keep_every > 0 also keeps (never deletes) every checkpoint whose step is a multiple of it.
  Every process of a multi-host run creates the manager on the same (shared) path and calls
  `save` at the same steps; each writes its own shards, and process 0 finalises.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      keep_period=(keep_every if keep_every and keep_every > 0 and not read_only else None),
      enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
  # One standard item per step: without a declared handler, a step folder missing its item
  # would switch orbax to multi-item mode and make every older step unreadable too.
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def save(manager: ocp.CheckpointManager, step: int, state: PyTree) -> None:
  """Starts saving `state` as checkpoint `step` (returns before the write ends if async).

  A failure of the previous asynchronous save is raised here rather than lost.
  """
  manager.check_for_errors()
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def abstract_like(state: PyTree) -> PyTree:
  """ShapeDtypeStructs with the shardings of `state`: the target layout of a restore."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if isinstance(x, jax.Array) else x, state)


def restore_latest(manager: ocp.CheckpointManager, target: PyTree
                   ) -> Tuple[Optional[PyTree], Optional[int]]:
  """Restores the newest readable checkpoint onto `target`'s shapes and shardings.

  `target` is a state or its `abstract_like`. Returns (state, step), or (None, None) when
  there is no checkpoint. A newest checkpoint that cannot be read (corrupt, half-written) is
  skipped with a warning and the one before it is used.
  """
  abstract = abstract_like(target)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return manager.restore(step, args=ocp.args.StandardRestore(abstract)), step
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Checkpoint %d in %s cannot be restored (%s: %s); trying an older one.',
                      step, manager.directory, type(e).__name__, e)
  if manager.all_steps():
    raise ValueError(f'No checkpoint in {manager.directory} could be restored; see the warnings '
                     'above. Move the directory away to start over.')
  return None, None


def reached_preemption(step: int) -> bool:
  """True on every process at the same `step` once JAX's preemption service saw a SIGTERM.

  Only active when `jax.distributed` is initialised (Cloud TPU, multi-host GPU); elsewhere
  (and when the service is disabled) it returns False.
  """
  if jax.process_count() == 1:
    return False
  try:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except (RuntimeError, ValueError, AttributeError):
    return False


def restore_params(config, workdir: str, mesh: Mesh, use_ema: bool) -> tuple[PyTree, int]:
  """Loads the (EMA) parameters of the newest checkpoint in `workdir` onto `mesh`."""
  from diffusion_jax import models, sharding, train_state  # pylint: disable=g-import-not-at-top
  model = models.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  image_shape = (config.data.resolution, config.data.resolution, config.data.channels)
  replicated = sharding.replicated(mesh)
  abstract = jax.eval_shape(
      lambda: train_state.create_train_state(model, tx, jax.random.PRNGKey(0), image_shape, mesh))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          abstract)
  manager = create_manager(workdir, read_only=True, async_save=False)
  state, step = restore_latest(manager, abstract)
  manager.close()
  if state is None:
    raise FileNotFoundError(
        f'No checkpoint in {checkpoint_dir(workdir)}: train first with '
        f'`python main.py --config=... --workdir={workdir}` (--mode=train), or point '
        '--workdir at a run that has checkpoints.')
  return (state.ema_params if use_ema else state.params), step
