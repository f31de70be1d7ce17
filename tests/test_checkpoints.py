"""Checkpoints: exact save/restore, re-sharding, keep-K, corrupt checkpoints, and the training
loop's resume / stop-on-NaN behaviour.

The checkpoint-manager tests use a small synthetic TrainState (a few parameter arrays, the real
optimizer's state after two updates), which needs no model compile. The training-loop tests run
`modes.train.train_and_evaluate` with the same small class-conditional config as
test_train_state.py; the persistent compilation cache shared by this session's test modules
means its train step and init are compiled once per session.
"""

import glob
import json
import logging
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import tiny  # pylint: disable=g-import-not-at-top
from diffusion_jax.training import checkpoints
from diffusion_jax.data import pipeline
from diffusion_jax.modes import train as train_mode
from diffusion_jax.parallel import sharding
from diffusion_jax.training import hooks
from diffusion_jax.training import run_log
from diffusion_jax.training import train_state


def small_config():
  """configs/tiny.py, class-conditional, batch 8, constant lr 2e-3 (as in test_train_state.py)."""
  config = tiny.get_config()
  config.model.unet.dropout = 0.0
  config.model.num_classes = 10
  config.training.cond_drop_prob = 0.5
  config.training.batch_size = 8
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 0
  config.optim.lr_schedule = 'constant'
  return config


