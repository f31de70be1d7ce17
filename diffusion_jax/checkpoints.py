"""Checkpoints with orbax: save the whole train state every N steps, keep K, restore the newest.

Checkpoints live in `<workdir>/checkpoints/<step>/` (the workdir may be a gs:// path). Saving is
asynchronous: training continues while the arrays are written, and a checkpoint only appears
under its final name once it is complete. Restoring places each array straight onto the
sharding of the abstract state it is given, so a run can resume on another device count.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

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


class NoCheckpointError(FileNotFoundError):
  """The workdir has no checkpoint to restore (train first, or point --workdir at a run)."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree differs from the state it is restored into (keys or shapes).

  Not corruption: the checkpoint is intact but was written by another model/optimizer
  configuration, so it is neither skipped nor quarantined.
  """


# errno values of a read that may succeed when tried again (network file systems, GCS fuse).
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT,
                               errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
                               errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN})
# Messages of storage-service errors that are retried (HTTP 429/5xx from GCS and the like).
_TRANSIENT_MESSAGE = re.compile(
    r'\b(429|500|502|503|504)\b|service unavailable|too many requests|temporarily|timed? ?out',
    re.IGNORECASE)


def is_transient_error(error: BaseException) -> bool:
  """True for an I/O error that a retry may cure; False for a missing or garbled file.

  The rule: TimeoutError and ConnectionError are transient; any other OSError is transient
  only when its errno says so (EAGAIN, EBUSY, EINTR, ETIMEDOUT, connection/network errnos) or
  its message names an HTTP 429/5xx or a time-out. FileNotFoundError, a missing file, a
  decoding error or any non-OSError are not transient: they mark the checkpoint as corrupt.
  The chained causes (`__cause__`, `__context__`) are inspected too, since orbax and
  TensorStore wrap the underlying error.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (TimeoutError, ConnectionError)):
      return True
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
      if error.errno in _TRANSIENT_ERRNOS or _TRANSIENT_MESSAGE.search(str(error)):
        return True
    error = error.__cause__ or error.__context__
  return False


def create_manager(workdir: str, keep: int = 3, async_save: bool = True,
                   read_only: bool = False, keep_every: int = 0,
                   subdir: str = 'checkpoints') -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `<workdir>/<subdir>` keeping the newest `keep`.

  keep_every > 0 also keeps (never deletes) every checkpoint whose step is a multiple of it.
  Every process of a multi-host run creates the manager on the same (shared) path and calls
  `save` at the same steps; each writes its own shards, and process 0 finalises.
  """
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  if keep_every and keep_every > 0 and not read_only:
    policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every))
  options = ocp.CheckpointManagerOptions(
      create=not read_only, read_only=read_only,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
  # One standard item per step: without a declared handler, a step folder missing its item
  # would switch orbax to multi-item mode and make every older step unreadable too.
  directory = checkpoint_dir(workdir).parent / subdir
  return ocp.CheckpointManager(directory, options=options,
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


def _path_name(path) -> str:
  """'opt_state/1/0/mu/conv/kernel' for a key path of a state or of orbax's metadata."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _shapes_by_path(tree: PyTree) -> Dict[str, Tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(p): tuple(getattr(x, 'shape', ())) for p, x in leaves}


def structure_differences(saved: Dict[str, Tuple[int, ...]],
                          target: Dict[str, Tuple[int, ...]]) -> List[str]:
  """Human-readable differences between two {path: shape} maps (empty when they agree)."""
  lines = [f'missing in the checkpoint: {p}' for p in sorted(target.keys() - saved.keys())]
  lines += [f'not in the state: {p}' for p in sorted(saved.keys() - target.keys())]
  lines += [f'shape of {p}: checkpoint {saved[p]} vs state {target[p]}'
            for p in sorted(saved.keys() & target.keys()) if saved[p] != target[p]]
  return lines


