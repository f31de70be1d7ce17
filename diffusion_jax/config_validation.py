"""Checks a config before anything is compiled or written, so that a mistake costs seconds.

Each problem is reported as a `ConfigError` naming the field and the fix. Checks that need
TensorFlow (is the tfds dataset known?) only run in the modes that read data.
"""

from __future__ import annotations

from typing import List, Optional

import jax
import jax.numpy as jnp

from diffusion_jax import class_labels, diffusion, samplers

LOCAL_DATASETS = ('digits', 'folder')
MODES = ('train', 'sample', 'eval')
EVAL_METRICS = ('vlb', 'ode_nll')
ODE_SOLVERS = ('tsit5', 'dopri5')
ODE_PROBES = ('rademacher', 'gaussian', 'exact')
SAMPLE_VARIANCES = ('fixed_small', 'fixed_large')
NONFINITE_POLICIES = ('stop', 'skip')


class ConfigError(ValueError):
  """A config field has a value that cannot work; the message names the field and the fix."""


def _check_choice(errors: List[str], field: str, value, choices) -> None:
  if value not in choices:
    errors.append(f'{field}={value!r} is unknown; use one of {tuple(choices)}.')


def _feature_sizes(resolution: int, num_levels: int) -> List[int]:
  return [resolution // 2**i for i in range(num_levels)]


def validate_config(config, mode: str = 'train', num_devices: Optional[int] = None,
                    num_processes: Optional[int] = None) -> None:
  """Raises ConfigError listing every problem in `config` for `mode` (train | sample | eval)."""
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
  if mode in ('train', 'eval') and data.dataset not in LOCAL_DATASETS:
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
  if dcfg.get('vlb_weight', 0.001) < 0:
    errors.append(f'diffusion.vlb_weight={dcfg.vlb_weight} must be >= 0 (0.001 in Nichol & '
                  'Dhariwal).')

  # Optimizer and training.
  _check_choice(errors, 'optim.optimizer', ocfg.optimizer, ('adam', 'adamw'))
  _check_choice(errors, 'optim.lr_schedule', ocfg.lr_schedule, ('constant', 'cosine'))
  if not 0.0 <= ocfg.ema_decay < 1.0:
    errors.append(f'optim.ema_decay={ocfg.ema_decay} must be in [0, 1).')
  from diffusion_jax import sharding  # pylint: disable=g-import-not-at-top
  try:  # The batch is split over both mesh axes.
    data_size, fsdp_size = sharding.mesh_shape(config.mesh, num_devices)
    data_devices = data_size * fsdp_size
  except ValueError as e:
    errors.append(str(e))
    data_devices = num_devices
  if config.mesh.get('fsdp_min_size', 0) < 0:
    errors.append(f'mesh.fsdp_min_size={config.mesh.fsdp_min_size} must be >= 0.')
  _check_training_loop(errors, tcfg, data_devices, num_processes)
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
  from diffusion_jax import respacing  # pylint: disable=g-import-not-at-top
  _check_choice(errors, 'sample.variance', scfg.variance, samplers.VARIANCES)
  if scfg.sampler == 'ddpm' and scfg.variance == 'learned_range' and not model.learn_sigma:
    errors.append("sample.variance='learned_range' needs a model trained with "
                  'model.learn_sigma=True; use fixed_small or fixed_large.')
  spacing = scfg.get('spacing', 'leading')
  if scfg.sampler in samplers.CONTINUOUS_SAMPLERS:
    if scfg.steps < 1:
      errors.append(f'sample.steps={scfg.steps} must be >= 1 for sample.sampler='
                    f'{scfg.sampler!r}.')
  elif not (scfg.sampler == 'ddpm' and scfg.steps == 0 and isinstance(spacing, str)
            and not respacing.is_section_spacing(spacing)):
    try:  # Checks sample.spacing and sample.steps (ddpm with steps 0 uses all T steps).
      respacing.respaced_timesteps(dcfg.num_timesteps, scfg.steps, spacing)
    except ValueError as e:
      errors.append(str(e))
  guidance = scfg.get('guidance_scale', 1.0)
  if guidance < 0:
    errors.append(f'sample.guidance_scale={guidance} must be >= 0 (0 = the unconditional '
                  'model, 1 = the conditional one, > 1 = classifier-free guidance).')
  elif guidance != 1.0 and model.num_classes <= 0:
    errors.append(f'sample.guidance_scale={guidance} needs a class-conditional model '
                  '(model.num_classes > 0, trained with training.cond_drop_prob > 0); use 1.0.')
  thresholding = scfg.get('thresholding', 'static')
  _check_choice(errors, 'sample.thresholding', thresholding, samplers.THRESHOLDINGS)
  if thresholding == 'dynamic' and not scfg.clip_denoised:
    errors.append("sample.clip_denoised=False turns thresholding off, contradicting "
                  "sample.thresholding='dynamic'; set clip_denoised=True or thresholding='none'.")
  percentile = scfg.get('dynamic_threshold_percentile', 0.995)
  if not 0.0 < percentile <= 1.0:
    errors.append(f'sample.dynamic_threshold_percentile={percentile} must be in (0, 1].')
  solver_order = scfg.get('solver_order', 2)
  solver_type = scfg.get('solver_type', 'multistep')
  _check_choice(errors, 'sample.solver_type', solver_type, samplers.DPM_SOLVER_TYPES)
  if solver_order not in (1, 2, 3):
    errors.append(f'sample.solver_order={solver_order} must be 1, 2 or 3.')
  elif solver_type == 'singlestep' and solver_order == 3:
    errors.append("sample.solver_order=3 is only available with sample.solver_type="
                  "'multistep'; use 2 for singlestep (DPM-Solver++(2S)).")
  if scfg.get('rho', 7.0) <= 0:
    errors.append(f'sample.rho={scfg.rho} must be positive (7 in Karras et al.).')
  for field in ('s_churn', 's_tmin', 's_noise'):
    if scfg.get(field, 0.0) < 0:
      errors.append(f'sample.{field}={scfg[field]} must be >= 0.')
  if scfg.get('s_tmax', float('inf')) < scfg.get('s_tmin', 0.0):
    errors.append(f'sample.s_tmax={scfg.s_tmax} must be >= sample.s_tmin={scfg.s_tmin}.')
  if not 0.0 <= scfg.eta <= 1.0:
    errors.append(f'sample.eta={scfg.eta} must be in [0, 1].')
  if scfg.num_samples <= 0:
    errors.append(f'sample.num_samples={scfg.num_samples} must be positive.')
  if 'class_labels' in scfg:
    try:
      class_labels.parse_class_labels(scfg.class_labels, model.num_classes)
    except ValueError as e:
      errors.append(str(e))
  if scfg.get('animation', False):
    if scfg.animation_every < 1:
      errors.append(f'sample.animation_every={scfg.animation_every} must be >= 1 (sampling '
                    'steps between animation frames).')
    if scfg.animation_num_images < 1:
      errors.append(f'sample.animation_num_images={scfg.animation_num_images} must be >= 1.')

  # Evaluation.
  if mode == 'eval':
    _check_eval(errors, config, data_devices, num_processes)

  if errors:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))


