"""The training loop: data -> compiled train step -> metrics, sample grids and checkpoints.

`train_and_evaluate(config, workdir)` is what `python main.py --mode=train` runs. It resumes
from the newest checkpoint in `<workdir>/checkpoints` when there is one, writes TensorBoard
events and log lines through clu, a PNG sample grid (EMA parameters) every
`training.sample_every_steps`, and stops with an error, keeping the last good checkpoint,
when the loss becomes NaN or Inf.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List

import jax
import numpy as np
from clu import metric_writers, periodic_actions
from etils import epath

from diffusion_jax import (checkpoints, diffusion, images, input_pipeline, models, sampling,
                           sharding, train_state)
from diffusion_jax.config_validation import validate_config


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN/Inf; training stopped without saving the bad state."""


def _mean_metrics(history: List[Dict[str, jax.Array]]) -> Dict[str, float]:
  stacked = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in stacked])) for k in stacked[0]}


def write_sample_grid(sample_fn, params, config, workdir: str, step: int,
                      writer: metric_writers.MetricWriter) -> np.ndarray:
  """Samples a grid with `params`, writes `<workdir>/samples/train_step_<step>.png` and TensorBoard."""
  labels = sampling.default_labels(config.model.num_classes, 0, config.training.num_grid_samples)
  x = sample_fn(params, jax.random.PRNGKey(config.sample.seed), labels)
  batch = images.to_uint8(sampling.to_host(x))
  upscale = max(1, 64 // config.data.resolution)
  grid = images.make_grid(batch, upscale=upscale)
  if jax.process_index() == 0:
    out_dir = epath.Path(workdir) / 'samples'
    out_dir.mkdir(parents=True, exist_ok=True)
    images.write_png(str(out_dir / f'train_step_{step:08d}.png'), grid)
  writer.write_images(step, {'samples': grid[None]})
  return batch


def train_and_evaluate(config, workdir: str) -> train_state.TrainState:
  """Trains (or resumes training) as `config` says, writing everything under `workdir`."""
  validate_config(config, mode='train')
  mesh = sharding.create_mesh(config.mesh)
  tcfg = config.training
  res, channels = config.data.resolution, config.data.channels
  image_shape = (res, res, channels)

  # Data first: a missing dataset fails here, before anything is compiled or written. A resumed
  # run reshuffles from a seed folded with its start step rather than replaying the first batches.
  per_host_batch = tcfg.batch_size // jax.process_count()
  data_seed = config.seed + checkpoints.latest_step_on_disk(workdir)
  dataset = input_pipeline.create_dataset(
      config.data, per_host_batch, split=config.data.split, seed=data_seed,
      process_index=jax.process_index(), process_count=jax.process_count(), train=True)

  model = models.create_model(config.model, channels)
  schedule = diffusion.make_schedule(config.diffusion)
  tx = train_state.create_optimizer(config.optim, tcfg.num_train_steps)
  state = train_state.create_train_state(model, tx, jax.random.PRNGKey(config.seed),
                                         image_shape, mesh)
  manager = checkpoints.create_manager(workdir, tcfg.keep_checkpoints, tcfg.async_checkpointing)
  restored, restored_step = checkpoints.restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info('Resumed from checkpoint %d in %s', restored_step, workdir)
  start_step = int(jax.device_get(state.step))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model has %d parameters; training steps %d -> %d on %d devices.', num_params,
               start_step, tcfg.num_train_steps, jax.device_count())

  train_step = train_state.make_train_step(model, tx, schedule, config, mesh)
  sample_fn = sampling.make_sample_fn(model, schedule, config, mesh, tcfg.num_grid_samples)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)}
                         | {'num_params': num_params})
  report = periodic_actions.ReportProgress(num_train_steps=tcfg.num_train_steps, writer=writer)
  batches = input_pipeline.global_batches(dataset, sharding.batch_sharding(mesh))

  history: List[Dict[str, jax.Array]] = []
  last_log_time, last_log_step = time.time(), start_step
  step = start_step
  try:
    for step in range(start_step + 1, tcfg.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = next(batches)
        state, metrics = train_step(state, batch)
        history.append(metrics)
      report(step)
      is_last = step == tcfg.num_train_steps
      if step % tcfg.log_every_steps == 0 or is_last:
        summary = _mean_metrics(history)
        history = []
        if summary['nonfinite'] > 0:
          raise NonFiniteLossError(
              f'Loss or gradients became NaN/Inf before step {step} (loss={summary["loss"]}). '
              'Training stopped; the last good checkpoint is kept. Try a lower '
              'optim.learning_rate, optim.grad_clip > 0, or model.dtype=float32.')
        now = time.time()
        summary['steps_per_sec'] = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        writer.write_scalars(step, {k: v for k, v in summary.items() if k != 'nonfinite'})
      if (tcfg.sample_every_steps and step % tcfg.sample_every_steps == 0) or is_last:
        with report.timed('sample'):
          write_sample_grid(sample_fn, state.ema_params, config, workdir, step, writer)
      if step % tcfg.checkpoint_every_steps == 0 or is_last:
        if history:  # Never save a state that came from a non-finite step.
          if _mean_metrics(history)['nonfinite'] > 0:
            raise NonFiniteLossError(
                f'Loss or gradients became NaN/Inf before step {step}; training stopped and '
                'the last good checkpoint is kept.')
        with report.timed('checkpoint'):
          checkpoints.save(manager, step, state)
  finally:
    manager.wait_until_finished()
    manager.check_for_errors()
    manager.close()
    writer.flush()
  logging.info('Finished training at step %d.', step)
  return state
