"""What the training loop does after each compiled call, one named function per duty.

After the call that ended at `step` the loop runs, in this order:

  log_metrics       the log window's means -> TensorBoard, train_metrics.jsonl, the progress bar;
                    a non-finite step stops the run (training.on_nonfinite='stop') or is counted
  sample_and_evaluate      the EMA sample grid and the in-training eval, when due
  preemption_requested     SIGTERM on this process, or JAX's preemption sync point on all
  save_checkpoint   every training.checkpoint_every_steps, at the last step and when preempted
  save_ema_snapshot the power EMAs every optim.ema_snapshot_every_steps and at the last step

Each takes what it works on explicitly (the objects of `RunOutputs`, the `LogWindow`); none
holds state of its own but the window and the SIGTERM flag.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from clu import metric_writers, periodic_actions
from etils import epath

from diffusion_jax import images, objectives
from diffusion_jax.parallel import multihost
from diffusion_jax.parallel import policy as policy_lib
from diffusion_jax.sampling.class_labels import default_labels
from diffusion_jax.training import checkpoints
from diffusion_jax.training import ema as ema_lib
from diffusion_jax.training import posthoc_ema
from diffusion_jax.training import run_log
from diffusion_jax.training import train_state

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN/Inf; training stopped without saving the bad state."""


@dataclasses.dataclass
class RunOutputs:
  """Where a run writes: TensorBoard (`writer`, clu's `report` of steps/s and timed sections),
  the metrics file and progress bar (run_log.py), the checkpoint manager, the EMA snapshot
  manager (None: no snapshots) and the in-training evaluator (None: off)."""
  writer: metric_writers.MetricWriter
  report: periodic_actions.ReportProgress
  metrics_log: run_log.TrainMetricsLog
  progress: run_log.TrainProgressBar
  manager: ocp.CheckpointManager
  snapshots: Optional[ocp.CheckpointManager] = None
  evaluator: Optional[Any] = None

  def close(self) -> None:
    """Waits for the asynchronous writes (raising a failed one), then closes everything."""
    self.progress.close()
    for manager in (self.manager, self.snapshots):
      if manager is not None:
        manager.wait_until_finished()
        manager.check_for_errors()
        manager.close()
    if self.evaluator is not None:
      self.evaluator.close()
    self.writer.flush()


# ------------------------------------------------------------------ logging


@dataclasses.dataclass
class LogWindow:
  """The metrics of the calls since the last log step, and the run's count of skipped steps."""
  last_step: int
  last_time: float = dataclasses.field(default_factory=time.time)
  history: List[Dict[str, jax.Array]] = dataclasses.field(default_factory=list)
  skipped_total: int = 0


def mean_metrics(history: List[Dict[str, jax.Array]]) -> Dict[str, float]:
  """Window means; every metric but 'nonfinite' averages the finite (applied) steps only.

  'nonfinite' is the fraction of skipped steps; a window of only skipped steps gives NaN
  for the others. An objective's step metric, a 'name/sum' and 'name/count' pair
  (train_state.make_train_step), becomes 'name' = the window's sum over its count: the mean
  over every example it counted, whatever each step's count (a t quarter no example of a step
  fell in weighs nothing; NaN when none of the window's did).
  """
  stacked = jax.device_get(history)
  skipped = np.concatenate([np.ravel(h['nonfinite']) for h in stacked]) > 0
  means = {'nonfinite': float(np.mean(skipped))}
  column = lambda key: np.concatenate([np.ravel(h[key]) for h in stacked]).astype(np.float64)
  for key in stacked[0]:
    if key == 'nonfinite' or key.endswith(train_state.COUNT_SUFFIX):
      continue
    values = column(key)
    if key.endswith(train_state.SUM_SUFFIX):
      name = key[:-len(train_state.SUM_SUFFIX)]
      count = float(np.sum(column(name + train_state.COUNT_SUFFIX)[~skipped]))
      means[name] = float(np.sum(values[~skipped]) / count) if count > 0 else float('nan')
    else:
      means[key] = float(np.mean(values[~skipped])) if np.any(~skipped) else float('nan')
  return means