def _check_training_loop(errors: List[str], tcfg, data_devices: int, num_processes: int) -> None:
  """Checks steps_per_call, grad_accum_steps, keep_every_steps and on_nonfinite."""
  k = tcfg.get('steps_per_call', 1)
  accum = tcfg.get('grad_accum_steps', 1)
  if k < 1:
    errors.append(f'training.steps_per_call={k} must be >= 1.')
  elif k > 1:
    for field in ('log_every_steps', 'checkpoint_every_steps', 'sample_every_steps',
                  'keep_every_steps'):
      value = tcfg.get(field, 0)
      if value and value % k:
        errors.append(f'training.{field}={value} must be a multiple of training.steps_per_call'
                      f'={k} (one compiled call runs {k} steps).')
  if accum < 1:
    errors.append(f'training.grad_accum_steps={accum} must be >= 1.')
  elif tcfg.batch_size % (accum * max(data_devices, 1)) or tcfg.batch_size % (
      accum * num_processes):
    errors.append(f'training.batch_size={tcfg.batch_size} must be a multiple of '
                  f'training.grad_accum_steps={accum} x the {data_devices} devices sharing the '
                  f'batch (and of {accum} x {num_processes} processes).')
  if tcfg.get('keep_every_steps', 0) < 0:
    errors.append(f'training.keep_every_steps={tcfg.keep_every_steps} must be >= 0 (0 = off).')
  _check_choice(errors, 'training.on_nonfinite', tcfg.get('on_nonfinite', 'stop'),
                NONFINITE_POLICIES)


