"""Where the compiled train step's time goes, by XLA op kind and by layer (jax.profiler trace).

  python benchmarks/profile_train_step.py --config=configs/digits.py --batch_size=64 --steps=10
  python benchmarks/profile_train_step.py --config=configs/cifar10_ddpm.py --batch_size=16 \
      --steps=2 --config.model.conv_backend=onednn --compare_diffusers=true

Compiles the step that `train_throughput.build_ours` builds, runs --steps calls under
`jax.profiler.trace` (with XLA:CPU's per-thunk trace events on), reads the Perfetto JSON the
profiler writes and sums each op's time, grouping ops whose names differ only in the numeric
suffix (`ynn_fusion.77` -> `ynn_fusion`). Prints one JSON line: the step's wall time, the
kernels' total and the top op kinds (ms per step, share, calls per step); ops run on several
threads at once, so their total can exceed the wall time. On CPU, `ynn_fusion`
are the convolutions and matmuls XLA hands to YNNPACK; `*_fusion` elementwise/transposes
fused by XLA; `copy` layout copies.

`by_layer` maps each traced op to the layer it came from (the `op_name` that the compiled HLO
records for it) and sums per device: convolutions, attention blocks, GroupNorm, SiLU, dropout,
the optimizer/EMA update, collectives, the rest. With --compare_diffusers (`auto`, the default:
when torch and diffusers import), `diffusers_by_layer` does the same for diffusers' step
(`train_throughput.TorchTrainStep`) from a torch.profiler trace, grouping aten ops into the
nearest categories (its `matmul` holds the attention projections and the time-embedding layers;
ours counts the former under `attention`).
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
from typing import Any, Dict

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


# Layer of an op, from the op_name of its HLO instruction; the first pattern that matches wins.
_LAYERS = (('convolution', re.compile(r'conv')), ('dropout', re.compile(r'Dropout')),
           ('silu', re.compile(r'silu')), ('groupnorm', re.compile(r'/norm[^/]*/')),
           ('attention', re.compile(r'attn')), ('optimizer+ema', re.compile(r'cond/branch|optax')))
# Collective ops; their waits for the other devices ('Rendezvous') are spans inside them.
_COLLECTIVES = re.compile(r'^(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)')
# diffusers' side: aten op -> category.
_TORCH_LAYERS = (
    ('convolution', re.compile(r'convolution|mkldnn_conv')),
    ('attention', re.compile(r'scaled_dot_product|softmax|bmm|baddbmm')),
    ('matmul', re.compile(r'aten::(mm|addmm)$')), ('groupnorm', re.compile(r'group_norm')),
    ('silu', re.compile(r'silu')), ('dropout', re.compile(r'bernoulli|dropout')),
    ('optimizer+ema', re.compile(r'aten::(add_|mul_|sqrt|addcdiv_|addcmul_|lerp_|'
                                 r'linalg_vector_norm|_foreach.*)$|Optimizer')))


def layer_times(trace_events, hlo_text: str, calls: int, devices: int) -> Dict[str, float]:
  """Milliseconds per step and device, summed by the layer each op belongs to."""
  op_names = dict(re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text))
  micros: collections.Counter = collections.Counter()
  for event in trace_events:
    name = event.get('name', '')
    if event.get('ph') != 'X' or _NOT_OPS.search(name) or name.startswith('Wait for'):
      continue
    if _COLLECTIVES.search(name):
      layer = 'collectives'
    elif name in op_names:
      layer = 'convolution' if name.startswith('ffi_call') else next(  # ffi_call: oneDNN's.
          (k for k, pattern in _LAYERS if pattern.search(op_names[name])), 'other')
    else:
      continue  # Runtime events (thread-pool waits, buffer handling), not ops of the program.
    micros[layer] += event.get('dur', 0)
  return {k: round(v / 1e3 / calls / devices, 2) for k, v in micros.most_common()}


def diffusers_layer_times(config, batch, steps: int, torch_threads: int) -> Dict[str, float]:
  """Milliseconds per step of diffusers' train step, self time of aten ops by category."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  unet, _, _ = train_throughput.build_diffusers_unet(config, torch_threads)
  labels = np.asarray(jax.device_get(batch['label'])) if 'label' in batch else None
  step = train_throughput.TorchTrainStep(unet, config, np.asarray(jax.device_get(batch['image'])),
                                         labels)
  for _ in range(2):
    step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  micros: collections.Counter = collections.Counter()
  for event in prof.key_averages():
    layer = next((k for k, pattern in _TORCH_LAYERS if pattern.search(event.key)), 'other')
    micros[layer] += event.self_cpu_time_total
  return {k: round(v / 1e3 / steps, 2) for k, v in micros.most_common()}


def main(argv):
  del argv
  f = flags.FLAGS
  train_throughput.split_cpu(f.config, f.batch_size)
  train_step, state, batch, _, _ = train_throughput.build_ours(f.config, f.batch_size)
  compiled = train_step.lower(state, batch).compile()
  devices = len(jax.devices())
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
  extra: Dict[str, Any] = {}
  if train_throughput.resolve_compare(f.compare_diffusers):
    blocker = train_throughput.comparison_blocker()
    if blocker:
      extra['diffusers_skipped'] = blocker
    else:
      try:
        extra['diffusers_by_layer'] = diffusers_layer_times(f.config, batch, f.steps,
                                                            f.torch_threads)
      except NotImplementedError as e:  # No like-for-like diffusers step for this config.
        extra['diffusers_skipped'] = str(e)
  print(json.dumps({
      'benchmark': 'profile_train_step',
      'config': train_throughput.config_name(train_throughput.config_file()),
      'batch_size': f.batch_size, 'platform': jax.devices()[0].platform,
      'step_ms_traced': round(wall_ms, 2), 'ops_ms': round(total_us / 1e3, 2),
      'top': [{'op': k, 'ms': round(t / 1e3, 2), 'share': round(t / total_us, 3),
               'calls': counts[k]} for k, t in times.most_common(f.top)],
      'devices': devices,
      'by_layer': layer_times(events, compiled.as_text(), f.steps, devices),
      **extra,
  }), flush=True)


if __name__ == '__main__':
  train_throughput.define_flags(default_config='configs/digits.py')
  flags.DEFINE_integer('steps', 10, 'Traced train steps (after 3 untimed ones).')
  flags.DEFINE_integer('top', 15, 'Op kinds to list.')
  app.run(main)
