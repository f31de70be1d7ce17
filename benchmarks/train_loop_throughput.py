"""The real training loop against its own bare compiled step, in one process.

  python benchmarks/train_loop_throughput.py --config=configs/digits.py --batch_size=64 --steps=300
  python benchmarks/train_loop_throughput.py --config=configs/cifar10_ddpm.py --batch_size=16 \\
      --steps=20 --fake_data

Runs `modes.train.train_and_evaluate` (input pipeline, host-to-device transfer, metric logging,
progress report, the final checkpoint and grid) for 2 x --steps steps in a temporary workdir and
reads the loop's steps/s over the second half (`train/steps_per_sec_window` of the last
train_metrics.jsonl row: compilation and the first steps are excluded, the grid and the checkpoint
come after it). The bare step (`train_throughput.build_ours`, the same compiled program on a fixed
batch) is timed before and after the loop. Prints one JSON line with both rates and
`loop_over_step` (1.0 = the loop costs nothing beyond the step).

--fake_data replaces the dataset by one fixed random batch per step (numpy, no tf.data), as
Flax's imagenet example does, so configs whose dataset is not prepared can be timed; digits is
in memory and needs no download either way.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import train_throughput  # pylint: disable=g-import-not-at-top  (puts the repo root on sys.path)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app, flags  # pylint: disable=g-import-not-at-top
from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from diffusion_jax.modes import train as train_mode
from diffusion_jax.training import run_log


def fake_step_indexed_dataset(data_config, global_batch_size: int, *, seed: int, rows,
                              steps_per_batch: int = 1, **unused) -> Iterator[Dict[str, Any]]:
  """A stand-in for pipeline.step_indexed_dataset: one fixed random host batch, forever."""
  del global_batch_size, unused
  res, channels = data_config.resolution, data_config.channels
  rng = np.random.default_rng(seed)
  batch = {'image': rng.uniform(-1.0, 1.0, (len(rows), res, res, channels)).astype(np.float32)}
  if pipeline.has_labels(data_config):
    batch['label'] = (np.arange(len(rows)) % pipeline.num_classes_of(data_config)
                      ).astype(np.int32)
  if steps_per_batch > 1:
    batch = {k: np.stack([v] * steps_per_batch) for k, v in batch.items()}
  while True:
    yield batch


def loop_config(config, batch_size: int, steps: int):
  """The config trained by the loop: 2 x steps steps, one log window per half, no eval."""
  config = config.copy_and_resolve_references()
  t = config.training
  t.batch_size = batch_size
  t.num_train_steps = 2 * steps
  t.log_every_steps = steps
  t.checkpoint_every_steps = 2 * steps
  t.sample_every_steps = 0
  t.eval_every_steps = 0
  t.num_grid_samples = max(jax.device_count(), 8)
  t.compilation_cache_dir = 'none'  # Each program is compiled fresh, as a first run's are.
  return config


def time_bare_step(config, batch_size: int, steps: int) -> List[float]:
  """Per-call wall times of the bare compiled step (after 2 warm-up calls)."""
  train_step, state, batch, _, _ = train_throughput.build_ours(config, batch_size)
  compiled = train_step.lower(state, batch).compile()
  holder = {'state': state}

  def run() -> None:
    holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready((holder['state'], metrics))

  for _ in range(2):
    run()
  return train_throughput.interleaved_timing({'bare step': run}, steps, 1)['bare step']


def main(argv):
  del argv
  f = flags.FLAGS
  if f.steps <= 0 or f.steps % max(1, f.config.training.steps_per_call):
    raise app.UsageError('--steps must be > 0 and a multiple of training.steps_per_call.')
  train_throughput.split_cpu(f.config, f.batch_size)
  config = loop_config(f.config, f.batch_size, f.steps)
  if f.fake_data:
    pipeline.step_indexed_dataset = fake_step_indexed_dataset
  k = int(config.training.steps_per_call)
  bare = time_bare_step(config, f.batch_size, f.steps) if k == 1 else []
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    train_mode.train_and_evaluate(config, workdir)
    loop_wall_s = time.perf_counter() - t0
    rows = run_log.read_train_metrics(workdir)
  loop_steps_per_s = float(rows['train/steps_per_sec_window'][-1])
  if k == 1:
    bare += time_bare_step(config, f.batch_size, f.steps)
  line: Dict[str, Any] = {
      'benchmark': 'train_loop',
      'config': train_throughput.config_name(train_throughput.config_file()),
      'batch_size': f.batch_size, 'steps_per_call': k, 'fake_data': f.fake_data,
      'platform': jax.devices()[0].platform, 'devices': jax.device_count(),
      'loop_steps_per_s': round(loop_steps_per_s, 3),
      'loop_wall_s': round(loop_wall_s, 2), 'loop_steps': 2 * f.steps,
  }
  if bare:
    step_steps_per_s = 1.0 / statistics.median(bare)
    line.update({'step_steps_per_s': round(step_steps_per_s, 3),
                 'loop_over_step': round(loop_steps_per_s / step_steps_per_s, 3)})
  print(json.dumps(line), flush=True)


if __name__ == '__main__':
  train_throughput.define_flags(default_config='configs/digits.py')
  flags.DEFINE_integer('steps', 300, 'Steps per half of the loop, and bare steps per timing.')
  flags.DEFINE_bool('fake_data', False, 'Replace the dataset by a fixed random batch.')
  app.run(main)
