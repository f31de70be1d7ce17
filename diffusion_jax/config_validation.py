"""Checks a config before anything is compiled or written, so that a mistake costs seconds.

Each problem is reported as a `ConfigError` naming the field and the fix. Checks that need
TensorFlow (is the tfds dataset known?) only run in the modes that read data.
"""

from __future__ import annotations

from typing import List, Optional

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, samplers

LOCAL_DATASETS = ('digits', 'folder')
MODES = ('train', 'sample')
SAMPLE_VARIANCES = ('fixed_small', 'fixed_large')


class ConfigError(ValueError):
  """A config field has a value that cannot work; the message names the field and the fix."""


def _check_choice(errors: List[str], field: str, value, choices) -> None:
  if value not in choices:
    errors.append(f'{field}={value!r} is unknown; use one of {tuple(choices)}.')


def _feature_sizes(resolution: int, num_levels: int) -> List[int]:
  return [resolution // 2**i for i in range(num_levels)]


def validate_config(config, mode: str = 'train', num_devices: Optional[int] = None,
                    num_processes: Optional[int] = None) -> None:
  """Raises ConfigError listing every problem in `config` for `mode` (train | sample)."""
  errors: List[str] = []
  _check_choice(errors, 'mode', mode, MODES)
  data, model, dcfg = config.data, config.model, config.diffusion
  ocfg, tcfg, scfg = config.optim, config.training, config.sample
  num_devices = num_devices or jax.device_count()
  num_processes = num_processes or jax.process_count()

  # Data.
  if data.channels not in (1, 3):
    errors.append(f'data.channels={data.channels} must be 1 (grayscale) or 3 (RGB).')
  if data.resolution <= 0:
    errors.append(f'data.resolution={data.resolution} must be positive.')
  if data.dataset == 'folder' and not data.folder:
    errors.append("data.folder is empty but data.dataset='folder': set "
                  '--config.data.folder=/path/to/images.')
  if mode == 'train' and data.dataset not in LOCAL_DATASETS:
    _check_tfds_name(errors, data.dataset)

  # Model.
  levels = len(model.ch_mult)
  if levels < 1:
    errors.append('model.ch_mult must have at least one level, e.g. (1, 2, 2, 2).')
  elif data.resolution % 2**(levels - 1):
    errors.append(
        f'data.resolution={data.resolution} cannot be halved {levels - 1} times as '
        f'model.ch_mult={tuple(model.ch_mult)} needs; use a resolution divisible by '
        f'{2**(levels - 1)} or fewer levels.')
  else:
    sizes = _feature_sizes(data.resolution, levels)
    unused = [r for r in model.attn_resolutions if r not in sizes]
    if unused:
      errors.append(f'model.attn_resolutions={tuple(model.attn_resolutions)} has {unused}, '
                    f'which no level reaches; the feature map sizes are {sizes}.')
  for mult in model.ch_mult:
    if (model.ch * mult) % model.num_groups:
      errors.append(f'model.ch * ch_mult = {model.ch * mult} channels are not divisible by '
                    f'model.num_groups={model.num_groups}.')
      break
  if model.num_head_channels > 0:
    bad = [model.ch * m for m in model.ch_mult if (model.ch * m) % model.num_head_channels]
    if bad:
      errors.append(f'model.num_head_channels={model.num_head_channels} does not divide the '
                    f'channel counts {bad}.')
  elif model.num_heads < 1:
    errors.append('model.num_heads must be >= 1 (or set model.num_head_channels > 0).')
  if not 0.0 <= model.dropout < 1.0:
    errors.append(f'model.dropout={model.dropout} must be in [0, 1).')
  for field in ('dtype', 'param_dtype'):
    try:
      jnp.dtype(model[field])
    except TypeError:
      errors.append(f'model.{field}={model[field]!r} is not a dtype; use float32 or bfloat16.')
  if model.num_classes < 0:
    errors.append(f'model.num_classes={model.num_classes} must be >= 0 (0 = unconditional).')
  if (mode == 'train' and model.num_classes > 0 and data.dataset != 'digits'
      and not data.label_key):
    errors.append('model.num_classes > 0 needs labels: set data.label_key (e.g. "label").')

  # Diffusion.
  _check_choice(errors, 'diffusion.beta_schedule', dcfg.beta_schedule, diffusion.BETA_SCHEDULES)
  _check_choice(errors, 'diffusion.prediction_type', dcfg.prediction_type,
                diffusion.PREDICTION_TYPES)
  _check_choice(errors, 'diffusion.loss_weighting', dcfg.loss_weighting,
                diffusion.LOSS_WEIGHTINGS)
  if dcfg.num_timesteps < 2:
    errors.append(f'diffusion.num_timesteps={dcfg.num_timesteps} must be >= 2.')
  if dcfg.beta_schedule in ('linear', 'scaled_linear', 'sigmoid') and not (
      0 < dcfg.beta_start < dcfg.beta_end < 1):
    errors.append(f'diffusion.beta_start={dcfg.beta_start} and beta_end={dcfg.beta_end} must '
                  'satisfy 0 < beta_start < beta_end < 1.')

  # Optimizer and training.
  _check_choice(errors, 'optim.optimizer', ocfg.optimizer, ('adam', 'adamw'))
  _check_choice(errors, 'optim.lr_schedule', ocfg.lr_schedule, ('constant', 'cosine'))
  if not 0.0 <= ocfg.ema_decay < 1.0:
    errors.append(f'optim.ema_decay={ocfg.ema_decay} must be in [0, 1).')
  data_devices = num_devices if config.mesh.data == -1 else config.mesh.data
  if config.mesh.data != -1 and (config.mesh.data <= 0 or num_devices % config.mesh.data):
    errors.append(f'mesh.data={config.mesh.data} must be -1 or divide the {num_devices} devices.')
  for field, value in (('training.batch_size', tcfg.batch_size),
                       ('training.num_grid_samples', tcfg.num_grid_samples),
                       ('sample.batch_size', scfg.batch_size)):
    if value <= 0 or value % data_devices or value % num_processes:
      errors.append(f'{field}={value} must be a positive multiple of the {data_devices} devices '
                    f'on the data axis and of the {num_processes} processes; e.g. '
                    f'{max(data_devices, num_processes) * max(1, value // data_devices)}.')
  if tcfg.num_train_steps <= 0:
    errors.append(f'training.num_train_steps={tcfg.num_train_steps} must be positive.')
  if not 0.0 <= tcfg.get('cond_drop_prob', 0.0) < 1.0:
    errors.append(f'training.cond_drop_prob={tcfg.cond_drop_prob} must be in [0, 1).')

  # Sampling.
  if scfg.sampler not in samplers.SAMPLERS:
    errors.append(f'sample.sampler={scfg.sampler!r} is unknown; use one of '
                  f'{tuple(sorted(samplers.SAMPLERS))}.')
  _check_choice(errors, 'sample.variance', scfg.variance, SAMPLE_VARIANCES)
  if scfg.sampler != 'ddpm' and not 0 < scfg.steps <= dcfg.num_timesteps:
    errors.append(f'sample.steps={scfg.steps} must be in [1, diffusion.num_timesteps='
                  f'{dcfg.num_timesteps}].')
  if not 0.0 <= scfg.eta <= 1.0:
    errors.append(f'sample.eta={scfg.eta} must be in [0, 1].')
  if scfg.num_samples <= 0:
    errors.append(f'sample.num_samples={scfg.num_samples} must be positive.')

  if errors:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))


def _check_tfds_name(errors: List[str], name: str) -> None:
  """Appends an error if `name` is neither a local dataset nor a registered tfds builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder_name = name.split('/')[0].split(':')[0]
  if builder_name not in tfds.list_builders(with_community_datasets=False):
    errors.append(f'data.dataset={name!r} is neither {LOCAL_DATASETS} nor a tensorflow-datasets '
                  "name (e.g. 'cifar10', 'celeb_a', 'imagenet_resized/64x64').")
