"""Checks of `config.optim` and `config.training` (train mode), before anything is compiled."""

from __future__ import annotations

from typing import List

from diffusion_jax.config.errors import check_choice
from diffusion_jax.parallel import sharding

NONFINITE_POLICIES = ('stop', 'skip')  # training.on_nonfinite


def check_optim_config(ocfg) -> List[str]:
  """Problems with the optimizer fields of `config.optim` (empty list = fine)."""
  errors: List[str] = []
  check_choice(errors, 'optim.optimizer', ocfg.optimizer, ('adam', 'adamw'))
  check_choice(errors, 'optim.lr_schedule', ocfg.lr_schedule, ('constant', 'cosine'))
  if ocfg.learning_rate < 0:
    errors.append(f'optim.learning_rate={ocfg.learning_rate} must be >= 0 (2e-4 in Ho et al.).')
  if ocfg.warmup_steps < 0:
    errors.append(f'optim.warmup_steps={ocfg.warmup_steps} must be >= 0 (0 = no warmup).')
  if not 0.0 <= ocfg.ema_decay < 1.0:
    errors.append(f'optim.ema_decay={ocfg.ema_decay} must be in [0, 1).')
  return errors


def check_training_config(config, data_devices: int, num_processes: int) -> List[str]:
  """Problems with `config.training` for `data_devices` sharing the batch and `num_processes`
  (empty list = fine): the batch, intervals, steps_per_call, grad_accum_steps, checkpoints
  kept, on_nonfinite, label dropout and the grid."""
  tcfg = config.training
  errors = sharding.check_batch('training.batch_size', tcfg.batch_size, data_devices,
                                num_processes)
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
  if tcfg.cond_drop_prob > 0 and not config.model.null_class:
    errors.append(f'training.cond_drop_prob={tcfg.cond_drop_prob} drops labels to the null '
                  'class, which model.null_class=False leaves out; set it to 0.')
  if tcfg.num_grid_samples < 1:  # Any count >= 1: the grid's sampling batch is padded.
    errors.append(f'training.num_grid_samples={tcfg.num_grid_samples} must be >= 1 (images in '
                  'a sample grid).')
  return errors
