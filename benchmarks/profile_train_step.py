"""Where the compiled train step's time goes, by XLA op kind, from a jax.profiler trace.

  python benchmarks/profile_train_step.py --config=configs/digits.py --batch_size=64 --steps=10

Compiles the step that `train_throughput.build_ours` builds, runs --steps calls under
`jax.profiler.trace` (with XLA:CPU's per-thunk trace events on), reads the Perfetto JSON the
profiler writes and sums each op's time, grouping ops whose names differ only in the numeric
suffix (`ynn_fusion.77` -> `ynn_fusion`). Prints one JSON line: the step's wall time, the
kernels' total and the top op kinds (ms per step, share, calls per step); ops run on several
threads at once, so their total can exceed the wall time. On CPU, `ynn_fusion`
are the convolutions and matmuls XLA hands to YNNPACK; `*_fusion` elementwise/transposes
fused by XLA; `copy` layout copies.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_cpu_enable_xprof_traceme=true').strip()

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import train_throughput  # pylint: disable=g-import-not-at-top  (puts the repo root on sys.path)

import jax  # pylint: disable=g-import-not-at-top
from absl import app, flags  # pylint: disable=g-import-not-at-top

# Trace events that are not ops of the program (the runtime's own spans, Python frames).
_NOT_OPS = re.compile(r'^\$|ThunkExecutor|PjRt|Pjit|^Handle input|^ParseArguments')


def op_times(trace_events, calls: int) -> tuple[collections.Counter, collections.Counter]:
  """(microseconds, calls) per step, summed by op kind (the name without its '.N' suffix)."""
  micros: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  for event in trace_events:
    if event.get('ph') == 'X' and not _NOT_OPS.search(event['name']):
      kind = re.sub(r'\.\d+$', '', event['name'])
      micros[kind] += event.get('dur', 0) / calls
      counts[kind] += 1
  return micros, collections.Counter({k: v // calls for k, v in counts.items()})


def main(argv):
  del argv
  f = flags.FLAGS
  train_throughput.split_cpu(f.config, f.batch_size)
  train_step, state, batch, _, _ = train_throughput.build_ours(f.config, f.batch_size)
  compiled = train_step.lower(state, batch).compile()
  for _ in range(3):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  with tempfile.TemporaryDirectory() as logdir:
    t0 = time.perf_counter()
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(f.steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      wall_ms = 1e3 * (time.perf_counter() - t0) / f.steps  # Before the trace is written.
    path = glob.glob(os.path.join(logdir, '**', '*perfetto_trace.json.gz'), recursive=True)[0]
    with gzip.open(path) as fh:
      trace = json.load(fh)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  times, counts = op_times(events, f.steps)
  total_us = sum(times.values())
  print(json.dumps({
      'benchmark': 'profile_train_step',
      'config': train_throughput.config_name(train_throughput.config_file()),
      'batch_size': f.batch_size, 'platform': jax.devices()[0].platform,
      'step_ms_traced': round(wall_ms, 2), 'ops_ms': round(total_us / 1e3, 2),
      'top': [{'op': k, 'ms': round(t / 1e3, 2), 'share': round(t / total_us, 3),
               'calls': counts[k]} for k, t in times.most_common(f.top)],
  }), flush=True)


if __name__ == '__main__':
  train_throughput.define_flags(default_config='configs/digits.py')
  flags.DEFINE_integer('steps', 10, 'Traced train steps (after 3 untimed ones).')
  flags.DEFINE_integer('top', 15, 'Op kinds to list.')
  app.run(main)