def _leaves_with_paths(tree):
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_trees_equal(a, b):
  """Same structure, dtypes and bit-identical values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), (_, y) in zip(_leaves_with_paths(jax.device_get(a)),
                               _leaves_with_paths(jax.device_get(b))):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, path
    assert x.shape == y.shape, path
    np.testing.assert_array_equal(x, y, err_msg=path)


def _steps_on_disk(workdir):
  directory = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


# ------------------------------------------------------------------ manager-level tests

_TX = train_state.create_optimizer(small_config().optim, 100)


def make_state(mesh, seed=0, step=7):
  """A TrainState with float32 and bfloat16 leaves and a non-trivial Adam state (count 2)."""
  rng = np.random.default_rng(seed)
  params = {'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                     'bias': jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            'embed': jnp.asarray(rng.normal(size=(5, 3)), jnp.bfloat16)}
  opt_state = _TX.init(params)
  for _ in range(2):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, opt_state = _TX.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  ema = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  state = train_state.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                                 ema_params=ema, opt_state=opt_state)
  return jax.device_put(state, sharding.replicated(mesh))


@pytest.fixture(scope='module')
def meshes():
  config = small_config()
  return (sharding.create_mesh(config.mesh),
          sharding.create_mesh(config.mesh, devices=jax.devices()[:1]))


def _zeros_like(state):
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), state)


@pytest.mark.parametrize('async_save', [True, False])
def test_save_restore_is_exact(tmp_path, meshes, async_save):
  mesh8, _ = meshes
  state = make_state(mesh8)
  saved = jax.device_get(state)
  counts = [x for path, x in _leaves_with_paths(saved.opt_state) if 'count' in path]
  assert counts and all(int(c) == 2 for c in counts)  # Non-trivial optimizer state.
  manager = checkpoints.create_manager(str(tmp_path), keep=3, async_save=async_save)
  checkpoints.save(manager, 7, state)
  manager.wait_until_finished()
  manager.close()
  assert _steps_on_disk(tmp_path) == [7]

  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  target = _zeros_like(state)
  for tgt in (target, checkpoints.abstract_like(target)):
    restored, step = checkpoints.restore_latest(manager, tgt)
    assert step == 7
    assert_trees_equal(restored, saved)  # Every leaf, incl. opt_state and step, bit for bit.
    for (path, r), (_, t) in zip(_leaves_with_paths(restored), _leaves_with_paths(target)):
      assert r.sharding == t.sharding, path
  manager.close()


def test_restore_onto_another_mesh(tmp_path, meshes):
  """A checkpoint written from 8 devices restores onto a 1-device target with its sharding."""
  mesh8, mesh1 = meshes
  state = make_state(mesh8, seed=3, step=11)
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  checkpoints.save(manager, 11, state)
  manager.close()

  target = make_state(mesh1, seed=4, step=0)  # Same structure, other values, 1 device.
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  restored, step = checkpoints.restore_latest(manager, target)
  manager.close()
  assert step == 11
  assert_trees_equal(restored, jax.device_get(state))
  for path, leaf in _leaves_with_paths(restored):
    assert leaf.sharding == sharding.replicated(mesh1), path
    assert leaf.sharding.device_set == {jax.devices()[0]}, path


def test_keeps_newest_k(tmp_path, meshes):
  mesh8, _ = meshes
  manager = checkpoints.create_manager(str(tmp_path), keep=2, async_save=True)
  states = {}
  for step in range(1, 6):
    states[step] = make_state(mesh8, seed=step, step=step)
    checkpoints.save(manager, step, states[step])
  manager.wait_until_finished()
  assert manager.all_steps() == [4, 5]
  manager.close()
  assert _steps_on_disk(tmp_path) == [4, 5]
  assert checkpoints.latest_step_on_disk(str(tmp_path)) == 5
  manager = checkpoints.create_manager(str(tmp_path), keep=2, async_save=False)
  restored, step = checkpoints.restore_latest(manager, _zeros_like(states[5]))
  manager.close()
  assert step == 5
  assert_trees_equal(restored, states[5])


def _corrupt(step_dir: pathlib.Path, how: str):
  """Damages the train-state items of one checkpoint (params, ema_params, opt_state, meta)."""
  items = [step_dir / name for name in checkpoints.STATE_ITEMS + (checkpoints.META_ITEM,)]
  assert all(item.is_dir() for item in items)
  files = [p for item in items for p in item.rglob('*') if p.is_file()]
  assert files
  if how == 'garbage':
    for p in files:
      p.write_bytes(b'\x00garbage\xff' * 3)
  elif how == 'truncated':
    for p in files:
      p.write_bytes(b'')
  elif how == 'files_deleted':
    for p in files:
      p.unlink()
  elif how == 'array_data_garbage':  # Metadata intact, array chunks unreadable.
    for p in files:
      if p.parent.name == 'd':
        p.write_bytes(b'garbage')
  elif how == 'item_dir_deleted':
    shutil.rmtree(items[0])
  else:
    raise ValueError(how)


# orbax leaves a callback on a closed asyncio loop when reading garbage array data fails; the
# resulting 'Event loop is closed' unraisable-exception warning is orbax-internal noise.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('how', ['garbage', 'truncated', 'files_deleted', 'array_data_garbage',
                                 'item_dir_deleted'])
def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, meshes, caplog, how):
  # 'item_dir_deleted': a step folder missing an item must not switch orbax's manager into
  # another item mode (which made every older step unreadable with the deprecated single-item
  # API); the handler registry of checkpoints.create_manager declares every item up front.
  mesh8, _ = meshes
  first, second = make_state(mesh8, seed=1, step=1), make_state(mesh8, seed=2, step=2)
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  checkpoints.save(manager, 1, first)
  checkpoints.save(manager, 2, second)
  manager.close()
  _corrupt(tmp_path / 'checkpoints' / '2', how)

  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  with caplog.at_level(logging.WARNING):
    restored, step = checkpoints.restore_latest(manager, _zeros_like(first))
  manager.close()
  assert step == 1
  assert_trees_equal(restored, first)
  assert any('Checkpoint 2' in r.getMessage() and 'cannot be restored' in r.getMessage()
             for r in caplog.records)
  # Quarantined, so step 2 can be saved again (orbax refuses an existing step even with force).
  directory = tmp_path / 'checkpoints'
  assert (directory / '2.corrupt').is_dir() and not (directory / '2').exists()
  assert _steps_on_disk(tmp_path) == [1]
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  checkpoints.save(manager, 2, second)
  restored, step = checkpoints.restore_latest(manager, _zeros_like(second))
  manager.close()
  assert step == 2
  assert_trees_equal(restored, second)


def test_structure_mismatch_is_an_error_naming_the_paths(tmp_path, meshes):
  """A checkpoint of another model is intact: an error lists the differing paths and
  nothing is skipped or moved."""
  mesh8, _ = meshes
  state = make_state(mesh8, step=3)
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  checkpoints.save(manager, 3, state)
  target = _zeros_like(state)
  params = dict(target.params, extra=jnp.zeros((2,), jnp.float32),
                conv=dict(target.params['conv'], bias=jnp.zeros((5,), jnp.float32)))
  target = target.replace(params=params)
  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    checkpoints.restore_latest(manager, target)
  manager.close()
  message = str(info.value)
  assert 'missing in the checkpoint: params/extra' in message
  assert 'shape of params/conv/bias: checkpoint (4,) vs state (5,)' in message
  assert 'ema_params' not in message  # Only the differing paths are named.
  assert _steps_on_disk(tmp_path) == [3]
  assert not list((tmp_path / 'checkpoints').glob('*.corrupt*'))


def test_manager_uses_only_non_deprecated_orbax_options(tmp_path, monkeypatch):
  """orbax 0.12 deprecates item_handlers / item_names / checkpointers (use handler_registry)
  and max_to_keep / keep_period (use preservation_policy)."""
  seen = {}
  real_init = ocp.CheckpointManager.__init__

  def spy(self, directory, *args, **kwargs):
    seen.update(kwargs, positional=args)
    return real_init(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, '__init__', spy)
  checkpoints.create_manager(str(tmp_path), keep=2, keep_every=4).close()
  assert seen['positional'] == ()
  assert all(seen.get(name) is None for name in ('checkpointers', 'item_names', 'item_handlers'))
  assert isinstance(seen['handler_registry'], ocp.handlers.DefaultCheckpointHandlerRegistry)
  for item in checkpoints.STATE_ITEMS + (checkpoints.META_ITEM,):
    assert seen['handler_registry'].has(item, ocp.args.StandardRestore)
  for item in (checkpoints.CONFIG_ITEM, checkpoints.DATA_ITEM):
    assert seen['handler_registry'].has(item, ocp.args.JsonRestore)
  options = seen['options']
  assert options.max_to_keep is None and options.keep_period is None
  assert options.preservation_policy is not None


def test_legacy_single_item_checkpoint_is_still_read(tmp_path, meshes):
  """A checkpoint of the previous layout (the whole state as orbax's one 'default' item) is
  restored whole, and its EMA alone, without being taken for a corrupt step."""
  mesh8, _ = meshes
  state = make_state(mesh8, seed=5, step=4)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  legacy = ocp.CheckpointManager(tmp_path / 'checkpoints', options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())
  legacy.save(4, args=ocp.args.StandardSave(state))
  legacy.close()
  assert (tmp_path / 'checkpoints' / '4' / 'default').is_dir()
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  restored, step = checkpoints.restore_latest(manager, _zeros_like(state))
  assert step == 4
  assert_trees_equal(restored, state)
  items, step = checkpoints.restore_items(manager, _zeros_like(state), ('ema_params',))
  assert step == 4 and list(items) == ['ema_params']
  assert_trees_equal(items['ema_params'], state.ema_params)
  assert checkpoints.saved_run_config(manager, str(tmp_path)) == (None, '')  # Had none.
  manager.close()
  assert _steps_on_disk(tmp_path) == [4]


@pytest.mark.parametrize('layout', ['items', 'legacy'])
def test_checkpoint_without_num_updates_restores_it_as_its_step(tmp_path, meshes, layout):
  """A checkpoint written before TrainState.num_updates existed (its meta item holds only
  'step'; or the legacy single item) restores with num_updates = step, in a buffer of its own:
  the train step donates the state, and two leaves on one buffer cannot both be donated. A
  state saved with the field round-trips it, even where it differs from the step."""
  mesh8, _ = meshes
  old = make_state(mesh8, seed=3, step=5)  # num_updates None: what the old code wrote.
  assert old.num_updates is None
  assert set(checkpoints.state_items(old)[checkpoints.META_ITEM]) == {'step'}
  if layout == 'legacy':
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    writer = ocp.CheckpointManager(tmp_path / 'checkpoints', options=options,
                                   item_handlers=ocp.StandardCheckpointHandler())
    writer.save(5, args=ocp.args.StandardSave(old))
  else:
    writer = checkpoints.create_manager(str(tmp_path), async_save=False)
    checkpoints.save(writer, 5, old)
  writer.wait_until_finished()
  writer.close()
  counter = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh8))
  target = _zeros_like(old).replace(num_updates=counter)
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  restored, step = checkpoints.restore_latest(manager, target)
  assert step == 5 and int(restored.num_updates) == 5 and int(restored.step) == 5
  assert restored.num_updates.sharding.is_equivalent_to(counter.sharding, 0)
  assert_trees_equal(restored.replace(num_updates=None), old)
  bumped = jax.jit(lambda s: s.replace(step=s.step + 1, num_updates=s.num_updates + 1),
                   donate_argnums=0)(restored)  # Would raise on one buffer donated twice.
  assert (int(bumped.step), int(bumped.num_updates)) == (6, 6)
  if layout == 'items':  # The new layout keeps the field: 2 applied updates in 7 steps.
    new = old.replace(step=jnp.asarray(7, jnp.int32), num_updates=jnp.asarray(2, jnp.int32))
    checkpoints.save(manager, 7, new)
    manager.wait_until_finished()
    restored, step = checkpoints.restore_latest(manager, target)
    assert step == 7 and (int(restored.step), int(restored.num_updates)) == (7, 2)
  manager.close()


def test_is_transient_error():
  import errno  # pylint: disable=g-import-not-at-top
  assert checkpoints.is_transient_error(TimeoutError('read timed out'))
  assert checkpoints.is_transient_error(OSError(errno.ETIMEDOUT, 'x'))
  assert checkpoints.is_transient_error(OSError('GET ...: 503 Service Unavailable'))
  wrapped = RuntimeError('restore failed')
  wrapped.__cause__ = ConnectionResetError('reset')
  assert checkpoints.is_transient_error(wrapped)
  assert not checkpoints.is_transient_error(FileNotFoundError(errno.ENOENT, 'gone'))
  assert not checkpoints.is_transient_error(OSError(errno.EIO, 'bad data'))
  assert not checkpoints.is_transient_error(ValueError('garbled 503 bytes'))


@pytest.mark.parametrize('failures', [2, 5])
def test_transient_read_errors_are_retried_not_quarantined(tmp_path, meshes, monkeypatch,
                                                           failures):
  """Two 503s then success: the newest step is restored. More than `retries`: the error is
  raised and the step stays where it is."""
  mesh8, _ = meshes
  first, second = make_state(mesh8, seed=1, step=1), make_state(mesh8, seed=2, step=2)
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  checkpoints.save(manager, 1, first)
  checkpoints.save(manager, 2, second)
  calls = []
  real_restore = manager.restore

  def flaky_restore(step, *args, **kwargs):
    calls.append(step)
    if len(calls) <= failures:
      raise OSError('GCS read: 503 Service Unavailable')
    return real_restore(step, *args, **kwargs)

  monkeypatch.setattr(manager, 'restore', flaky_restore)
  if failures <= 3:
    restored, step = checkpoints.restore_latest(manager, _zeros_like(second), retries=3,
                                                backoff_s=0.0)
    assert step == 2 and calls == [2] * (failures + 1)
    assert_trees_equal(restored, second)
  else:
    with pytest.raises(OSError, match='503'):
      checkpoints.restore_latest(manager, _zeros_like(second), retries=3, backoff_s=0.0)
    assert calls == [2] * 4
  manager.close()
  assert _steps_on_disk(tmp_path) == [1, 2]


def test_no_readable_checkpoint_raises(tmp_path, meshes):
  mesh8, _ = meshes
  state = make_state(mesh8)
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  checkpoints.save(manager, 1, state)
  checkpoints.save(manager, 2, state)
  manager.close()
  for step in (1, 2):
    _corrupt(tmp_path / 'checkpoints' / str(step), 'garbage')
  manager = checkpoints.create_manager(str(tmp_path), async_save=False)
  with pytest.raises(ValueError, match='could be restored'):
    checkpoints.restore_latest(manager, _zeros_like(state))
  manager.close()


def test_restore_without_checkpoints(tmp_path, meshes):
  mesh8, _ = meshes
  manager = checkpoints.create_manager(str(tmp_path / 'run'), async_save=False)
  assert checkpoints.restore_latest(manager, make_state(mesh8)) == (None, None)
  manager.close()


def test_latest_step_on_disk(tmp_path, meshes):
  workdir = tmp_path / 'run'
  assert checkpoints.latest_step_on_disk(str(workdir)) == 0
  assert not workdir.exists()  # Reading does not create anything.
  mesh8, _ = meshes
  manager = checkpoints.create_manager(str(workdir), keep=5, async_save=False)
  for step in (3, 7, 12):
    checkpoints.save(manager, step, make_state(mesh8, step=step))
  manager.close()
  assert checkpoints.latest_step_on_disk(str(workdir)) == 12
  # Unfinished (temporary) checkpoints and other files are not steps.
  (workdir / 'checkpoints' / '20.orbax-checkpoint-tmp-123').mkdir()
  (workdir / 'checkpoints' / 'notes').mkdir()
  assert checkpoints.latest_step_on_disk(str(workdir)) == 12


# ------------------------------------------------------------------ the training loop


def loop_config(num_train_steps, **training):
  config = small_config()
  config.training.num_train_steps = num_train_steps
  config.training.checkpoint_every_steps = 2
  config.training.log_every_steps = 2
  config.training.sample_every_steps = 100  # More than the run's steps: only the final grid.
  # Extra EMAs (ema.py) and power-EMA snapshots: the resume below is bit-exact with them too.
  config.optim.ema_decays = (0.9,)
  config.optim.ema_sigma_rels = (0.1,)
  config.optim.ema_snapshot_every_steps = 2
  config.training.update(training)
  return config


def _scalar_steps(workdir, tag='loss'):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  steps = []
  for path in sorted(glob.glob(os.path.join(str(workdir), 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      steps += [event.step for value in event.summary.value if value.tag == tag]
  return sorted(steps)


def _files(workdir):
  return sorted(str(p.relative_to(workdir)) for p in pathlib.Path(workdir).rglob('*')
                if p.is_file() and 'events.out.tfevents' not in p.name)


def _restore_step(workdir, step, like):
  """Checkpoint `step` of `workdir` read with plain orbax (its named items) into a TrainState."""
  manager = checkpoints.create_manager(str(workdir), async_save=False)
  items = checkpoints.state_items(checkpoints.abstract_like(like))
  restored = manager.restore(step, args=ocp.args.Composite(
      **{name: ocp.args.StandardRestore(tree) for name, tree in items.items()}))
  manager.close()
  return checkpoints.state_from_items(like, {name: restored[name] for name in items})


@pytest.fixture(scope='module')
def resumed_run(tmp_path_factory):
  """Train 4 steps, resume to 6, run the finished command once more; and, for reference,
  6 uninterrupted steps in another workdir."""
  workdir = tmp_path_factory.mktemp('resume')
  first = jax.device_get(train_mode.train_and_evaluate(
      loop_config(4, async_checkpointing=True), str(workdir)))
  after_first = {'steps': _steps_on_disk(workdir), 'loss_steps': _scalar_steps(workdir),
                 'files': _files(workdir)}
  second = jax.device_get(train_mode.train_and_evaluate(loop_config(6), str(workdir)))
  after_second = {'steps': _steps_on_disk(workdir), 'loss_steps': _scalar_steps(workdir),
                  'files': _files(workdir)}
  third = train_mode.train_and_evaluate(loop_config(6), str(workdir))
  reference_dir = tmp_path_factory.mktemp('uninterrupted')
  uninterrupted = jax.device_get(train_mode.train_and_evaluate(loop_config(6), str(reference_dir)))
  return dict(workdir=workdir, first=first, second=second, third=third,
              after_first=after_first, after_second=after_second,
              uninterrupted=uninterrupted, reference_dir=reference_dir)


def test_first_run_trains_and_checkpoints(resumed_run):
  run = resumed_run
  assert int(run['first'].step) == 4
  assert run['after_first']['steps'] == [2, 4]
  assert run['after_first']['loss_steps'] == [2, 4]
  assert 'samples/train_step_00000004.png' in run['after_first']['files']
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(run['first']))
  assert_trees_equal(_restore_step(run['workdir'], 4, run['first']), run['first'])
  from diffusion_jax.config import run_config  # pylint: disable=g-import-not-at-top
  assert 'config.json' in run['after_first']['files']
  saved = run_config.load_run_config(str(run['workdir']))  # Rewritten by the last start (6).
  assert saved.training.num_train_steps == 6 and saved.model.unet.ch_mult == (1, 2)


def test_checkpoints_hold_their_config_and_data_position(resumed_run):
  """Each checkpoint is a Composite of named items: the state's parts, the config it was
  written with (step 4: the 4-step first run; step 6: the 6-step resume) and the data position."""
  from diffusion_jax.config import run_config  # pylint: disable=g-import-not-at-top
  workdir = resumed_run['workdir']
  step_dir = workdir / 'checkpoints' / '6'
  assert {'params', 'ema_params', 'opt_state', 'meta', 'config', 'data'} <= {
      p.name for p in step_dir.iterdir()}
  assert not (step_dir / 'default').exists()
  manager = checkpoints.create_manager(str(workdir), read_only=True, async_save=False)
  for step, config in ((4, loop_config(4, async_checkpointing=True)), (6, loop_config(6))):
    saved = run_config.config_from_json(
        json.dumps(checkpoints.saved_json(manager, step, checkpoints.CONFIG_ITEM)))
    assert saved.to_dict() == config.to_dict()
    assert saved.model.unet.ch_mult == (1, 2)  # Tuples come back as tuples.
    data = checkpoints.saved_json(manager, step, checkpoints.DATA_ITEM)
    assert data == {'seed': config.seed, 'global_batch_size': 8, 'dataset': config.data.dataset,
                    'split': config.data.split, 'next_step': step}
  saved, source = checkpoints.saved_run_config(manager, str(workdir))
  assert source == 'checkpoint 6' and saved.training.num_train_steps == 6
  # A resume with another seed or batch is told that the data order changes.
  config = loop_config(6)
  assert checkpoints.data_position_changes(manager, 6, config) == []
  config.seed += 1
  config.training.batch_size = 16
  assert checkpoints.data_position_changes(manager, 6, config) == [
      f'seed: run has {config.seed - 1}, requested {config.seed}',
      'global_batch_size: run has 8, requested 16']
  manager.close()


def _tree_snapshot(root):
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in pathlib.Path(root).rglob('*') if p.is_file()}


def test_resume_with_another_network_is_a_config_error(resumed_run, tmp_path):
  """Resuming with changed model/diffusion fields raises ConfigError (a usage error in main.py)
  listing each field with both values, before anything is read or written; the checkpoint's
  own config is used, and <workdir>/config.json when the checkpoints have none."""
  from diffusion_jax.config.errors import ConfigError  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  shutil.copytree(resumed_run['workdir'], workdir)
  changed = loop_config(8)
  changed.model.unet.ch = 32
  changed.diffusion.ddpm.num_timesteps = 50
  changed.optim.learning_rate = 1e-4  # Allowed: not part of the network.
  (workdir / 'config.json').unlink()  # The checkpoint's config is the reference.
  before = _tree_snapshot(workdir)
  with pytest.raises(ConfigError) as info:
    train_mode.train_and_evaluate(changed, str(workdir))
  message = str(info.value)
  assert 'model.unet.ch: run has 16, requested 32' in message
  assert 'diffusion.ddpm.num_timesteps: run has 100, requested 50' in message
  assert 'checkpoint 6' in message and 'learning_rate' not in message
  assert _tree_snapshot(workdir) == before  # Nothing written, moved or deleted.

  # Checkpoints without a config item (written by older versions): config.json decides.
  from diffusion_jax.config import run_config  # pylint: disable=g-import-not-at-top
  for step in _steps_on_disk(workdir):
    shutil.rmtree(workdir / 'checkpoints' / str(step) / checkpoints.CONFIG_ITEM)
  run_config.save_run_config(loop_config(6), str(workdir))
  before = _tree_snapshot(workdir)
  with pytest.raises(ConfigError, match=r'config\.json(.|\n)*model\.unet\.ch: run has 16, requested 32'):
    train_mode.train_and_evaluate(changed, str(workdir))
  assert _tree_snapshot(workdir) == before


def test_flatten_config_for_hparams():
  flat = run_log.flatten_config(loop_config(6))
  assert flat['training.num_train_steps'] == 6
  assert flat['model.unet.ch_mult'] == '(1, 2)'
  assert flat['optim.lr_schedule'] == 'constant'
  assert not any(isinstance(v, (dict, tuple, list)) for v in flat.values())


def test_resume_continues_from_the_checkpoint(resumed_run):
  """The second call restores step 4 and trains only steps 5 and 6; since the data order is a
  function of the step (training/loop.py), the result equals 6 uninterrupted steps bit for bit."""
  run = resumed_run
  first, second = run['first'], run['second']
  assert int(second.step) == 6
  assert run['after_second']['steps'] == [2, 4, 6]
  # Steps 2 and 4 were logged by the first run, 6 by the second; nothing was redone.
  assert run['after_second']['loss_steps'] == [2, 4, 6]
  assert 'samples/train_step_00000006.png' in run['after_second']['files']
  assert not np.array_equal(second.params['conv_out']['kernel'],
                            first.params['conv_out']['kernel'])
  assert_trees_equal(_restore_step(run['workdir'], 6, second), second)
  assert_trees_equal(_restore_step(run['workdir'], 4, first), first)  # Kept, unchanged.
  # A resume that restarted from scratch, skipped the restore or replayed other batches
  # would not reproduce the uninterrupted run.
  assert int(run['uninterrupted'].step) == 6
  assert sorted(second.extra_emas) == ['decay_0p9', 'sigma_rel_0p1']
  assert_trees_equal(second, run['uninterrupted'])  # Including the extra EMAs.
  assert sorted(int(p.name) for p in (run['workdir'] / 'ema_snapshots').iterdir()
                if p.name.isdigit()) == [2, 4, 6]
  assert_trees_equal(_restore_step(run['reference_dir'], 4, first), first)


def test_rerun_after_completion_does_nothing(resumed_run):
  run = resumed_run
  assert int(run['third'].step) == 6
  assert_trees_equal(run['third'], run['second'])
  assert _steps_on_disk(run['workdir']) == [2, 4, 6]
  assert _scalar_steps(run['workdir']) == [2, 4, 6]  # No step was trained or logged again.
  assert _files(run['workdir']) == run['after_second']['files']  # No new samples or checkpoints.


@pytest.mark.parametrize('log_every', [2, 100])
def test_nonfinite_loss_stops_training_and_keeps_last_good_checkpoint(
    tmp_path, monkeypatch, resumed_run, log_every):
  """Batches 3.. are NaN: the loop raises NonFiniteLossError at step 4 (from the metrics log
  when log_every=2, from the pre-checkpoint check when log_every=100) and never saves a bad
  state; checkpoint 2 stays restorable and equals the healthy run's checkpoint 2."""
  real_global_batches = pipeline.global_batches

  def poisoned(dataset, batch_sharding):
    for i, batch in enumerate(real_global_batches(dataset, batch_sharding)):
      if i >= 2:
        batch = dict(batch, image=batch['image'] * jnp.nan)
      yield batch

  monkeypatch.setattr(pipeline, 'global_batches', poisoned)
  workdir = tmp_path / 'nan_run'
  with pytest.raises(hooks.NonFiniteLossError, match='NaN/Inf'):
    train_mode.train_and_evaluate(loop_config(6, log_every_steps=log_every), str(workdir))
  assert _steps_on_disk(workdir) == [2]
  manager = checkpoints.create_manager(str(workdir), async_save=False)
  restored, step = checkpoints.restore_latest(manager, jax.device_put(
      resumed_run['first'], sharding.replicated(sharding.create_mesh(small_config().mesh))))
  manager.close()
  assert step == 2 and int(restored.step) == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored))
  # Same config, seed and data as the healthy run: its step-2 checkpoint, bit for bit.
  healthy = _restore_step(resumed_run['workdir'], 2, restored)
  assert_trees_equal(restored, healthy)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupt_newest_checkpoint_is_quarantined_and_saved_again(tmp_path, resumed_run):
  """A 4-step run whose checkpoint 4 is corrupted resumes from 2, trains past 4 and saves 4
  and 6 again (no StepAlreadyExistsError crash loop); the new 4 is the healthy run's 4."""
  workdir = tmp_path / 'corrupt_run'
  train_mode.train_and_evaluate(loop_config(4), str(workdir))
  assert _steps_on_disk(workdir) == [2, 4]
  _corrupt(workdir / 'checkpoints' / '4', 'array_data_garbage')
  final = jax.device_get(train_mode.train_and_evaluate(loop_config(6), str(workdir)))
  assert _steps_on_disk(workdir) == [2, 4, 6]
  assert (workdir / 'checkpoints' / '4.corrupt').is_dir()
  assert_trees_equal(final, resumed_run['uninterrupted'])
  assert_trees_equal(_restore_step(workdir, 4, resumed_run['first']), resumed_run['first'])


