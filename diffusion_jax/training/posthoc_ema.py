"""EMA snapshots during training and `--mode=posthoc_ema`: any power-function EMA afterwards.

Training with `optim.ema_sigma_rels` (e.g. EDM2's (0.05, 0.1)) and
`optim.ema_snapshot_every_steps` = N > 0 saves, every N steps and at the last step, the power
EMAs of the state to

  <workdir>/ema_snapshots/<step>/power_emas/   {state key: float32 parameter tree} (orbax)
                                 info/         JSON: {'step', 'updates',
                                                      'emas': {key: {sigma_rel, gamma}}}

where 'updates' is the count of optimizer updates applied up to that step (TrainState.
num_updates: `step` less the non-finite steps skipped with training.on_nonfinite='skip'), the t
of the power EMAs (snapshots of older runs have no 'updates': their step is taken),

an orbax CheckpointManager of its own that never deletes (training.keep_checkpoints does not
apply). Each process writes its shards; orbax's multi-host save finalises on process 0.

  python main.py --config=... --workdir=... --mode=posthoc_ema --config.posthoc_ema.sigma_rel=0.08

then fits the power EMA of that sigma_rel at step `posthoc_ema.step` (-1: the newest snapshot)
as a linear combination of every snapshot up to that step (ema_lib.solve_posthoc: least squares over
the EMA profiles, Karras et al. 2024, Sec. 3.2), logs the profile's relative fit error, and
writes the combined parameters to

  <workdir>/posthoc_ema/sigma_rel_<s>/<step>/ema_params/  (float32, the parameters' tree)
                                           fit/         JSON: weights, snapshots, fit error

which `--mode=sample|eval` read with `sample.ema` / `eval.ema` = 'posthoc:<s>'. Snapshots are
read one at a time onto the parameters' FSDP shardings and accumulated in float32, so memory is
two parameter copies (plus one snapshot) whatever the number of snapshots.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from diffusion_jax.config.errors import ConfigError
from diffusion_jax.parallel import sharding
from diffusion_jax.training import checkpoints
from diffusion_jax.training import ema as ema_lib
from diffusion_jax.training import train_state

PyTree = Any
SNAPSHOT_SUBDIR = 'ema_snapshots'
RECONSTRUCTION_SUBDIR = 'posthoc_ema'
SNAPSHOT_ITEM = 'power_emas'
INFO_ITEM = 'info'
PARAMS_ITEM = 'ema_params'
FIT_ITEM = 'fit'


def snapshot_dir(workdir: str) -> epath.Path:
  """`<workdir>/ema_snapshots` (absolute, as orbax needs)."""
  return checkpoints.checkpoint_dir(workdir).parent / SNAPSHOT_SUBDIR


def reconstruction_dir(workdir: str, sigma_rel: float) -> epath.Path:
  """`<workdir>/posthoc_ema/sigma_rel_<s>` ('.' written as 'p': sigma_rel_0p08)."""
  return (checkpoints.checkpoint_dir(workdir).parent / RECONSTRUCTION_SUBDIR /
          ema_lib.state_key(ema_lib.SIGMA_REL, sigma_rel))


def _manager(directory: epath.Path, arrays: str, json_item: str, async_save: bool,
             read_only: bool) -> ocp.CheckpointManager:
  """A CheckpointManager keeping every step, with one array item and one JSON item."""
  registry = ocp.handlers.create_default_handler_registry(
      **{arrays: ocp.StandardCheckpointHandler(), json_item: ocp.JsonCheckpointHandler()})
  options = ocp.CheckpointManagerOptions(
      create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def create_snapshot_manager(workdir: str, async_save: bool = True,
                            read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of `<workdir>/ema_snapshots` (keeps every snapshot)."""
  return _manager(snapshot_dir(workdir), SNAPSHOT_ITEM, INFO_ITEM, async_save, read_only)