def log_metrics(window: LogWindow, outputs: RunOutputs, config, step: int,
                metrics: Dict[str, jax.Array], is_last: bool) -> None:
  """Adds the call's `metrics` to the window; at a log step (every training.log_every_steps and
  the last) writes the window's means and steps/s, and with training.on_nonfinite='skip' the
  count of skipped steps. Raises NonFiniteLossError when the window had a non-finite step and
  the policy is 'stop' (the last good checkpoint is kept)."""
  tcfg = config.training
  window.history.append(metrics)
  outputs.report(step)
  outputs.progress.update(step)
  if step % tcfg.log_every_steps and not is_last:
    return
  summary = mean_metrics(window.history)
  skipped = int(round(summary.pop('nonfinite') * len(window.history) * tcfg.steps_per_call))
  window.history = []
  if skipped and tcfg.on_nonfinite != 'skip':
    raise NonFiniteLossError(
        f'Loss or gradients became NaN/Inf before step {step} (loss={summary["loss"]}). '
        'Training stopped; the last good checkpoint is kept. Try a lower '
        'optim.learning_rate, optim.grad_clip > 0, model.dtype=float32, or '
        "training.on_nonfinite='skip'.")
  now = time.time()
  # clu's ReportProgress writes 'steps_per_sec' (whole run); this is the log window.
  summary['train/steps_per_sec_window'] = (step - window.last_step) / max(
      now - window.last_time, 1e-9)
  window.last_time, window.last_step = now, step
  if tcfg.on_nonfinite == 'skip':
    window.skipped_total += skipped
    summary['skipped_steps'] = window.skipped_total
    if skipped:
      logging.warning('Skipped %d non-finite update(s) before step %d (%d in this run).',
                      skipped, step, window.skipped_total)
  outputs.writer.write_scalars(step, summary)
  outputs.metrics_log.append(step, summary)  # train_metrics.jsonl and loss_curve.png.
  outputs.progress.update(step, loss=summary['loss'])


# ------------------------------------------------------------------ sample grid and eval


