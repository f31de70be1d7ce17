"""The training loop: restore -> compile -> loop (data -> compiled train step -> hooks).

`train(config, workdir, make_evaluator)` is what `python main.py --mode=train` runs (through
modes/train.py, which checks the config first). It resumes from the newest checkpoint in
`<workdir>/checkpoints` when there is one, compiles the train step and the grid sampler ahead
of time, then after each compiled call runs the hooks of hooks.py: TensorBoard events and log
lines through clu, each log step's scalars to `<workdir>/train_metrics.jsonl` with the loss
curve `<workdir>/loss_curve.png` and a progress bar on an interactive terminal (run_log.py;
with the objective's `step_metrics`, e.g. a noisy classifier's accuracy per t quarter), a
PNG sample grid (EMA parameters) every `training.sample_every_steps` (0: never; no grid, and
no grid sampler, for an objective without samplers), the injected
in-training eval, checkpoints, EMA snapshots, and on a NaN/Inf loss either an error keeping the
last good checkpoint (`training.on_nonfinite='stop'`) or a skipped, counted update ('skip').

Fault tolerance: the data order is a pure function of the step (pipeline.
step_indexed_dataset), so a run killed at any point and restarted with the same command
continues bit for bit from its newest checkpoint. On SIGTERM (or JAX's preemption sync point
on multi-host runs) every process saves the state of the same step, waits for the write to
finish and returns normally, so `main.py` exits 0. All processes run every step; only
process 0 writes summaries and sample grids.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from clu import metric_writers, periodic_actions
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import objectives
from diffusion_jax.config import run_config
from diffusion_jax.data import pipeline
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import policy as policy_lib
from diffusion_jax.parallel import sharding
from diffusion_jax.pipelines import sampler
from diffusion_jax.training import checkpoints
from diffusion_jax.training import hooks
from diffusion_jax.training import posthoc_ema
from diffusion_jax.training import run_log
from diffusion_jax.training import train_state



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
  tcfg = config.training
  k = int(tcfg.steps_per_call)
  mesh = sharding.create_mesh(config.mesh)
  policy = policy_lib.policy_for(mesh, config)
  abstract = train_state.abstract_train_state(config, mesh)
  state = restore_checkpoint(config, workdir, abstract)
  step = 0 if state is None else int(jax.device_get(state.step))
  dataset = open_dataset(config, mesh, step)
  start_run_dir(config, workdir)  # The data exists: the run describes itself.
  if state is None:
    state = train_state.create_train_state(config, mesh)
  num_params = describe_run(config, mesh, state, step)
  train_step, grid_fn, grid_batch = compile_programs(config, mesh, abstract)
  outputs = open_outputs(config, workdir, mesh, step, num_params, make_evaluator)
  batches = pipeline.global_batches(dataset, sharding.stacked_batch_sharding(mesh) if k > 1
                                    else sharding.batch_sharding(mesh))
  window = hooks.LogWindow(last_step=step)
  with hooks.PreemptionFlag() as preemption:
    try:
      while step < tcfg.num_train_steps:
        with jax.profiler.StepTraceAnnotation('train', step_num=step + 1):
          batch = next(batches)
          policy.finish_before_next_program(state)
          state, metrics = train_step(state, batch)
        step += k
        is_last = step == tcfg.num_train_steps
        hooks.log_metrics(window, outputs, config, step, metrics, is_last)
        hooks.sample_and_evaluate(outputs, policy, config, workdir, step, state, is_last,
                                  grid_fn, grid_batch)
        preempted = hooks.preemption_requested(preemption, step, k)
        if hooks.checkpoint_due(config, step, is_last, preempted):
          hooks.save_checkpoint(outputs, window, config, step, state)
        hooks.save_ema_snapshot(outputs, config, step, state, is_last)
        if preempted:
          logging.warning('Preempted: saved checkpoint %d; exiting.', step)
          break
    finally:
      outputs.close()
  logging.info('Finished training at step %d.', step)
  return state


# ------------------------------------------------------------------ before the loop


def restore_checkpoint(config, workdir: str, abstract: train_state.TrainState
                       ) -> Optional[train_state.TrainState]:
  """The newest checkpoint of `workdir` restored straight onto `abstract`'s sharded layout, or
  None when there is none. Read-only: nothing is written before the data is known to exist.

  A changed model/diffusion field (run_config.check_resume_config) is a usage error, found
  before any array is read; another data order than the checkpoint's is a warning. Every
  process has looked for checkpoints before any of them writes one.
  """
  state, step = None, None
  if checkpoints.checkpoint_dir(workdir).exists():
    reader = checkpoints.create_manager(workdir, read_only=True, async_save=False)
    try:
      saved_config, source = checkpoints.saved_run_config(reader, workdir)
      if saved_config is not None:
        run_config.check_resume_config(saved_config, config, f'{workdir} ({source})')
      state, step = checkpoints.restore_latest(reader, abstract)
      if state is not None:
        for change in checkpoints.data_position_changes(reader, step, config):
          logging.warning('Resuming with another data order than checkpoint %d was trained '
                          'on (%s): the run continues from step %d with the new order.',
                          step, change, step)
    finally:
      reader.close()
  wait_for_all_processes('train_checkpoints_looked_up')
  if state is not None:
    logging.info('Resumed from checkpoint %d in %s', step, workdir)
  return state


def open_dataset(config, mesh: Mesh, start_step: int):
  """This process's rows of the batches from `start_step` on (the batch at step s is a function
  of (seed, s): resuming needs no iterator state). Checks that training.steps_per_call divides
  the resumed step and num_train_steps."""
  tcfg = config.training
  k = int(tcfg.steps_per_call)
  if k > 1 and (start_step % k or tcfg.num_train_steps % k):
    raise ValueError(f'training.steps_per_call={k} needs num_train_steps '
                     f'({tcfg.num_train_steps}) and the resumed step ({start_step}) to be '
                     'multiples of it.')
  return pipeline.step_indexed_dataset(
      config.data, tcfg.batch_size, seed=config.seed, start_step=start_step,
      rows=pipeline.host_batch_rows(sharding.batch_sharding(mesh), tcfg.batch_size),
      process_index=jax.process_index(), process_count=jax.process_count(),
      steps_per_batch=k)


def start_run_dir(config, workdir: str) -> None:
  """<workdir>/config.json (process 0) and the persistent compilation cache."""
  if jax.process_index() == 0:
    run_config.save_run_config(config, workdir)
  enable_compilation_cache(config.training.compilation_cache_dir, workdir)


def describe_run(config, mesh: Mesh, state: train_state.TrainState, start_step: int) -> int:
  """Logs the model size, the steps ahead and the mesh; returns the parameter count."""
  tcfg = config.training
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model has %d parameters; training steps %d -> %d on %d devices (mesh %s), '
               '%d step(s) per call.', num_params, start_step, tcfg.num_train_steps,
               jax.device_count(), dict(mesh.shape), tcfg.steps_per_call)
  return num_params


def compile_programs(config, mesh: Mesh, abstract: train_state.TrainState
                     ) -> Tuple[Any, Optional[Any], int]:
  """(compiled train step, compiled grid sampler, the grid's sampling batch), compiled ahead
  of time before any data is read: an OOM shows here, and a restarted run loads them from the
  persistent compilation cache. Every process has its programs before the first collective.
  An objective without samplers (a noisy classifier) has no grid: (train step, None, 0)."""
  k = int(config.training.steps_per_call)
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  train_step = train_state.make_train_step(model, tx, config, mesh, steps_per_call=k).lower(
      abstract, abstract_batch(config, mesh, k)).compile()
  logging.info('Train step (%d step(s) per call): %s', k, describe_compiled(train_step))
  grid_fn, grid_batch = None, 0
  if objectives.draws_samples(config.diffusion.objective):
    grid_batch = hooks.grid_batch_size(config.training.num_grid_samples, mesh.devices.size)
    grid_fn = sampler.make_sample_fn(model, config, mesh, grid_batch).lower(
        abstract.ema_params, jax.random.PRNGKey(config.sample.seed),
        hooks.grid_labels(config, grid_batch)).compile()
    logging.info('Sample grid (%d images, batch %d): %s', config.training.num_grid_samples,
                 grid_batch, describe_compiled(grid_fn))
  else:
    logging.info('No sample grid: diffusion.objective=%r draws no samples.',
                 config.diffusion.objective)
  # A process that loaded its programs from the cache must not enter the first collective
  # long before one that compiles them (gloo gives a peer 30 s).
  wait_for_all_processes('train_compiled')
  return train_step, grid_fn, grid_batch


def open_outputs(config, workdir: str, mesh: Mesh, start_step: int, num_params: int,
                 make_evaluator: Optional[Callable[..., Any]]) -> hooks.RunOutputs:
  """The run's writers: TensorBoard (hparams on a fresh run), the metrics file and progress
  bar, the checkpoint manager, the EMA snapshot manager (optim.ema_snapshot_every_steps > 0:
  its own folder, never deleted) and the in-training eval (training.eval_every_steps > 0:
  feature networks, reference statistics and its sampler built once, here)."""
  tcfg = config.training
  evaluator = (make_evaluator(config, workdir, mesh)
               if make_evaluator is not None and tcfg.eval_every_steps > 0 else None)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start_step == 0:
    writer.write_hparams(run_log.flatten_config(config) | {'num_params': num_params})
  return hooks.RunOutputs(
      writer=writer,
      report=periodic_actions.ReportProgress(num_train_steps=tcfg.num_train_steps,
                                             writer=writer),
      metrics_log=run_log.TrainMetricsLog(workdir, start_step,
                                          active=jax.process_index() == 0),
      progress=run_log.TrainProgressBar(start_step, tcfg.num_train_steps,
                                        run_log.show_progress_bar()),
      manager=checkpoints.create_manager(workdir, tcfg.keep_checkpoints,
                                         tcfg.async_checkpointing,
                                         keep_every=tcfg.keep_every_steps),
      snapshots=(posthoc_ema.create_snapshot_manager(workdir, tcfg.async_checkpointing)
                 if config.optim.ema_snapshot_every_steps > 0 else None),
      evaluator=evaluator)


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


def compiled_cost(compiled: jax.stages.Compiled) -> Dict[str, float]:
  """XLA's cost_analysis() of a compiled program as one dict ({} when the backend gives none;
  older JAX returned one dict per program)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return dict(cost or {})


def describe_compiled(compiled: jax.stages.Compiled) -> str:
  """'1.23 GFLOP per call; per device: arguments 1.2 MiB, outputs ..., temporaries ...'
  from XLA's cost_analysis() and memory_analysis() (a figure a backend does not give: n/a)."""
  flops = compiled_cost(compiled).get('flops')
  text = f'{flops / 1e9:.4g} GFLOP per call' if flops is not None else 'FLOPs n/a'
  memory = compiled.memory_analysis()
  if memory is None:
    return text + '; memory n/a'
  mib = lambda n: f'{n / 2**20:.4g} MiB'
  return (f'{text}; per device: arguments {mib(memory.argument_size_in_bytes)}, outputs '
          f'{mib(memory.output_size_in_bytes)} ({mib(memory.alias_size_in_bytes)} aliased to '
          f'arguments), temporaries {mib(memory.temp_size_in_bytes)}')