def quarantine_step(manager: ocp.CheckpointManager, step: int) -> None:
  """Renames `<dir>/<step>` to `<dir>/<step>.corrupt[.N]` so the step can be saved again.

  Process 0 renames; every process then waits at a barrier so none sees a half-renamed
  directory. Orbax ignores the renamed folder (its name is not a step).
  """
  directory = epath.Path(manager.directory)
  if jax.process_index() == 0:
    source = directory / str(step)
    target = directory / f'{step}.corrupt'
    suffix = 1
    while target.exists():
      target, suffix = directory / f'{step}.corrupt.{suffix}', suffix + 1
    if source.exists():
      source.rename(target)
      logging.warning('Moved the unreadable checkpoint %s to %s.', source, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'quarantine checkpoint {step}')
  manager.reload()


def _with_retries(read: Callable[[], Any], what: str, retries: int, backoff_s: float) -> Any:
  """`read()`, retried `retries` times (exponential back-off) on a transient I/O error."""
  for attempt in range(retries + 1):
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except
      if attempt == retries or not is_transient_error(e):
        raise
      delay = backoff_s * 2 ** attempt
      logging.warning('Transient error reading %s (%s: %s); retrying in %.1f s.',
                      what, type(e).__name__, e, delay)
      time.sleep(delay)
  raise AssertionError('unreachable')


def restore_latest(manager: ocp.CheckpointManager, target: PyTree, *, quarantine: bool = True,
                   retries: int = 3, backoff_s: float = 1.0
                   ) -> Tuple[Optional[PyTree], Optional[int]]:
  """Restores the newest readable checkpoint onto `target`'s shapes and shardings.

  `target` is a state or its `abstract_like`. Returns (state, step), or (None, None) when
  there is no checkpoint. Three kinds of failure are told apart:
  - a transient I/O error (`is_transient_error`) is retried `retries` times with back-off
    1, 2, 4.. x `backoff_s` seconds, then raised (nothing is skipped or moved);
  - a checkpoint whose tree differs from `target` (keys, shapes) raises
    CheckpointMismatchError naming the differing paths: it is intact, just incompatible;
  - any other failure (garbled, truncated or missing files) marks the step corrupt: with a
    warning it is quarantined (`quarantine_step`, when `quarantine`) and the previous step
    is tried, so training resumes from there and can later save that step again.
  """
  abstract = abstract_like(target)
  wanted = _shapes_by_path(abstract)
  corrupt = []
  for step in sorted(manager.all_steps(), reverse=True):
    what = f'checkpoint {step} in {manager.directory}'
    try:
      saved = _with_retries(lambda s=step: _shapes_by_path(manager.item_metadata(s)),
                            what, retries, backoff_s)
      if saved:
        differences = structure_differences(saved, wanted)
        if differences:
          raise CheckpointMismatchError(
              f'Checkpoint {step} in {manager.directory} does not fit the configured model/'
              'optimizer (' + '; '.join(differences[:20]) +
              (f'; and {len(differences) - 20} more' if len(differences) > 20 else '') +
              '). Use the config the run was trained with (<workdir>/config.json), or a new '
              '--workdir.')
      restored = _with_retries(
          lambda s=step: manager.restore(s, args=ocp.args.StandardRestore(abstract)),
          what, retries, backoff_s)
      return restored, step
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if is_transient_error(e):
        raise
      logging.warning('Checkpoint %d in %s cannot be restored (%s: %s); it is corrupt, '
                      'trying an older one.', step, manager.directory, type(e).__name__, e)
      corrupt.append(step)
      if quarantine:
        quarantine_step(manager, step)
  if corrupt:
    raise ValueError(f'No checkpoint in {manager.directory} could be restored (corrupt steps: '
                     f'{corrupt}); see the warnings above. Move the directory away to start '
                     'over.')
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
  state, step = restore_latest(manager, abstract, quarantine=False)
  manager.close()
  if state is None:
    raise NoCheckpointError(
        f'No checkpoint in {checkpoint_dir(workdir)}: train first with '
        f'`python main.py --config=... --workdir={workdir}` (--mode=train), or point '
        '--workdir at a run that has checkpoints.')
  return (state.ema_params if use_ema else state.params), step
