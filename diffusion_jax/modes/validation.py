"""Checks a config before anything is compiled or written, so that a mistake costs seconds.

Each problem is reported as a `ConfigError` naming the field and the fix. The section checks
live next to the code that owns the names (backbones.check_model_config, objectives.check_config
(which checks the objective's section and its samplers' fields), sharding.check_mesh_config,
checks.check_eval_config, checks.check_train_eval_config); `validate_config` composes them per
mode. Checks that need TensorFlow (is the tfds dataset known?) only run in the modes that
read data.
"""

from __future__ import annotations

from typing import List, Optional

import jax

from diffusion_jax import objectives
from diffusion_jax.config import defaults, run_config
from diffusion_jax.config.errors import ConfigError, check_choice
from diffusion_jax.evaluation import checks
from diffusion_jax.modes import MODES
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.sampling import class_labels, classifier_guidance
from diffusion_jax.serving import export as export_lib
from diffusion_jax.data import checks as data_checks
from diffusion_jax.training import checks as training_checks
from diffusion_jax.training import ema as ema_lib


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
  check_choice(errors, 'mode', mode, tuple(MODES))
  num_devices = num_devices or jax.device_count()
  num_processes = num_processes or jax.process_count()
  plugin_sections = ([f'diffusion.{name}' for name in objectives.OBJECTIVES]
                     + [f'model.{name}' for name in backbones.BACKBONES])
  errors.extend(defaults.unknown_fields(config, plugin_sections))
  errors.extend(data_checks.check_data_config(config, mode))  # The dataset: train, eval.
  errors.extend(backbones.check_model_config(config.model, config.data.resolution))
  mesh_errors, data_devices = sharding.check_mesh_config(config.mesh, num_devices)
  errors.extend(mesh_errors)
  errors.extend(objectives.check_config(config))  # Its section and its samplers' fields.
  errors.extend(_check_objective_mode(config, mode))  # An objective without samplers.
  errors.extend(ema_lib.check_ema_config(config, mode))  # optim.ema_*, sample/eval.ema, posthoc_ema
  errors.extend(classifier_guidance.check_scale(config.sample))
  if config.sample.classifier_scale > 0 and mode in ('train', 'export'):
    errors.append(f'sample.classifier_scale={config.sample.classifier_scale}: classifier '
                  f'guidance is for --mode=sample and --mode=eval, not --mode={mode} (its '
                  'sample grids and exports are unguided); set it to 0 here.')
  if mode == 'train':
    errors.extend(training_checks.check_optim_config(config.optim))
    errors.extend(training_checks.check_training_config(config, data_devices, num_processes))
    errors.extend(checks.check_train_eval_config(config, num_devices))
    if config.training.eval_every_steps > 0:  # The in-training eval draws with config.sample.
      errors.extend(sharding.check_batch('sample.batch_size', config.sample.batch_size,
                                         data_devices, num_processes))
  if mode == 'sample' or (mode == 'eval' and _eval_draws_samples(config.eval)):
    _check_sampling_call(errors, config, data_devices, num_processes)
  if mode == 'export':
    errors.extend(export_lib.check_export_config(config.export))
  if mode == 'eval':
    _check_eval(errors, config, data_devices, num_processes, num_devices)
  if errors:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))


def _check_objective_mode(config, mode: str) -> List[str]:
  """An objective without samplers (SAMPLERS = (): a noisy classifier) has no --mode=sample,
  no export and no eval that draws samples or asks a likelihood; the message says what its
  runs are for (the objective's USE_INSTEAD)."""
  name = config.diffusion.objective
  if name not in objectives.OBJECTIVES or objectives.draws_samples(name):
    return []
  objective = objectives.get(name)
  asked = [m for m in checks.as_tuple(config.eval.metrics) if m in checks.LIKELIHOOD_METRICS]
  if mode in ('sample', 'export'):
    what = f'--mode={mode} samples'
  elif mode == 'eval' and _eval_draws_samples(config.eval):
    what = '--mode=eval draws samples for eval.metrics'
  elif mode == 'eval' and asked:
    what = f'--mode=eval computes the likelihoods {tuple(asked)} of eval.metrics'
  else:
    return []
  hint = getattr(objective, 'USE_INSTEAD', 'train a diffusion objective for that')
  return [f'{what}, but diffusion.objective={name!r} has no sampler and no likelihood; {hint}.']


