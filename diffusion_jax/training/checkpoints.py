"""Checkpoints with orbax: every N steps a self-describing checkpoint, keep K, restore the newest.

Checkpoints live in `<workdir>/checkpoints/<step>/` (the workdir may be a gs:// path). Each step
is an orbax Composite of named items, so a reader takes only what it needs:

  params/, ema_params/, opt_state/  the train state's parameter trees (one orbax item each)
  extra_emas/                        the extra EMAs ({key: tree}, ema.py), only when the run has
                                     any (optim.ema_decays / ema_sigma_rels)
  meta/                              every other TrainState field (step, num_updates)
  config/                            the run's resolved config (JSON, as <workdir>/config.json)
  data/                              the data position (JSON: seed, global batch size, dataset,
                                     split, next step; the batch at step s is a function of
                                     (seed, s), so this is all a resume needs)

Training restores the four state items; `--mode=sample|eval` and the converters restore only
`ema_params` (or `params`), straight into the FSDP shardings of the train state. Saving is
asynchronous: training continues while the arrays are written, and a checkpoint only appears
under its final name once it is complete. Restoring places each array straight onto the
sharding of the abstract state it is given, so a run can resume on another device count.
Checkpoints of older versions (one orbax item `default/` holding the whole state) are still read,
and so are those written before a TrainState field of `DEFAULTED_FIELDS` existed (it starts as
the field it defaults to).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from diffusion_jax.config import run_config

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


# The orbax items of a checkpoint (see the module docstring).
STATE_ITEMS = ('params', 'ema_params', 'opt_state')
META_ITEM = 'meta'
CONFIG_ITEM = 'config'
DATA_ITEM = 'data'
LEGACY_ITEM = 'default'  # Older checkpoints: the whole TrainState as one item.
# The extra EMAs (TrainState.extra_emas): an item only when there are any, so a run without
# them keeps the layout above; a checkpoint without it restores them from its `params`.
EXTRA_EMA_ITEM = 'extra_emas'
# Scalar TrainState fields (in `meta`) newer than some checkpoints: {field: the field whose
# restored value it starts as when a checkpoint lacks it}. `num_updates` counts applied updates;
# a checkpoint from before it counted them restores it as its `step`.
DEFAULTED_FIELDS = {'num_updates': 'step'}


def _handler_registry() -> ocp.handlers.CheckpointHandlerRegistry:
  """Which orbax handler saves and restores each named item (arrays: Standard, the rest JSON).

  Declaring every item up front keeps the manager in multi-item mode whatever a step folder
  holds, and lets a reader restore any subset of the items.
  """
  handlers: Dict[str, ocp.handlers.CheckpointHandler] = {
      name: ocp.StandardCheckpointHandler()
      for name in STATE_ITEMS + (META_ITEM, EXTRA_EMA_ITEM)}
  handlers.update({name: ocp.JsonCheckpointHandler() for name in (CONFIG_ITEM, DATA_ITEM)})
  return ocp.handlers.create_default_handler_registry(**handlers)


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
  directory = checkpoint_dir(workdir).parent / subdir
  return ocp.CheckpointManager(directory, options=options, handler_registry=_handler_registry())


def state_items(state: PyTree) -> Dict[str, PyTree]:
  """{'params', 'ema_params', 'opt_state': subtree, 'meta': {other field: value}} of a
  TrainState (or its abstract form): the orbax items it is saved as; plus 'extra_emas' when
  the state has extra EMAs."""
  fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  items = {name: fields.pop(name) for name in STATE_ITEMS}
  extra = fields.pop(EXTRA_EMA_ITEM, None)
  if jax.tree.leaves(extra):
    items[EXTRA_EMA_ITEM] = extra
  # A field left None (a state built by hand without `num_updates`) is not saved; it restores
  # from its default (DEFAULTED_FIELDS).
  items[META_ITEM] = {name: value for name, value in fields.items() if value is not None}
  return items


def state_from_items(like: PyTree, items: Dict[str, PyTree]) -> PyTree:
  """Inverse of `state_items`: a state of the type of `like` from its items."""
  extra = {EXTRA_EMA_ITEM: items[EXTRA_EMA_ITEM]} if EXTRA_EMA_ITEM in items else {}
  return type(like)(**{name: items[name] for name in STATE_ITEMS}, **items[META_ITEM], **extra)


def data_position(config: ml_collections.ConfigDict, step: int) -> Dict[str, Any]:
  """What a resume needs to continue the data order at `step`: the batch at step s is a pure
  function of (seed, s) for a given dataset, split and global batch size."""
  return {'seed': int(config.seed), 'global_batch_size': int(config.training.batch_size),
          'dataset': str(config.data.dataset), 'split': str(config.data.split),
          'next_step': int(step)}


def data_position_changes(manager: ocp.CheckpointManager, step: int,
                          config: ml_collections.ConfigDict) -> List[str]:
  """['seed: run has 0, requested 1', ...]: how this config's data order differs from the one
  checkpoint `step` was trained on (empty when it matches or the checkpoint has no data item)."""
  saved = saved_json(manager, step, DATA_ITEM)
  if saved is None:
    return []
  current = data_position(config, step)
  return [f'{name}: run has {saved[name]!r}, requested {current[name]!r}'
          for name in ('seed', 'global_batch_size', 'dataset', 'split')
          if name in saved and saved[name] != current[name]]


def save(manager: ocp.CheckpointManager, step: int, state: PyTree,
         config: Optional[ml_collections.ConfigDict] = None) -> None:
  """Starts saving `state` as checkpoint `step` (returns before the write ends if async).

  With `config` (training always passes it) the checkpoint also holds the resolved config and
  the data position (`data_position`), so it describes itself. A failure of the previous
  asynchronous save is raised here rather than lost.
  """
  manager.check_for_errors()
  items = {name: ocp.args.StandardSave(tree) for name, tree in state_items(state).items()}
  if config is not None:
    items[CONFIG_ITEM] = ocp.args.JsonSave(json.loads(run_config.config_to_json(config)))
    items[DATA_ITEM] = ocp.args.JsonSave(data_position(config, step))
  manager.save(step, args=ocp.args.Composite(**items), force=True)


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


def _step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  return epath.Path(manager.directory) / str(step)


def _saved_shapes(path: epath.Path, prefix: str = '') -> Dict[str, Tuple[int, ...]]:
  """{path: shape} of the arrays of one orbax item folder, read from its metadata only."""
  metadata = ocp.StandardCheckpointHandler().metadata(path)
  tree = getattr(metadata, 'tree', metadata)
  return {prefix + name: shape for name, shape in _shapes_by_path(tree).items()}


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract: PyTree,
                  names: Sequence[str], retries: int, backoff_s: float) -> Dict[str, PyTree]:
  """Reads the items `names` of checkpoint `step` onto `abstract`'s shapes and shardings.

  Only those items are opened (their metadata, then their arrays). Raises
  CheckpointMismatchError when an item's tree differs from `abstract`'s.
  """
  what = f'checkpoint {step} in {manager.directory}'
  step_dir = _step_dir(manager, step)
  legacy = (step_dir / LEGACY_ITEM).exists() and not (step_dir / STATE_ITEMS[0]).exists()
  if (legacy or not (step_dir / EXTRA_EMA_ITEM).exists()) and hasattr(abstract, EXTRA_EMA_ITEM):
    abstract = abstract.replace(extra_emas=None)  # Saved without extra EMAs: not read.
  wanted_items = {name: tree for name, tree in state_items(abstract).items() if name in names}
  if legacy:  # One item with the whole state; its paths start with the field names.
    saved = _with_retries(lambda: _saved_shapes(step_dir / LEGACY_ITEM), what, retries, backoff_s)
  else:
    saved = {}
    for name in wanted_items:
      prefix = '' if name == META_ITEM else name + '/'
      saved.update(_with_retries(lambda n=name, p=prefix: _saved_shapes(step_dir / n, p),
                                 what, retries, backoff_s))
  # Fields the checkpoint predates are not read; they start from their defaults below.
  defaulted = {name: source for name, source in DEFAULTED_FIELDS.items()
               if name in wanted_items.get(META_ITEM, {}) and name not in saved}
  if defaulted:
    abstract = abstract.replace(**{name: None for name in defaulted})
    wanted_items = {name: tree for name, tree in state_items(abstract).items() if name in names}
  wanted = _shapes_by_path(abstract) if legacy else {
      ('' if name == META_ITEM else name + '/') + path: shape
      for name, tree in wanted_items.items() for path, shape in _shapes_by_path(tree).items()}
  differences = structure_differences(saved, wanted)
  if differences:
    raise CheckpointMismatchError(
        f'Checkpoint {step} in {manager.directory} does not fit the configured model/'
        'optimizer (' + '; '.join(differences[:20]) +
        (f'; and {len(differences) - 20} more' if len(differences) > 20 else '') +
        '). Use the config the run was trained with (<workdir>/config.json), or a new '
        '--workdir.')
  if legacy:
    restored = _with_retries(
        lambda: ocp.StandardCheckpointHandler().restore(
            step_dir / LEGACY_ITEM, args=ocp.args.StandardRestore(abstract)),
        what, retries, backoff_s)
    items = {name: tree for name, tree in state_items(restored).items() if name in names}
  else:
    args = ocp.args.Composite(**{name: ocp.args.StandardRestore(tree)
                                 for name, tree in wanted_items.items()})
    restored = _with_retries(lambda: manager.restore(step, args=args), what, retries, backoff_s)
    items = {name: restored[name] for name in wanted_items}
  if defaulted:
    logging.info('Checkpoint %d in %s predates %s: restored as %s.', step, manager.directory,
                 sorted(defaulted), [defaulted[n] for n in sorted(defaulted)])
    items[META_ITEM] = _with_defaults(items[META_ITEM], defaulted)
  return items


def _with_defaults(meta: Dict[str, Any], defaulted: Dict[str, str]) -> Dict[str, Any]:
  """`meta` with each field of `defaulted` set to a copy of its source field (a copy: the
  train step donates the state, and one buffer cannot be donated twice)."""
  return dict(meta, **{name: jax.device_put(meta[source], meta[source].sharding, may_alias=False)
                       for name, source in defaulted.items()})


def restore_items(manager: ocp.CheckpointManager, target: PyTree, names: Sequence[str], *,
                  quarantine: bool = True, retries: int = 3, backoff_s: float = 1.0
                  ) -> Tuple[Optional[Dict[str, PyTree]], Optional[int]]:
  """Restores the items `names` (of `STATE_ITEMS` + `META_ITEM`) of the newest readable
  checkpoint onto the shapes and shardings of `target`'s corresponding fields.

  `target` is a TrainState or its `abstract_like` (only the fields named are allocated).
  Returns ({name: tree}, step), or (None, None) when there is no checkpoint. Three kinds of
  failure are told apart:
  - a transient I/O error (`is_transient_error`) is retried `retries` times with back-off
    1, 2, 4.. x `backoff_s` seconds, then raised (nothing is skipped or moved);
  - a checkpoint whose tree differs from `target` (keys, shapes) raises
    CheckpointMismatchError naming the differing paths: it is intact, just incompatible;
  - any other failure (garbled, truncated or missing files) marks the step corrupt: with a
    warning it is quarantined (`quarantine_step`, when `quarantine`) and the previous step
    is tried, so training resumes from there and can later save that step again.
  """
  abstract = abstract_like(target)
  corrupt = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return _restore_step(manager, step, abstract, names, retries, backoff_s), step
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


def restore_latest(manager: ocp.CheckpointManager, target: PyTree, *, quarantine: bool = True,
                   retries: int = 3, backoff_s: float = 1.0
                   ) -> Tuple[Optional[PyTree], Optional[int]]:
  """Restores the whole train state of the newest readable checkpoint onto `target`'s shapes
  and shardings: (state, step), or (None, None) without checkpoints. Failures as in
  `restore_items` (transient: retried; mismatch: CheckpointMismatchError; corrupt: quarantined
  and the previous step tried).

  Extra EMAs `target` has but the checkpoint lacks (saved before optim.ema_decays /
  ema_sigma_rels were set) start at the restored parameters, with a warning; a checkpoint
  with another set of extra EMAs is a CheckpointMismatchError."""
  items, step = restore_items(manager, target, STATE_ITEMS + (META_ITEM, EXTRA_EMA_ITEM),
                              quarantine=quarantine, retries=retries, backoff_s=backoff_s)
  if items is None:
    return None, None
  state = state_from_items(target, items)
  wanted_extra = getattr(target, EXTRA_EMA_ITEM, None)
  if jax.tree.leaves(wanted_extra) and EXTRA_EMA_ITEM not in items:
    logging.warning('Checkpoint %d in %s has no extra EMAs; %s start at its parameters.', step,
                    manager.directory, sorted(wanted_extra))
    shardings = jax.tree.map(lambda x: x.sharding, abstract_like(wanted_extra))
    start = jax.jit(lambda p: {key: jax.tree.map(lambda x: x.astype(jax.numpy.float32), p)
                               for key in wanted_extra}, out_shardings=shardings)
    state = state.replace(extra_emas=start(state.params))
  return state, step


def saved_json(manager: ocp.CheckpointManager, step: int, item: str) -> Optional[Dict[str, Any]]:
  """The JSON item `item` ('config' or 'data') of checkpoint `step`; None when the checkpoint
  has none (saved without a config, or by an older version) or it cannot be parsed."""
  path = _step_dir(manager, step) / item
  if not path.exists():
    return None
  try:
    return ocp.JsonCheckpointHandler().restore(path, args=ocp.args.JsonRestore())
  except Exception as e:  # pylint: disable=broad-except
    if is_transient_error(e):
      raise
    logging.warning('The %s item of checkpoint %d in %s is unreadable (%s: %s).', item, step,
                    manager.directory, type(e).__name__, e)
    return None


def saved_run_config(manager: ocp.CheckpointManager, workdir: str
                     ) -> Tuple[Optional[ml_collections.ConfigDict], str]:
  """(the config the run's checkpoints were written with, where it was read from).

  The 'config' item of the newest checkpoint that has a readable one, else
  `<workdir>/config.json`; (None, '') when the workdir has no checkpoint or neither exists.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None, ''
  for step in steps:
    saved = saved_json(manager, step, CONFIG_ITEM)
    if saved is not None:
      return run_config.config_from_json(json.dumps(saved)), f'checkpoint {step}'
  saved = run_config.load_run_config(workdir)
  return (saved, str(run_config.config_path(workdir))) if saved is not None else (None, '')


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