def save_snapshot(manager: ocp.CheckpointManager, step: int, extra_emas: Dict[str, PyTree],
                  specs: Sequence[ema_lib.EmaSpec], updates: Optional[int] = None) -> bool:
  """Starts saving the power EMAs `specs` of `extra_emas` as snapshot `step`, after `updates`
  applied optimizer updates (TrainState.num_updates; default `step`, no step skipped); False
  (nothing written) when that snapshot exists (a resumed run redoing steps reproduces it
  exactly)."""
  manager.check_for_errors()
  if step in manager.all_steps():
    return False
  trees = {spec.key: extra_emas[spec.key] for spec in specs}
  info = {'step': int(step), 'updates': int(step if updates is None else updates),
          'emas': {spec.key: {'sigma_rel': spec.value, 'gamma': spec.gamma} for spec in specs}}
  manager.save(step, args=ocp.args.Composite(**{
      SNAPSHOT_ITEM: ocp.args.StandardSave(trees), INFO_ITEM: ocp.args.JsonSave(info)}),
               force=True)
  return True


def list_snapshots(workdir: str) -> List[Dict[str, Any]]:
  """[{'step', 'updates', 'emas': {key: {'sigma_rel', 'gamma'}}}] of every snapshot, by step
  ('updates' is `step` in a snapshot written before it was recorded)."""
  if not snapshot_dir(workdir).exists():
    return []
  manager = create_snapshot_manager(workdir, async_save=False, read_only=True)
  try:
    out = []
    for step in sorted(manager.all_steps()):
      path = snapshot_dir(workdir) / str(step) / INFO_ITEM
      info = ocp.JsonCheckpointHandler().restore(path, args=ocp.args.JsonRestore())
      out.append({'updates': info['step'], **info})
    return out
  finally:
    manager.close()


def plan(config, workdir: str) -> Dict[str, Any]:
  """What `reconstruct` will do, from the snapshots' JSON alone (no arrays read): the target
  step and its applied-update count, gamma, the (step, key) of each snapshot used, their
  weights and the fit error.

  The profiles are functions of applied updates (a power EMA's t is TrainState.num_updates,
  which a skipped non-finite step does not advance): each snapshot is a power EMA at its
  'updates', and the target at the updates of the newest snapshot at or before
  `posthoc_ema.step` plus the steps after it (none of which is known to be skipped). A snapshot
  taken before any update (every step skipped) is no power EMA and is left out.

  Raises ConfigError when there is no snapshot (naming the fields that enable them) or none at
  or before `posthoc_ema.step`.
  """
  pcfg = config.posthoc_ema
  snapshots = list_snapshots(workdir)
  if not snapshots:
    raise ConfigError(
        f'No EMA snapshots in {snapshot_dir(workdir)}: --mode=posthoc_ema needs a run trained '
        'with optim.ema_sigma_rels (e.g. (0.05, 0.1)) and optim.ema_snapshot_every_steps > 0 '
        "(e.g. --config.optim.ema_sigma_rels='(0.05, 0.1)' "
        '--config.optim.ema_snapshot_every_steps=1000).')
  steps = [s['step'] for s in snapshots]
  target = max(steps) if pcfg.step == -1 else int(pcfg.step)
  used = [s for s in snapshots if s['step'] <= target]
  if not used:
    raise ConfigError(f'posthoc_ema.step={pcfg.step} is before the first EMA snapshot (step '
                      f'{min(steps)}); snapshots are at steps {steps[:10]}...')
  if target > max(steps):
    raise ConfigError(f'posthoc_ema.step={pcfg.step} is after the newest EMA snapshot (step '
                      f'{max(steps)}); use -1 or a step <= {max(steps)}.')
  target_updates = int(used[-1]['updates']) + target - int(used[-1]['step'])
  used = [s for s in used if s['updates'] > 0]
  if not used or target_updates <= 0:
    raise ConfigError(f'No optimizer update was applied up to step {target} (every step was '
                      'skipped as non-finite): there is no EMA to reconstruct there.')
  columns = [(s['step'], key, float(v['gamma']), int(s['updates'])) for s in used
             for key, v in sorted(s['emas'].items())]
  gamma = ema_lib.sigma_rel_to_gamma(pcfg.sigma_rel)
  weights, error = ema_lib.solve_posthoc([c[3] for c in columns], [c[2] for c in columns],
                                         target_updates, gamma, pcfg.profile)
  return {'sigma_rel': float(pcfg.sigma_rel), 'gamma': gamma, 'step': target,
          'updates': target_updates, 'profile': pcfg.profile, 'relative_error': error,
          'snapshots': [[int(s), key, float(w)] for (s, key, _, _), w in zip(columns, weights)]}


