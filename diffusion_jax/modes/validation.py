"""Checks a config before anything is compiled or written, so that a mistake costs seconds.

Each problem is reported as a `ConfigError` naming the field and the fix. The section checks
live next to the code that owns the names (backbones.check_model_config,
discrete.check_diffusion_config, solvers.check_sampler_config, sharding.check_mesh_config,
checks.check_eval_config, checks.check_train_eval_config); `validate_config` composes them per
mode. Checks that need TensorFlow (is the tfds dataset known?) only run in the modes that
read data.
"""

from __future__ import annotations

from typing import List, Optional

import jax

from diffusion_jax.config.errors import ConfigError, check_choice
from diffusion_jax.processes import discrete
from diffusion_jax.training import ema
from diffusion_jax.nn import backbones
from diffusion_jax import objectives
from diffusion_jax.sampling import solvers
from diffusion_jax.parallel import sharding

LOCAL_DATASETS = ('digits', 'folder')
MODES = ('train', 'sample', 'eval', 'export', 'posthoc_ema')
ODE_SOLVERS = ('tsit5', 'dopri5')
ODE_PROBES = ('rademacher', 'gaussian', 'exact')
SAMPLE_VARIANCES = ('fixed_small', 'fixed_large')
NONFINITE_POLICIES = ('stop', 'skip')


def validate_config(config, mode: str = 'train', num_devices: Optional[int] = None,
                    num_processes: Optional[int] = None) -> None:
  """Raises ConfigError listing every problem in `config` for `mode` (train | sample | eval |
  export).

  The checks are composed per mode, so a field a mode never reads cannot stop it: the sampling
  call's batch (sample.batch_size, num_samples, animation) is checked only in sample mode (and
  in eval when it draws samples), the training grid (training.num_grid_samples) only in train
  (any count: train pads the grid's sampling batch to a multiple of the devices).
  `num_devices` / `num_processes` default to the running JAX's; pass them to check a config
  for another machine (nothing needs real devices).
  """
  errors: List[str] = []
  check_choice(errors, 'mode', mode, MODES)
  num_devices = num_devices or jax.device_count()
  num_processes = num_processes or jax.process_count()
  _check_data_fields(errors, config)
  errors.extend(backbones.check_model_config(config.model, config.data.resolution))
  errors.extend(discrete.check_diffusion_config(config.diffusion))
  mesh_errors, data_devices = sharding.check_mesh_config(config.mesh, num_devices)
  errors.extend(mesh_errors)
  errors.extend(objectives.check_objective_config(config))
  errors.extend(ema.check_ema_config(config, mode))  # optim.ema_*, sample/eval.ema, posthoc_ema
  if config.diffusion.objective == 'ddpm':  # Other objectives check config.sample themselves.
    errors.extend(solvers.check_sampler_config(config.sample, config.model,
                                                config.diffusion.num_timesteps))
  if mode == 'train':
    _check_data_source(errors, config, mode)
    _check_optim(errors, config.optim)
    _check_training_loop(errors, config.training, data_devices, num_processes)
    if config.training.cond_drop_prob > 0 and not config.model.null_class:
      errors.append(f'training.cond_drop_prob={config.training.cond_drop_prob} drops labels to '
                    'the null class, which model.null_class=False leaves out; set it to 0.')
    _check_batch(errors, 'training.batch_size', config.training.batch_size, data_devices,
                 num_processes)
    if config.training.num_grid_samples < 1:  # Any count >= 1: train pads the grid's batch.
      errors.append(f'training.num_grid_samples={config.training.num_grid_samples} must be '
                    '>= 1 (images in a sample grid).')
    from diffusion_jax.evaluation import checks  # pylint: disable=g-import-not-at-top
    errors.extend(checks.check_train_eval_config(config, num_devices))
    if config.training.eval_every_steps > 0:  # The in-training eval draws with config.sample.
      _check_batch(errors, 'sample.batch_size', config.sample.batch_size, data_devices,
                   num_processes)
  if mode == 'sample' or (mode == 'eval' and _eval_draws_samples(config.eval)):
    _check_sampling_call(errors, config, data_devices, num_processes)
  if mode == 'export':
    from diffusion_jax.serving import export  # pylint: disable=g-import-not-at-top (imports this module)
    errors.extend(export.check_export_config(config.export))
  if mode == 'eval':
    _check_data_source(errors, config, mode)
    _check_eval(errors, config, data_devices, num_processes, num_devices)
  if errors:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))


def batch_sizes(config) -> List[int]:
  """The global batches that must split evenly over the data-axis devices (training's
  micro-batch, sampling, likelihood eval, feature extraction): what `mesh.cpu_devices=0`
  divides."""
  accum = max(int(config.training.grad_accum_steps), 1)
  return [int(config.training.batch_size) // accum, int(config.sample.batch_size),
          int(config.eval.batch_size), int(config.eval.feature_batch_size)]


