"""The training loop: data -> compiled train step -> metrics, sample grids and checkpoints.

`train_and_evaluate(config, workdir)` is what `python main.py --mode=train` runs. It resumes
from the newest checkpoint in `<workdir>/checkpoints` when there is one, writes TensorBoard
events and log lines through clu, a PNG sample grid (EMA parameters) every
`training.sample_every_steps`, each log step's scalars to `<workdir>/train_metrics.jsonl`
(`read_train_metrics`) with the loss curve `<workdir>/loss_curve.png`, a progress bar
with ETA on an interactive terminal (`show_progress_bar`), and on a NaN/Inf loss either stops
with an error, keeping the last good checkpoint (`training.on_nonfinite='stop'`), or skips the
update and counts it ('skip').

Fault tolerance: the data order is a pure function of the step (input_pipeline.
step_indexed_dataset), so a run killed at any point and restarted with the same command
continues bit for bit from its newest checkpoint. On SIGTERM (or JAX's preemption sync point
on multi-host runs) every process saves the state of the same step, waits for the write to
finish and returns normally, so `main.py` exits 0. All processes run every step; only
process 0 writes summaries and sample grids.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from clu import metric_writers, periodic_actions
from etils import epath

from diffusion_jax.training import checkpoints
from diffusion_jax.training import ema as ema_lib
from diffusion_jax import images, objectives
from diffusion_jax.data import pipeline
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import multihost
from diffusion_jax.training import posthoc_ema
from diffusion_jax.config import run_config
from diffusion_jax.pipelines import sampler
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state
from diffusion_jax.sampling.class_labels import default_labels


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN/Inf; training stopped without saving the bad state."""


def _mean_metrics(history: List[Dict[str, jax.Array]]) -> Dict[str, float]:
  """Window means; every metric but 'nonfinite' averages the finite (applied) steps only.

  'nonfinite' is the fraction of skipped steps; a window of only skipped steps gives NaN
  for the others.
  """
  stacked = jax.device_get(history)
  skipped = np.concatenate([np.ravel(h['nonfinite']) for h in stacked]) > 0
  means = {'nonfinite': float(np.mean(skipped))}
  for key in stacked[0]:
    if key != 'nonfinite':
      values = np.concatenate([np.ravel(h[key]) for h in stacked]).astype(np.float64)
      means[key] = float(np.mean(values[~skipped])) if np.any(~skipped) else float('nan')
  return means


def flatten_config(config) -> Dict[str, object]:
  """{'training.batch_size': 128, 'model.unet.ch_mult': '(1, 2)', ...}: TensorBoard hparams
  (`run_config.flatten`'s dotted keys; bools, numbers and strings kept, anything else (tuples,
  None) as str)."""
  return {name: value if isinstance(value, (bool, int, float, str)) else str(value)
          for name, value in run_config.flatten(config).items()}


def grid_batch_size(num_grid_samples: int, num_devices: int) -> int:
  """The sampling batch of a grid: `num_grid_samples` rounded up to a multiple of the devices
  that split it (e.g. 64 images on 256 chips sample a batch of 256 and keep the first 64)."""
  return -(-num_grid_samples // num_devices) * num_devices


def grid_labels(config, batch_size: int) -> np.ndarray:
  """Class labels of a grid's sampling batch [batch_size] (cycling over the classes)."""
  return default_labels(config.model.num_classes, 0, batch_size)


METRICS_FILE = 'train_metrics.jsonl'  # <workdir>/: one JSON row per log step (process 0).
LOSS_CURVE_FILE = 'loss_curve.png'    # <workdir>/: the logged loss against the step.


def _json_value(value) -> Optional[float]:
  """A scalar as JSON: float, or null for NaN/Inf (read back as NaN)."""
  value = float(value)
  return value if math.isfinite(value) else None


def _read_rows(path: epath.Path, text: Optional[str] = None) -> List[Dict[str, object]]:
  """The rows of a train_metrics.jsonl (its `text` if already read); a line that does not
  parse (a run killed mid-write leaves at most a partial last line) is skipped."""
  rows = []
  for line in (path.read_text() if text is None else text).splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      logging.warning('Skipping an unreadable line of %s: %r', path, line[:80])
      continue
    if isinstance(row, dict) and 'step' in row:
      rows.append(row)
  return rows


def read_train_metrics(workdir: str) -> Dict[str, np.ndarray]:
  """The logged training scalars of `<workdir>/train_metrics.jsonl` as arrays over log steps.

  Returns {'step': int64 [N], 'loss': float64 [N], ...}: one entry per logged scalar (the train
  step's 'loss', 'grad_norm', 'learning_rate', 'train/steps_per_sec_window', 'skipped_steps'
  with training.on_nonfinite='skip'), NaN where a row lacks it or it was non-finite. Rows are
  in step order, one per log step (a resumed run first drops the rows after its checkpoint).
  """
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: training writes it at every log step '
                            '(training.log_every_steps) on process 0.')
  rows = _read_rows(path)
  keys = ['step'] + sorted({key for row in rows for key in row} - {'step'})
  out = {'step': np.array([int(row['step']) for row in rows], np.int64)}
  for key in keys[1:]:
    out[key] = np.array([np.nan if row.get(key) is None else float(row[key]) for row in rows],
                        np.float64)
  return out


