"""Reading trained parameters back: the newest checkpoint's EMA (or raw) parameters, an extra
EMA, or a post-hoc reconstruction, straight into the FSDP layout of the run's mesh; and the
noisy classifier of classifier guidance (sample.classifier_workdir)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from diffusion_jax.config import run_config
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.nn import backbones
from diffusion_jax.pipelines import sampler
from diffusion_jax.training import ema as ema_lib
from diffusion_jax.training import posthoc_ema
from diffusion_jax.training import train_state
from diffusion_jax.training.checkpoints import (EXTRA_EMA_ITEM, NoCheckpointError,
                                                checkpoint_dir, create_manager, restore_items)

PyTree = Any


def restore_params(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                   use_ema: bool, ema: str = '') -> Tuple[PyTree, int]:
  """The EMA (`use_ema`) or raw parameters of the newest checkpoint in `workdir`, and its step.

  `ema` (sample.ema / eval.ema, with use_ema) picks another EMA than the primary one: an extra
  EMA of the checkpoint ('decay:<d>', 'sigma_rel:<s>': only that one is read) or a post-hoc
  reconstruction ('posthoc:<s>', the newest step written by --mode=posthoc_ema; its step is
  returned).

  Only that item is read (no optimizer state, not the other parameter tree), straight into
  the FSDP shardings the train state has on `mesh` (`train_state.abstract_train_state`): no
  device ever holds more than its shard of a sharded tensor. Corrupt steps are skipped (not
  moved: readers never write). Raises NoCheckpointError when there is no checkpoint.
  """
  abstract = train_state.abstract_train_state(config, mesh)
  if use_ema and ema:
    kind, value = ema_lib.parse_selection(ema)
    if kind == ema_lib.POSTHOC:
      return posthoc_ema.restore_reconstruction(workdir, value, abstract.ema_params)
    return restore_extra_ema(workdir, ema_lib.state_key(kind, value), ema, abstract.ema_params)
  name = 'ema_params' if use_ema else 'params'
  manager = create_manager(workdir, read_only=True, async_save=False)
  try:
    items, step = restore_items(manager, abstract, (name,), quarantine=False)
  finally:
    manager.close()
  if items is None:
    raise NoCheckpointError(
        f'No checkpoint in {checkpoint_dir(workdir)}: train first with '
        f'`python main.py --config=... --workdir={workdir}` (--mode=train), or point '
        '--workdir at a run that has checkpoints.')
  return items[name], step


def restore_extra_ema(workdir: str, key: str, name: str, abstract_params: PyTree
                      ) -> Tuple[PyTree, int]:
  """Extra EMA `key` (named `name`, e.g. 'decay:0.999') of the newest checkpoint, and its step.

  Only that EMA is read (orbax partial restore of the 'extra_emas' item), onto the shapes and
  shardings of `abstract_params` (float32, the parameters' layout). Raises NoCheckpointError
  when there is no checkpoint or it has no such EMA (naming the ones it has).
  """
  manager = create_manager(workdir, read_only=True, async_save=False)
  try:
    step = manager.latest_step()
  finally:
    manager.close()
  if step is None:
    raise NoCheckpointError(f'No checkpoint in {checkpoint_dir(workdir)}: train first.')
  path = checkpoint_dir(workdir) / str(step) / EXTRA_EMA_ITEM
  saved = {}
  if path.exists():
    metadata = ocp.StandardCheckpointHandler().metadata(path)
    saved = dict(getattr(metadata, 'tree', metadata))
  if key not in saved:
    raise NoCheckpointError(
        f'Checkpoint {step} in {checkpoint_dir(workdir)} has no EMA {name!r} (its extra EMAs: '
        f'{sorted(saved) or "none"}); train with it in optim.ema_decays / optim.ema_sigma_rels, '
        "or set sample.ema / eval.ema to '' (the primary EMA).")
  target = {key: abstract_params}
  restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
      path, args=ocp.args.PyTreeRestore(
          target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  return restored[key], step


def restore_guidance_classifier(config: ml_collections.ConfigDict, mesh: Mesh
                                ) -> Optional[sampler.GuidanceClassifier]:
  """The noisy classifier that guides sampling with `config.sample` (None when
  sample.classifier_scale is 0): the run in sample.classifier_workdir, its network from its
  own config.json and its EMA (sample.classifier_use_ema) or raw parameters from its newest
  checkpoint, in its FSDP layout on `mesh`. The pairing is checked first by validate_config."""
  scfg = config.sample
  if not scfg.classifier_scale:
    return None
  classifier_config = run_config.load_run_config(scfg.classifier_workdir)
  if classifier_config is None:
    raise ConfigError(f'sample.classifier_workdir={scfg.classifier_workdir!r} holds no run '
                      'config (config.json): train or convert a noisy classifier there.')
  model = backbones.create_model(classifier_config.model, classifier_config.data.channels)
  params, _ = restore_params(classifier_config, scfg.classifier_workdir, mesh,
                             bool(scfg.classifier_use_ema))
  return sampler.GuidanceClassifier(model, params, int(classifier_config.model.num_classes))