def grid_batch_size(num_grid_samples: int, num_devices: int) -> int:
  """The sampling batch of a grid: `num_grid_samples` rounded up to a multiple of the devices
  that split it (e.g. 64 images on 256 chips sample a batch of 256 and keep the first 64)."""
  return -(-num_grid_samples // num_devices) * num_devices


def grid_labels(config, batch_size: int) -> np.ndarray:
  """Class labels of a grid's sampling batch [batch_size] (cycling over the classes)."""
  return default_labels(config.model.num_classes, 0, batch_size)


def draws_grids(config) -> bool:
  """Whether the run has sample grids: its objective has samplers (a noisy classifier has
  none) and training.sample_every_steps > 0."""
  return (config.training.sample_every_steps > 0
          and objectives.draws_samples(config.diffusion.objective))


def sample_grid_due(config, step: int, is_last: bool) -> bool:
  """training.sample_every_steps = N > 0: at every multiple of N and at the last step; 0, or an
  objective without samplers (`draws_grids`): never."""
  every = config.training.sample_every_steps
  return draws_grids(config) and (step % every == 0 or is_last)


def write_sample_grid(sample_fn: Callable[..., jax.Array], params: PyTree, config, workdir: str,
                      step: int, writer: metric_writers.MetricWriter,
                      batch_size: Optional[int] = None) -> np.ndarray:
  """Samples a grid with `params`, writes `<workdir>/samples/train_step_<step>.png` and
  TensorBoard.

  `sample_fn` samples `batch_size` images (default `training.num_grid_samples`; a larger,
  device-divisible batch from `grid_batch_size`); the first num_grid_samples are shown and
  returned (uint8 [N, H, W, C]), the padding rows dropped.
  """
  num = config.training.num_grid_samples
  x = sample_fn(params, jax.random.PRNGKey(config.sample.seed),
                grid_labels(config, batch_size or num))
  batch = images.to_uint8(multihost.to_host(x))[:num]
  upscale = max(1, 64 // config.data.resolution)
  scfg = config.sample
  steps = objectives.get(config.diffusion.objective).sampling_steps(config)
  label = images.grid_label(
      step, scfg.sampler, steps, ema=True,
      guidance_scale=scfg.guidance_scale if config.model.num_classes > 0 else None)
  grid = images.make_grid(batch, upscale=upscale, label=label)
  if jax.process_index() == 0:
    out_dir = epath.Path(workdir) / 'samples'
    out_dir.mkdir(parents=True, exist_ok=True)
    images.write_png(str(out_dir / f'train_step_{step:08d}.png'), grid)
  writer.write_images(step, {'samples': grid[None]})
  return batch


def sample_and_evaluate(outputs: RunOutputs, policy: policy_lib.BackendPolicy, config,
                        workdir: str, step: int, state: PyTree, is_last: bool,
                        grid_fn: Optional[Callable[..., jax.Array]], grid_batch: int) -> None:
  """The EMA sample grid (`sample_grid_due`) and the in-training eval (`evaluator.due`), each
  timed in clu's report; `grid_fn` is the compiled grid sampler of batch `grid_batch` (None: the
  run has no grids, `draws_grids`)."""
  sample_due = grid_fn is not None and sample_grid_due(config, step, is_last)
  eval_due = outputs.evaluator is not None and outputs.evaluator.due(step, is_last)
  if not (sample_due or eval_due):
    return
  policy.finish_before_next_program(state)
  if sample_due:
    with outputs.report.timed('sample'):
      write_sample_grid(grid_fn, state.ema_params, config, workdir, step, outputs.writer,
                        grid_batch)
  if eval_due:
    with outputs.report.timed('eval'):
      outputs.evaluator(state, state.ema_params, step, outputs.writer)


# ------------------------------------------------------------------ checkpoints and snapshots


def checkpoint_due(config, step: int, is_last: bool, preempted: bool) -> bool:
  """Every training.checkpoint_every_steps, at the last step and when preempted."""
  return step % config.training.checkpoint_every_steps == 0 or is_last or preempted


def save_checkpoint(outputs: RunOutputs, window: LogWindow, config, step: int,
                    state: PyTree) -> None:
  """Starts saving checkpoint `step`. Never a state after a non-finite step under
  training.on_nonfinite='stop': a non-finite step not yet logged raises NonFiniteLossError."""
  if window.history and config.training.on_nonfinite != 'skip':
    if mean_metrics(window.history)['nonfinite'] > 0:
      raise NonFiniteLossError(
          f'Loss or gradients became NaN/Inf before step {step}; training stopped and '
          'the last good checkpoint is kept.')
  with outputs.report.timed('checkpoint'):
    checkpoints.save(outputs.manager, step, state, config)


def save_ema_snapshot(outputs: RunOutputs, config, step: int, state: PyTree,
                      is_last: bool) -> None:
  """Every optim.ema_snapshot_every_steps and at the last step: the power EMAs and the count
  of applied updates they average (posthoc_ema.py)."""
  every = config.optim.ema_snapshot_every_steps
  if outputs.snapshots is None or (step % every and not is_last):
    return
  posthoc_ema.save_snapshot(outputs.snapshots, step, state.extra_emas,
                            ema_lib.power_specs(config.optim),
                            updates=int(jax.device_get(state.num_updates)))


# ------------------------------------------------------------------ preemption


class PreemptionFlag:
  """Set by SIGTERM (installed for the duration of training, main thread, one process only).

  A multi-process run installs no Python handler: it would replace the notifier of JAX's
  preemption service (on by default with jax.distributed, `jax_enable_preemption_service`),
  which turns a SIGTERM on any process into `reached_preemption_sync_point(step)` being True
  on all of them at the same step, without a per-step all-gather.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> 'PreemptionFlag':
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    logging.warning('SIGTERM received: saving a checkpoint after the current step.')
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def preemption_requested(flag: PreemptionFlag, step: int, steps_per_call: int) -> bool:
  """The Python flag (one process) or JAX's preemption sync point (several), after the call
  that ended at `step`.

  JAX agrees on the sync point `max(last id each process passed) + 1` and reports it only to
  a call with exactly that id, so ids must go up by one; orbax's own checks during a save pass
  the step. So every step of the call is passed, in order (k calls to a cheap local check): all
  processes see the sync point inside the same call and stop after it, at the same step.
  """
  reached = False
  for s in range(step - steps_per_call + 1, step + 1):
    reached = checkpoints.reached_preemption(s) or reached  # Every id is passed, in order.
  return flag.requested or reached