def reconstruct(config, workdir: str, mesh: Optional[Mesh] = None) -> epath.Path:
  """`--mode=posthoc_ema`: writes the reconstructed EMA of `posthoc_ema.sigma_rel`; returns the
  folder `<workdir>/posthoc_ema/sigma_rel_<s>/<step>`. A reconstruction of the same sigma_rel
  and step written before is replaced (it is recomputed from the same snapshots)."""
  fit = plan(config, workdir)  # Every input check before any array is read.
  logging.info('Post-hoc EMA sigma_rel=%g (gamma=%.4f) at step %d from %d snapshot profiles: '
               'relative L2 fit error of the EMA profile %.3g (%s inner products).',
               fit['sigma_rel'], fit['gamma'], fit['step'], len(fit['snapshots']),
               fit['relative_error'], fit['profile'])
  mesh = mesh or sharding.create_mesh(config.mesh)
  abstract = train_state.abstract_train_state(config, mesh).ema_params
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  axpy = jax.jit(lambda acc, x, w: jax.tree.map(lambda a, b: a + w * b, acc, x),
                 out_shardings=shardings, donate_argnums=0)
  acc = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
                out_shardings=shardings)()
  by_step: Dict[int, List[Tuple[str, float]]] = {}
  for step, key, weight in fit['snapshots']:
    by_step.setdefault(step, []).append((key, weight))
  reader = create_snapshot_manager(workdir, async_save=False, read_only=True)
  try:
    for step, terms in sorted(by_step.items()):
      target = {key: abstract for key, _ in terms}
      restored = reader.restore(step, args=ocp.args.Composite(**{
          SNAPSHOT_ITEM: ocp.args.StandardRestore(target)}))[SNAPSHOT_ITEM]
      for key, weight in terms:
        acc = axpy(acc, restored[key], jnp.float32(weight))
  finally:
    reader.close()
  directory = reconstruction_dir(workdir, fit['sigma_rel'])
  writer = _manager(directory, PARAMS_ITEM, FIT_ITEM, async_save=False, read_only=False)
  try:
    if fit['step'] in writer.all_steps():
      logging.info('Replacing the reconstruction at step %d in %s.', fit['step'], directory)
      writer.delete(fit['step'])
    writer.save(fit['step'], args=ocp.args.Composite(**{
        PARAMS_ITEM: ocp.args.StandardSave(acc), FIT_ITEM: ocp.args.JsonSave(fit)}), force=True)
    writer.wait_until_finished()
  finally:
    writer.close()
  out = directory / str(fit['step'])
  logging.info('Wrote the post-hoc EMA to %s; sample it with --config.sample.ema=posthoc:%r.',
               out, fit['sigma_rel'])
  return out


def restore_reconstruction(workdir: str, sigma_rel: float, abstract_params: PyTree
                           ) -> Tuple[PyTree, int]:
  """(parameters, step) of the newest reconstruction of `sigma_rel`, onto `abstract_params`'s
  shapes and shardings. Raises NoCheckpointError (naming the command) when there is none."""
  directory = reconstruction_dir(workdir, sigma_rel)
  step = None
  if directory.exists():
    manager = _manager(directory, PARAMS_ITEM, FIT_ITEM, async_save=False, read_only=True)
    try:
      step = manager.latest_step()
      if step is not None:
        restored = manager.restore(step, args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardRestore(abstract_params)}))
        return restored[PARAMS_ITEM], step
    finally:
      manager.close()
  raise checkpoints.NoCheckpointError(
      f'No post-hoc EMA of sigma_rel={sigma_rel!r} in {directory}: write it first with '
      f'`python main.py --config=... --workdir={workdir} --mode=posthoc_ema '
      f'--config.posthoc_ema.sigma_rel={sigma_rel!r}`.')


def read_fit(path: epath.Path) -> Dict[str, Any]:
  """The 'fit' JSON of a reconstruction folder `<...>/sigma_rel_<s>/<step>`."""
  return ocp.JsonCheckpointHandler().restore(path / FIT_ITEM, args=ocp.args.JsonRestore())