class TrainMetricsLog:
  """Appends each log step's scalars to `<workdir>/train_metrics.jsonl` and redraws
  `<workdir>/loss_curve.png` (process 0 only; the others hold an inactive log).

  On resume from step s the rows after s (logged after the checkpoint, before a kill) are
  dropped first, so the file never repeats a step or goes back. Local files are appended to a
  line at a time; on object stores (gs://, which cannot append) the whole file is rewritten.
  """

  def __init__(self, workdir: str, start_step: int, active: bool):
    self.active = active
    self.path = epath.Path(workdir) / METRICS_FILE
    self.curve_path = epath.Path(workdir) / LOSS_CURVE_FILE
    self._append = '://' not in str(self.path)
    self.rows: List[Dict[str, object]] = []
    if not active or not self.path.exists():
      return
    text = self.path.read_text()
    rows = _read_rows(self.path, text)
    self.rows = [row for row in rows if int(row['step']) <= start_step]
    if len(self.rows) < len(rows):
      logging.info('%s: dropped %d row(s) after the resumed step %d.', self.path,
                   len(rows) - len(self.rows), start_step)
    if self._text(self.rows) != text:  # Rows dropped, or an unreadable (partial) line.
      temporary = self.path.parent / (METRICS_FILE + '.tmp')  # Never a half-written file.
      temporary.write_text(self._text(self.rows))
      temporary.replace(self.path)

  @staticmethod
  def _text(rows: List[Dict[str, object]]) -> str:
    return ''.join(json.dumps(row) + '\n' for row in rows)

  def append(self, step: int, scalars: Dict[str, float]) -> None:
    """Adds the row {'step': step, **scalars} and redraws the loss curve."""
    if not self.active:
      return
    row = {'step': int(step)} | {key: _json_value(v) for key, v in scalars.items()}
    self.rows.append(row)
    if self._append:
      with self.path.open('a') as f:
        f.write(self._text([row]))
    else:
      self.path.write_text(self._text(self.rows))
    self.write_curve()

  def write_curve(self) -> None:
    """Draws the logged loss against the step (images.plot_curve) to loss_curve.png."""
    steps = np.array([row['step'] for row in self.rows], np.float64)
    loss = np.array([np.nan if row.get('loss') is None else row['loss'] for row in self.rows],
                    np.float64)
    finite = loss[np.isfinite(loss)]
    log_y = finite.size > 0 and bool(np.all(finite > 0))
    title = f'training loss (mean over each log window{", log scale" if log_y else ""})'
    images.write_png(str(self.curve_path), images.plot_curve(steps, loss, title, log_y=log_y))


PROGRESS_FORMAT = ('{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed} elapsed, '
                   'ETA {remaining}, {rate_fmt}{postfix}]')


def show_progress_bar(stream: Optional[TextIO] = None, process_index: Optional[int] = None
                      ) -> bool:
  """Whether training draws a progress bar: only process 0, only when `stream` (default
  sys.stderr) is an interactive terminal, so log files, pipes and CI stay free of it."""
  stream = sys.stderr if stream is None else stream
  if (jax.process_index() if process_index is None else process_index) != 0:
    return False
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # No isatty, or a closed stream.
    return False


