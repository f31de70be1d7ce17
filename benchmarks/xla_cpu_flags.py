"""XLA:CPU flag variants side by side: the train step (or a sampler) under each XLA_FLAGS setting.

  python benchmarks/xla_cpu_flags.py --config=configs/digits.py --batch_size=64 --rounds=3

XLA_FLAGS is read once per process, so each variant runs `train_throughput.py` (or
`sample_throughput.py` with --what=sample) in its own subprocess; the variants alternate
round by round (A, B, C, A, B, C, ...) so that load from other processes hits all of them alike.
Prints one JSON line per variant: the median over rounds of each child's median step time, the
spread (min/max), and the ratio of the baseline's time over the variant's (> 1: faster).
Extra flags after `--` go to every child (e.g. `-- --config.model.unet.dropout=0.0`).
"""

import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> XLA_FLAGS added to whatever XLA_FLAGS the caller set; 'default' is the baseline and
# always runs.
VARIANTS = {
    'default': '',
    'onednn': '--xla_cpu_use_onednn=true',
    'onednn_custom_call': '--xla_cpu_experimental_onednn_custom_call=true',
    'xnnpack': '--xla_cpu_use_xnnpack=true',
    'no_fusion_emitters': '--xla_cpu_use_fusion_emitters=false',
    'fast_math': '--xla_cpu_enable_fast_math=true',
    'single_thread_eigen': '--xla_cpu_multi_thread_eigen=false',
    'vector512': '--xla_cpu_prefer_vector_width=512',
    'no_concurrency_scheduler': '--xla_cpu_enable_concurrency_optimized_scheduler=false',
    'llvm_opt1': '--xla_backend_optimization_level=1',
    'llvm_opt2': '--xla_backend_optimization_level=2',
}

_CONFIG = flags.DEFINE_string('config', 'configs/digits.py', 'Config file.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds; each runs every variant once.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per child (train) or sampler calls.')
_WHAT = flags.DEFINE_enum('what', 'train', ['train', 'sample'], 'Which benchmark to run.')
_ONLY = flags.DEFINE_list('variants', list(VARIANTS), f'Subset of {list(VARIANTS)}.')


def child_command(extra: List[str]) -> List[str]:
  """The benchmark command one child runs (JSON line on stdout)."""
  script = 'train_throughput.py' if _WHAT.value == 'train' else 'sample_throughput.py'
  cmd = [sys.executable, os.path.join(_ROOT, 'benchmarks', script),
         f'--config={_CONFIG.value}', f'--batch_size={_BATCH.value}',
         '--compare_diffusers=false']
  cmd += ([f'--steps={_STEPS.value}', '--warmup=2'] if _WHAT.value == 'train'
          else [f'--repeats={_STEPS.value}'])
  return cmd + extra


def run_child(xla_flags: str, extra: List[str]) -> Dict[str, float]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(f for f in (env.get('XLA_FLAGS', ''), xla_flags) if f)
  out = subprocess.run(child_command(extra), env=env, cwd=_ROOT, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
  line = json.loads(out.strip().splitlines()[-1])
  if _WHAT.value == 'train':
    return {'ms': line['step_ms'], 'compile_s': line['compile_s']}
  return {'ms': 1e3 * line['batch_size'] / line['images_per_sec'], 'compile_s': line['compile_s']}


def main(argv):
  extra = argv[1:]
  unknown = [v for v in _ONLY.value if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f'--variants: unknown {unknown}; choose from {list(VARIANTS)}.')
  names = ['default'] + [v for v in _ONLY.value if v != 'default']
  times: Dict[str, List[float]] = {n: [] for n in names}
  compiles: Dict[str, List[float]] = {n: [] for n in names}
  for r in range(_ROUNDS.value):
    for name in names:
      got = run_child(VARIANTS[name], extra)
      times[name].append(got['ms'])
      compiles[name].append(got['compile_s'])
      print(f'round {r}: {name}: {got["ms"]:.1f} ms', file=sys.stderr, flush=True)
  base = statistics.median(times['default'])
  for name in names:
    median = statistics.median(times[name])
    print(json.dumps({
        'benchmark': f'xla_cpu_flags_{_WHAT.value}', 'config': _CONFIG.value,
        'batch_size': _BATCH.value, 'variant': name, 'xla_flags': VARIANTS[name],
        'ms_median': round(median, 2), 'ms_min': round(min(times[name]), 2),
        'ms_max': round(max(times[name]), 2), 'compile_s_median': round(
            statistics.median(compiles[name]), 2),
        'speedup_vs_default': round(base / median, 3), 'rounds': _ROUNDS.value}), flush=True)


if __name__ == '__main__':
  app.run(main)