def _check_batch(errors: List[str], field: str, value: int, data_devices: int,
                 num_processes: int) -> None:
  """A global batch must split evenly over the devices on the data axes and the processes."""
  if value <= 0 or value % data_devices or value % num_processes:
    step = max(data_devices, num_processes)
    errors.append(f'{field}={value} must be a positive multiple of the {data_devices} devices '
                  f'on the data axis and of the {num_processes} processes; e.g. '
                  f'{step * max(1, -(-value // step))}.')


def _check_data_fields(errors: List[str], config) -> None:
  """data.* fields every mode reads (image shape, folder name)."""
  data = config.data
  if data.channels not in (1, 3):
    errors.append(f'data.channels={data.channels} must be 1 (grayscale) or 3 (RGB).')
  if data.resolution <= 0:
    errors.append(f'data.resolution={data.resolution} must be positive.')
  if data.dataset == 'folder' and not data.folder:
    errors.append("data.folder is empty but data.dataset='folder': set "
                  '--config.data.folder=/path/to/images.')
  if data.center_crop < 0:
    errors.append(f'data.center_crop={data.center_crop} must be >= 0 (0 = crop to the short '
                  'side; e.g. 140 for CelebA).')


def _check_data_source(errors: List[str], config, mode: str) -> None:
  """Is the dataset known, and (training a class-conditional model) does its label count match
  model.num_classes? Reads tfds metadata only (dataset_info.json, no TF graph)."""
  data, model = config.data, config.model
  if data.dataset not in LOCAL_DATASETS:
    _check_tfds_name(errors, data.dataset)
  if data.center_crop > 0 and data.dataset != 'folder' and not errors:
    _check_center_crop(errors, data)
  if mode != 'train' or model.num_classes <= 0 or errors:
    return
  if data.dataset != 'digits' and not data.label_key:
    errors.append('model.num_classes > 0 needs labels: set data.label_key (e.g. "label").')
    return
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top (imports TF)
  try:
    found = pipeline.num_classes_of(data)
  except (FileNotFoundError, OSError):
    return  # Not prepared / unreadable: the input pipeline reports it with the fix.
  except ValueError as e:  # Unknown label_key, missing folder: already names the field.
    errors.append(str(e))
    return
  if found != model.num_classes:
    errors.append(f'model.num_classes={model.num_classes} but data.dataset={data.dataset!r} has '
                  f'{found} classes (data.label_key={data.label_key!r}); set '
                  f'--config.model.num_classes={found}.')


def _check_center_crop(errors: List[str], data) -> None:
  """data.center_crop must fit in the images where their size is known (digits, tfds
  features of static shape; read from metadata). Folders are checked when an image is read."""
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top (imports TF)
  try:
    size = pipeline.image_size_of(data)
  except (ValueError, OSError):
    return  # Unknown dataset or unreadable metadata: reported elsewhere with the fix.
  if size is not None and data.center_crop > min(size):
    errors.append(f'data.center_crop={data.center_crop} is larger than the {size[0]}x{size[1]} '
                  f'images of data.dataset={data.dataset!r}; set it to at most {min(size)} '
                  '(or 0 to crop to the short side).')


def _check_optim(errors: List[str], ocfg) -> None:
  """optim.* names and ranges (train mode only)."""
  check_choice(errors, 'optim.optimizer', ocfg.optimizer, ('adam', 'adamw'))
  check_choice(errors, 'optim.lr_schedule', ocfg.lr_schedule, ('constant', 'cosine'))
  if ocfg.learning_rate < 0:
    errors.append(f'optim.learning_rate={ocfg.learning_rate} must be >= 0 (2e-4 in Ho et al.).')
  if ocfg.warmup_steps < 0:
    errors.append(f'optim.warmup_steps={ocfg.warmup_steps} must be >= 0 (0 = no warmup).')
  if not 0.0 <= ocfg.ema_decay < 1.0:
    errors.append(f'optim.ema_decay={ocfg.ema_decay} must be in [0, 1).')


def _check_sampling_call(errors: List[str], config, data_devices: int,
                         num_processes: int) -> None:
  """Fields of a sampling run: the call's batch, how many images, the animation."""
  scfg = config.sample
  _check_batch(errors, 'sample.batch_size', scfg.batch_size, data_devices, num_processes)
  if scfg.num_samples <= 0:
    errors.append(f'sample.num_samples={scfg.num_samples} must be positive.')
  if scfg.animation:
    if scfg.animation_every < 1:
      errors.append(f'sample.animation_every={scfg.animation_every} must be >= 1 (sampling '
                    'steps between animation frames).')
    if scfg.animation_num_images < 1:
      errors.append(f'sample.animation_num_images={scfg.animation_num_images} must be >= 1.')


def _eval_metrics(ecfg) -> tuple:
  return (ecfg.metrics,) if isinstance(ecfg.metrics, str) else tuple(ecfg.metrics)