def batch_sizes(config) -> List[int]:
  """The global batches that must split evenly over the data-axis devices (training's
  micro-batch, sampling, likelihood eval, feature extraction): what `mesh.cpu_devices=0`
  divides."""
  accum = max(int(config.training.grad_accum_steps), 1)
  return [int(config.training.batch_size) // accum, int(config.sample.batch_size),
          int(config.eval.batch_size), int(config.eval.feature_batch_size)]


def _check_sampling_call(errors: List[str], config, data_devices: int,
                         num_processes: int) -> None:
  """Fields of a sampling run: the call's batch, how many images, the animation."""
  scfg = config.sample
  errors.extend(sharding.check_batch('sample.batch_size', scfg.batch_size, data_devices,
                                     num_processes))
  if scfg.num_samples <= 0:
    errors.append(f'sample.num_samples={scfg.num_samples} must be positive.')
  _check_guidance_classifier(errors, config)
  if scfg.animation:
    if scfg.animation_every < 1:
      errors.append(f'sample.animation_every={scfg.animation_every} must be >= 1 (sampling '
                    'steps between animation frames).')
    if scfg.animation_num_images < 1:
      errors.append(f'sample.animation_num_images={scfg.animation_num_images} must be >= 1.')


def _check_guidance_classifier(errors: List[str], config) -> None:
  """Classifier guidance: the run in sample.classifier_workdir is a noisy classifier of the
  model's images, classes and noise schedule; for an unconditional model sample.class_labels
  name the classifier's classes. Reads only its config.json."""
  scfg = config.sample
  if not (scfg.classifier_scale > 0 and scfg.classifier_workdir):
    return
  try:
    classifier_config = run_config.load_run_config(scfg.classifier_workdir)
  except ValueError as e:  # An unreadable config.json.
    errors.append(f'sample.classifier_workdir={scfg.classifier_workdir!r}: its config.json '
                  f'cannot be read ({e}).')
    return
  found = classifier_guidance.check_classifier_run(
      scfg, config.model, config.data, config.diffusion.ddpm, classifier_config,
      config.diffusion.objective)
  errors.extend(found)
  if not found and config.model.num_classes == 0:
    try:
      class_labels.parse_class_labels(scfg.class_labels, classifier_config.model.num_classes)
    except ValueError as e:
      errors.append(f'{e} (the classes of the guiding classifier)')


def _eval_draws_samples(ecfg) -> bool:
  """--mode=eval draws samples when a sample metric is asked and no eval.samples file given."""
  return any(m in checks.SAMPLE_METRICS for m in checks.as_tuple(ecfg.metrics)) and not ecfg.samples


def _check_eval(errors: List[str], config, data_devices: int, num_processes: int,
                num_devices: int) -> None:
  """`config.eval`: metric names and sample-metric fields via checks.check_eval_config (the one
  owner of those), the likelihood fields here when a likelihood metric is asked."""
  ecfg = config.eval
  if isinstance(ecfg.metrics, str):
    errors.append(f'eval.metrics={ecfg.metrics!r} must be a tuple, e.g. ({ecfg.metrics!r},).')
  errors.extend(checks.check_eval_config(config, num_devices))
  metrics = checks.as_tuple(ecfg.metrics)
  objective = config.diffusion.objective
  # Only --mode=eval reads eval.metrics (an objective without samplers: _check_objective_mode).
  if objective in objectives.OBJECTIVES and objectives.draws_samples(objective):
    supported = objectives.get(objective).LIKELIHOOD_METRICS
    for metric in [m for m in metrics if m in checks.LIKELIHOOD_METRICS and m not in supported]:
      errors.append(f"eval.metrics has {metric!r}, which diffusion.objective={objective!r} does "
                    f"not have; use one of {supported} (its likelihoods) or a sample metric "
                    "('fid').")
  errors.extend(checks.check_likelihood_config(config, data_devices, num_processes))