def progress_line(step: int, num_steps: int, elapsed_s: float, loss: Optional[float] = None,
                  start_step: int = 0, ncols: int = 100) -> str:
  """The progress bar's text after `elapsed_s` seconds at `step` of `num_steps`, e.g.
  ' 17%|##  | 500/3000 steps [01:40 elapsed, ETA 08:20, 5.00step/s, loss 0.0312]':
  steps/s = (step - start_step) / elapsed_s (a resumed run counts only its own steps) and
  ETA = (num_steps - step) / (steps/s)."""
  return tqdm.tqdm.format_meter(step, num_steps, elapsed_s, ncols=ncols, ascii=True, unit='step',
                                bar_format=PROGRESS_FORMAT, postfix=_loss_postfix(loss),
                                initial=start_step)


def _loss_postfix(loss: Optional[float]) -> Optional[str]:
  return None if loss is None else f'loss {loss:.4g}'


class _ClearBarFilter(logging.Filter):
  """Clears the progress bar before a log line is printed; its next update redraws it below."""

  def __init__(self, bar: tqdm.tqdm):
    super().__init__()
    self._bar = bar

  def filter(self, record: logging.LogRecord) -> bool:
    self._bar.clear()
    return True


class TrainProgressBar:
  """A tqdm bar (steps/s, ETA, the last logged loss) on an interactive stderr; a no-op
  otherwise (see `show_progress_bar`). clu's periodic reports and the log lines stay: while
  the bar is up, every handler of the root logger clears it before printing a line."""

  def __init__(self, start_step: int, num_steps: int, enabled: bool):
    self._bar = tqdm.tqdm(total=num_steps, initial=start_step, unit='step',
                          bar_format=PROGRESS_FORMAT, dynamic_ncols=True, file=sys.stderr,
                          disable=not enabled)
    self._filter = _ClearBarFilter(self._bar) if enabled else None
    self._handlers = list(logging.getLogger().handlers) if enabled else []
    for handler in self._handlers:
      handler.addFilter(self._filter)

  def update(self, step: int, loss: Optional[float] = None) -> None:
    """Moves the bar to `step`; a new `loss` (at log steps) replaces the shown one."""
    if self._filter is None:
      return
    if loss is not None:
      self._bar.set_postfix_str(_loss_postfix(loss), refresh=False)
    self._bar.update(step - self._bar.n)

  def close(self) -> None:
    for handler in self._handlers:
      handler.removeFilter(self._filter)
    self._bar.close()


def write_sample_grid(sample_fn, params, config, workdir: str, step: int,
                      writer: metric_writers.MetricWriter,
                      batch_size: Optional[int] = None) -> np.ndarray:
  """Samples a grid with `params`, writes `<workdir>/samples/train_step_<step>.png` and TensorBoard.

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


def enable_compilation_cache(setting: str, workdir: str) -> Optional[str]:
  """Turns on JAX's persistent compilation cache for this run; returns its directory.

  `setting` is `training.compilation_cache_dir`: '' = `<workdir>/compilation_cache`, a path,
  or 'none' (off). A directory configured outside the config (JAX_COMPILATION_CACHE_DIR or
  `jax.config.update('jax_compilation_cache_dir', ...)`, as the tests do) is kept unchanged.
  """
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    logging.info('Persistent compilation cache: %s (set outside the config; kept).', configured)
    return configured
  if setting == 'none':
    logging.info('Persistent compilation cache off (training.compilation_cache_dir=none).')
    return None
  path = setting or str(epath.Path(workdir) / 'compilation_cache')
  jax.config.update('jax_compilation_cache_dir', path)
  compilation_cache.reset_cache()  # Programs compiled before (none cached) do not turn it off.
  logging.info('Persistent compilation cache: %s', path)
  return path


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
  """Barrier of all processes through JAX's coordination service (no device collective, so
  no 30-s gloo deadline on CPU); nothing to do in a single-process run."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None:  # Not started by jax.distributed: a device collective instead.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def abstract_batch(config, mesh, steps_per_call: int) -> Dict[str, jax.ShapeDtypeStruct]:
  """Shapes, dtypes and shardings of one train-step batch, as `pipeline.global_batches`
  yields it: 'image' float32 [B, H, W, C] (and int32 'label' [B] when the data has labels),
  with a leading [k] axis when steps_per_call = k > 1."""
  k = steps_per_call
  lead = (k,) if k > 1 else ()
  batch_sharding = sharding.stacked_batch_sharding(mesh) if k > 1 else sharding.batch_sharding(
      mesh)
  res, size = config.data.resolution, config.training.batch_size
  out = {'image': jax.ShapeDtypeStruct(lead + (size, res, res, config.data.channels),
                                       jnp.float32, sharding=batch_sharding)}
  if pipeline.has_labels(config.data):
    out['label'] = jax.ShapeDtypeStruct(lead + (size,), jnp.int32, sharding=batch_sharding)
  return out