def _eval_draws_samples(ecfg) -> bool:
  """--mode=eval draws samples when a sample metric is asked and no eval.samples file given."""
  from diffusion_jax.evaluation import checks  # pylint: disable=g-import-not-at-top
  return any(m in checks.SAMPLE_METRICS for m in _eval_metrics(ecfg)) and not ecfg.samples


def _check_training_loop(errors: List[str], tcfg, data_devices: int, num_processes: int) -> None:
  """Intervals, steps_per_call, grad_accum_steps, checkpoints kept and on_nonfinite."""
  k = tcfg.steps_per_call
  accum = tcfg.grad_accum_steps
  if tcfg.num_train_steps <= 0:
    errors.append(f'training.num_train_steps={tcfg.num_train_steps} must be positive.')
  for field in ('log_every_steps', 'checkpoint_every_steps'):
    if tcfg[field] < 1:
      errors.append(f'training.{field}={tcfg[field]} must be >= 1 (steps between '
                    f'{"log lines" if field.startswith("log") else "checkpoints"}).')
  if tcfg.sample_every_steps < 0:
    errors.append(f'training.sample_every_steps={tcfg.sample_every_steps} must be >= 0 '
                  '(0 = never).')
  if tcfg.keep_checkpoints < 1:
    errors.append(f'training.keep_checkpoints={tcfg.keep_checkpoints} must be >= 1 (the newest '
                  'checkpoint is what a restart resumes from).')
  if not 0.0 <= tcfg.cond_drop_prob < 1.0:
    errors.append(f'training.cond_drop_prob={tcfg.cond_drop_prob} must be in [0, 1).')
  if k < 1:
    errors.append(f'training.steps_per_call={k} must be >= 1.')
  elif k > 1:
    for field in ('log_every_steps', 'checkpoint_every_steps', 'sample_every_steps',
                  'keep_every_steps', 'eval_every_steps'):
      value = tcfg[field]
      if value > 0 and value % k:
        errors.append(f'training.{field}={value} must be a multiple of training.steps_per_call'
                      f'={k} (one compiled call runs {k} steps).')
  if accum < 1:
    errors.append(f'training.grad_accum_steps={accum} must be >= 1.')
  elif tcfg.batch_size % (accum * max(data_devices, 1)) or tcfg.batch_size % (
      accum * num_processes):
    errors.append(f'training.batch_size={tcfg.batch_size} must be a multiple of '
                  f'training.grad_accum_steps={accum} x the {data_devices} devices sharing the '
                  f'batch (and of {accum} x {num_processes} processes).')
  if tcfg.keep_every_steps < 0:
    errors.append(f'training.keep_every_steps={tcfg.keep_every_steps} must be >= 0 (0 = off).')
  check_choice(errors, 'training.on_nonfinite', tcfg.on_nonfinite, NONFINITE_POLICIES)


def _check_eval(errors: List[str], config, data_devices: int, num_processes: int,
                num_devices: int) -> None:
  """`config.eval`: metric names and sample-metric fields via checks.check_eval_config (the one
  owner of those), the likelihood fields here when a likelihood metric is asked."""
  from diffusion_jax.evaluation import checks  # pylint: disable=g-import-not-at-top
  ecfg = config.eval
  if isinstance(ecfg.metrics, str):
    errors.append(f'eval.metrics={ecfg.metrics!r} must be a tuple, e.g. ({ecfg.metrics!r},).')
  errors.extend(checks.check_eval_config(config, num_devices))
  metrics = _eval_metrics(ecfg)
  objective = config.diffusion.objective
  if objective != 'ddpm' and 'vlb' in metrics:  # Only --mode=eval reads eval.metrics.
    errors.append(f"eval.metrics has 'vlb', the discrete-time bound of objective 'ddpm'; "
                  f"for diffusion.objective={objective!r} use 'ode_nll' (its exact "
                  "likelihood through the probability-flow ODE) or a sample metric ('fid').")
  if not any(m in checks.LIKELIHOOD_METRICS for m in metrics):
    return
  _check_batch(errors, 'eval.batch_size', ecfg.batch_size, data_devices, num_processes)
  if ecfg.num_batches == 0 or ecfg.num_batches < -1:
    errors.append(f'eval.num_batches={ecfg.num_batches} must be -1 (whole split) or positive.')
  check_choice(errors, 'eval.variance', ecfg.variance, SAMPLE_VARIANCES)
  if ecfg.num_kl_buckets < 1:
    errors.append(f'eval.num_kl_buckets={ecfg.num_kl_buckets} must be >= 1.')
  if 'ode_nll' in metrics:
    check_choice(errors, 'eval.ode_solver', ecfg.ode_solver, ODE_SOLVERS)
    check_choice(errors, 'eval.ode_probe', ecfg.ode_probe, ODE_PROBES)
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