def _optim(grad_clip, optimizer, weight_decay=0.0):
  config = small_config().optim
  config.grad_clip, config.optimizer, config.weight_decay = grad_clip, optimizer, weight_decay
  return config


def test_optimizer_state_tree_is_the_same_for_every_clip_and_adam_variant():
  """So grad_clip and adam/adamw may change on resume; the 'off' settings are exact no-ops."""
  params = {'w': jnp.arange(6, dtype=jnp.float32).reshape(2, 3) - 2.0, 'b': jnp.ones((3,))}
  grads = jax.tree.map(lambda p: 3.0 * p + 0.5, params)
  structures = {jax.tree.structure(train_state.create_optimizer(_optim(c, o), 10).init(params))
                for c in (0.0, 1.0) for o in ('adam', 'adamw')}
  assert len(structures) == 1
  # grad_clip=0 adam equals plain optax.adam bit for bit (two updates).
  ours, plain = train_state.create_optimizer(_optim(0.0, 'adam'), 10), optax.adam(2e-3)
  s_ours, s_plain, p_ours, p_plain = ours.init(params), plain.init(params), params, params
  for _ in range(2):
    u_ours, s_ours = ours.update(grads, s_ours, p_ours)
    u_plain, s_plain = plain.update(grads, s_plain, p_plain)
    assert_trees_equal(u_ours, u_plain)
    p_ours, p_plain = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_plain, u_plain)
  # grad_clip=1 rescales these gradients (norm > 1): the clip is really in the chain.
  clipped = train_state.create_optimizer(_optim(1.0, 'adam'), 10)
  u_clip, _ = clipped.update(grads, clipped.init(params), params)
  u_free, _ = ours.update(grads, ours.init(params), params)
  assert not np.array_equal(np.asarray(u_clip['w']), np.asarray(u_free['w']))


def test_resume_with_other_grad_clip_and_optimizer(tmp_path):
  """2 steps with grad_clip=1 adam, then resume with grad_clip=0 adamw: restores and trains."""
  workdir = str(tmp_path / 'switch')
  first = loop_config(2)
  first.optim.grad_clip, first.optim.optimizer = 1.0, 'adam'
  state2 = jax.device_get(train_mode.train_and_evaluate(first, workdir))
  second = loop_config(4)
  second.optim.grad_clip, second.optim.optimizer, second.optim.weight_decay = 0.0, 'adamw', 0.1
  state4 = jax.device_get(train_mode.train_and_evaluate(second, workdir))
  assert int(state4.step) == 4 and _steps_on_disk(workdir) == [2, 4]
  counts = [int(x) for path, x in _leaves_with_paths(state4.opt_state) if 'count' in path]
  assert counts and all(c == 4 for c in counts)  # Adam moments continued from step 2.
  assert not np.array_equal(state4.params['conv_out']['kernel'], state2.params['conv_out']['kernel'])