def describe_compiled(compiled: jax.stages.Compiled) -> str:
  """'1.23 GFLOP per call; per device: arguments 1.2 MiB, outputs ..., temporaries ...'
  from XLA's cost_analysis() and memory_analysis() (a figure a backend does not give: n/a)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  text = f'{flops / 1e9:.4g} GFLOP per call' if flops is not None else 'FLOPs n/a'
  memory = compiled.memory_analysis()
  if memory is None:
    return text + '; memory n/a'
  mib = lambda n: f'{n / 2**20:.4g} MiB'
  return (f'{text}; per device: arguments {mib(memory.argument_size_in_bytes)}, outputs '
          f'{mib(memory.output_size_in_bytes)} ({mib(memory.alias_size_in_bytes)} aliased to '
          f'arguments), temporaries {mib(memory.temp_size_in_bytes)}')


class _PreemptionFlag:
  """Set by SIGTERM (installed for the duration of training, main thread, one process only).

  A multi-process run installs no Python handler: it would replace the notifier of JAX's
  preemption service (on by default with jax.distributed, `jax_enable_preemption_service`),
  which turns a SIGTERM on any process into `reached_preemption_sync_point(step)` being True
  on all of them at the same step, without a per-step all-gather.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> '_PreemptionFlag':
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    logging.warning('SIGTERM received: saving a checkpoint after the current step.')
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _should_stop_for_preemption(flag: _PreemptionFlag, step: int, steps_per_call: int) -> bool:
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