def _check_eval(errors: List[str], config, data_devices: int, num_processes: int) -> None:
  """Checks the `config.eval` block that --mode=eval reads."""
  ecfg = config.get('eval')
  if ecfg is None:
    errors.append('config.eval is missing: start the config from configs/default.py, which '
                  'defines it.')
    return
  metrics = tuple(ecfg.metrics) if not isinstance(ecfg.metrics, str) else (ecfg.metrics,)
  unknown = [m for m in metrics if m not in EVAL_METRICS]
  if unknown or not metrics:
    errors.append(f'eval.metrics={metrics} must be a non-empty subset of {EVAL_METRICS}.')
  if isinstance(ecfg.metrics, str):
    errors.append(f'eval.metrics={ecfg.metrics!r} must be a tuple, e.g. ({ecfg.metrics!r},).')
  if (ecfg.batch_size <= 0 or ecfg.batch_size % data_devices
      or ecfg.batch_size % num_processes):
    errors.append(f'eval.batch_size={ecfg.batch_size} must be a positive multiple of the '
                  f'{data_devices} devices on the data axis and of the {num_processes} processes.')
  if ecfg.num_batches == 0 or ecfg.num_batches < -1:
    errors.append(f'eval.num_batches={ecfg.num_batches} must be -1 (whole split) or positive.')
  _check_choice(errors, 'eval.variance', ecfg.variance, SAMPLE_VARIANCES)
  if ecfg.num_kl_buckets < 1:
    errors.append(f'eval.num_kl_buckets={ecfg.num_kl_buckets} must be >= 1.')
  if 'ode_nll' in metrics:
    _check_choice(errors, 'eval.ode_solver', ecfg.ode_solver, ODE_SOLVERS)
    _check_choice(errors, 'eval.ode_probe', ecfg.ode_probe, ODE_PROBES)
    if not (ecfg.ode_rtol > 0 and ecfg.ode_atol > 0):
      errors.append(f'eval.ode_rtol={ecfg.ode_rtol} and eval.ode_atol={ecfg.ode_atol} must be '
                    'positive (1e-5 as Song et al.).')
    if ecfg.ode_num_probes < 1:
      errors.append(f'eval.ode_num_probes={ecfg.ode_num_probes} must be >= 1.')
    if ecfg.ode_max_steps < 1:
      errors.append(f'eval.ode_max_steps={ecfg.ode_max_steps} must be >= 1.')
    if ecfg.ode_probe == 'exact' and config.data.resolution**2 * config.data.channels > 256:
      errors.append("eval.ode_probe='exact' costs one Jacobian-vector product per dimension; use "
                    "'rademacher' for images of more than 256 dimensions.")


def _check_tfds_name(errors: List[str], name: str) -> None:
  """Appends an error if `name` is neither a local dataset nor a registered tfds builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder_name = name.split('/')[0].split(':')[0]
  if builder_name not in tfds.list_builders(with_community_datasets=False):
    errors.append(f'data.dataset={name!r} is neither {LOCAL_DATASETS} nor a tensorflow-datasets '
                  "name (e.g. 'cifar10', 'celeb_a', 'imagenet_resized/64x64').")