def train(config, workdir: str, make_evaluator: Optional[Callable[..., Any]] = None
          ) -> train_state.TrainState:
  """Trains (or resumes training) as `config` (checked already: modes/train.py) says, writing
  everything under `workdir`.

  `make_evaluator(config, workdir, mesh)` builds the in-training eval (called once, before the
  loop, when training.eval_every_steps > 0); the evaluator is called as
  `evaluator(state, ema_params, step, writer)` at the steps `evaluator.due(step, is_last)` says,
  and closed at the end. Returns the final state, or the state saved when the run was
  preempted (SIGTERM).
  """
  mesh = sharding.create_mesh(config.mesh)
  tcfg = config.training
  res, channels = config.data.resolution, config.data.channels
  image_shape = (res, res, channels)
  k = int(tcfg.steps_per_call)
  on_nonfinite = tcfg.on_nonfinite

  model = backbones.create_model(config.model, channels)
  tx = train_state.create_optimizer(config.optim, tcfg.num_train_steps)
  min_size = sharding.fsdp_min_size(config.mesh)
  ema_keys = ema_lib.ema_keys(config.optim)  # Extra EMAs (optim.ema_decays / ema_sigma_rels).
  shardings = train_state.state_shardings(model, tx, image_shape, mesh, min_size, ema_keys)
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      train_state.abstract_train_state(model, tx, image_shape, ema_keys), shardings)
  # Restore straight into the sharded layout (read-only: nothing is written before the data
  # is known to exist); a fresh state is only built when there is no checkpoint.
  state, restored_step = None, None
  if checkpoints.checkpoint_dir(workdir).exists():
    reader = checkpoints.create_manager(workdir, read_only=True, async_save=False)
    try:  # A changed model/diffusion field is a usage error, found before any read or write.
      saved_config, source = checkpoints.saved_run_config(reader, workdir)
      if saved_config is not None:
        run_config.check_resume_config(saved_config, config, f'{workdir} ({source})')
      state, restored_step = checkpoints.restore_latest(reader, abstract)
      if state is not None:
        for change in checkpoints.data_position_changes(reader, restored_step, config):
          logging.warning('Resuming with another data order than checkpoint %d was trained '
                          'on (%s): the run continues from step %d with the new order.',
                          restored_step, change, restored_step)
    finally:
      reader.close()
  # Every process has looked for checkpoints before any of them writes one.
  wait_for_all_processes('train_checkpoints_looked_up')
  if state is not None:
    logging.info('Resumed from checkpoint %d in %s', restored_step, workdir)
  start_step = restored_step or 0
  if k > 1 and (start_step % k or tcfg.num_train_steps % k):
    raise ValueError(f'training.steps_per_call={k} needs num_train_steps '
                     f'({tcfg.num_train_steps}) and the resumed step ({start_step}) to be '
                     'multiples of it.')

  # The batch at step s is a function of (seed, s): resuming needs no iterator state.
  batch_sharding = sharding.batch_sharding(mesh)
  dataset = pipeline.step_indexed_dataset(
      config.data, tcfg.batch_size, seed=config.seed, start_step=start_step,
      rows=pipeline.host_batch_rows(batch_sharding, tcfg.batch_size),
      process_index=jax.process_index(), process_count=jax.process_count(),
      steps_per_batch=k)
  # Once the data is known to exist, and before anything else is written: the run describes
  # itself.
  if jax.process_index() == 0:
    run_config.save_run_config(config, workdir)
  enable_compilation_cache(tcfg.compilation_cache_dir, workdir)
  manager = checkpoints.create_manager(workdir, tcfg.keep_checkpoints, tcfg.async_checkpointing,
                                       keep_every=tcfg.keep_every_steps)
  # Snapshots of the power EMAs for --mode=posthoc_ema: their own folder, never deleted.
  snapshot_every = config.optim.ema_snapshot_every_steps
  snapshot_specs = ema_lib.power_specs(config.optim)
  snapshots = (posthoc_ema.create_snapshot_manager(workdir, tcfg.async_checkpointing)
               if snapshot_every > 0 else None)
  if state is None:
    state = train_state.create_train_state(model, tx, jax.random.PRNGKey(config.seed),
                                           image_shape, mesh, min_size, ema_keys)
  start_step = int(jax.device_get(state.step))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model has %d parameters; training steps %d -> %d on %d devices (mesh %s), '
               '%d step(s) per call.', num_params, start_step, tcfg.num_train_steps,
               jax.device_count(), dict(mesh.shape), k)

  # Both programs are compiled ahead of time, before any data is read: an OOM shows here, and
  # a restarted run loads them from the persistent compilation cache.
  train_step = train_state.make_train_step(
      model, tx, config, mesh, steps_per_call=k).lower(
          abstract, abstract_batch(config, mesh, k)).compile()
  logging.info('Train step (%d step(s) per call): %s', k, describe_compiled(train_step))
  grid_batch = grid_batch_size(tcfg.num_grid_samples, mesh.devices.size)
  sample_fn = sampler.make_sample_fn(model, config, mesh, grid_batch)
  compiled_grid = sample_fn.lower(abstract.ema_params, jax.random.PRNGKey(config.sample.seed),
                                  grid_labels(config, grid_batch)).compile()
  logging.info('Sample grid (%d images, batch %d): %s', tcfg.num_grid_samples, grid_batch,
               describe_compiled(compiled_grid))
  # A process that loaded its programs from the cache must not enter the first collective
  # long before one that compiles them (gloo gives a peer 30 s).
  wait_for_all_processes('train_compiled')
  # In-training eval (training.eval_every_steps > 0): feature networks, reference statistics
  # and the sampler are built once here, before the loop.
  train_eval = (make_evaluator(config, workdir, mesh)
                if make_evaluator is not None and tcfg.eval_every_steps > 0 else None)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start_step == 0:
    writer.write_hparams(flatten_config(config) | {'num_params': num_params})
  report = periodic_actions.ReportProgress(num_train_steps=tcfg.num_train_steps, writer=writer)
  batches = pipeline.global_batches(
      dataset, sharding.stacked_batch_sharding(mesh) if k > 1 else batch_sharding)

  history: List[Dict[str, jax.Array]] = []
  metrics_log = TrainMetricsLog(workdir, start_step, active=jax.process_index() == 0)
  progress = TrainProgressBar(start_step, tcfg.num_train_steps, show_progress_bar())
  last_log_time, last_log_step = time.time(), start_step
  skipped_total = 0
  step = start_step
  with _PreemptionFlag() as preemption:
    try:
      while step < tcfg.num_train_steps:
        with jax.profiler.StepTraceAnnotation('train', step_num=step + 1):
          batch = next(batches)
          sharding.finish_before_next_program(mesh, state)
          state, metrics = train_step(state, batch)
          history.append(metrics)
        step += k
        report(step)
        progress.update(step)
        is_last = step == tcfg.num_train_steps
        if step % tcfg.log_every_steps == 0 or is_last:
          summary = _mean_metrics(history)
          skipped = int(round(summary['nonfinite'] * len(history) * k))
          history = []
          if skipped and on_nonfinite != 'skip':
            raise NonFiniteLossError(
                f'Loss or gradients became NaN/Inf before step {step} (loss={summary["loss"]}). '
                'Training stopped; the last good checkpoint is kept. Try a lower '
                'optim.learning_rate, optim.grad_clip > 0, model.dtype=float32, or '
                "training.on_nonfinite='skip'.")
          now = time.time()
          # clu's ReportProgress writes 'steps_per_sec' (whole run); this is the log window.
          summary['train/steps_per_sec_window'] = (step - last_log_step) / max(now - last_log_time, 1e-9)
          last_log_time, last_log_step = now, step
          scalars = {k_: v for k_, v in summary.items() if k_ != 'nonfinite'}
          if on_nonfinite == 'skip':
            skipped_total += skipped
            scalars['skipped_steps'] = skipped_total
            if skipped:
              logging.warning('Skipped %d non-finite update(s) before step %d (%d in this run).',
                              skipped, step, skipped_total)
          writer.write_scalars(step, scalars)
          metrics_log.append(step, scalars)  # train_metrics.jsonl and loss_curve.png.
          progress.update(step, loss=summary['loss'])
        sample_due = (tcfg.sample_every_steps and step % tcfg.sample_every_steps == 0) or is_last
        eval_due = train_eval is not None and train_eval.due(step, is_last)
        if sample_due or eval_due:
          sharding.finish_before_next_program(mesh, state)
        if sample_due:
          with report.timed('sample'):
            write_sample_grid(sample_fn, state.ema_params, config, workdir, step, writer,
                              grid_batch)
        if eval_due:
          with report.timed('eval'):
            train_eval(state, state.ema_params, step, writer)
        preempted = _should_stop_for_preemption(preemption, step, k)
        if step % tcfg.checkpoint_every_steps == 0 or is_last or preempted:
          if history and on_nonfinite != 'skip':  # Never save a state after a non-finite step.
            if _mean_metrics(history)['nonfinite'] > 0:
              raise NonFiniteLossError(
                  f'Loss or gradients became NaN/Inf before step {step}; training stopped and '
                  'the last good checkpoint is kept.')
          with report.timed('checkpoint'):
            checkpoints.save(manager, step, state, config)
        if snapshots is not None and (step % snapshot_every == 0 or is_last):
          posthoc_ema.save_snapshot(snapshots, step, state.extra_emas, snapshot_specs)
        if preempted:
          logging.warning('Preempted: saved checkpoint %d; exiting.', step)
          break
    finally:
      progress.close()
      manager.wait_until_finished()
      manager.check_for_errors()
      manager.close()
      if snapshots is not None:
        snapshots.wait_until_finished()
        snapshots.check_for_errors()
        snapshots.close()
      if train_eval is not None:
        train_eval.close()
      writer.flush()
  logging.info('Finished training at step %d.', step)
  return state
