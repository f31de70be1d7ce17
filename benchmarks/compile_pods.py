"""Compiles every shipped pod config for its target pod (`config.compile.topology`, named in the
config's docstring) on this machine and prints one JSON line per config: the train state per
chip by kind, each program's peak per chip and headroom, FLOPs per step, collectives, compile
time and XLA's estimated step time (its cost model: an estimate, not a measurement).

  pip install -e '.[compile]'
  python benchmarks/compile_pods.py                        # every pod config
  python benchmarks/compile_pods.py --configs=cifar10_ddpm,imagenet64_dit --programs=train

Needs no TPU or GPU and reads no data. The figures are what `--mode=compile` reports for the
same config (modes/compile.py), one process for all configs.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # Compiles for the described pod only.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', [], 'Config names under configs/ (default: every config that names '
                  'a target pod in compile.topology).')
flags.DEFINE_list('programs', [], 'compile.programs to compile (default: the config\'s).')


def pod_configs() -> list:
  """The configs under configs/ whose compile.topology names a pod."""
  names = []
  for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs', '*.py'))):
    name = os.path.splitext(os.path.basename(path))[0]
    if name.startswith('_'):
      continue
    if importlib.import_module(f'configs.{name}').get_config().compile.topology:
      names.append(name)
  return names


def summary(name: str, report: dict) -> dict:
  """One JSON line: the figures of a compile report that the results table shows."""
  line = {'config': name, 'topology': report['topology'], 'mesh': report['mesh'],
          'jax': report['jax'], 'compiler': report['compiler'], 'fits': report['fits'],
          'budget_bytes_per_chip': report['budget_bytes'],
          'state_bytes_per_chip': report['state_bytes_per_chip'], 'programs': {}}
  for program, p in report['programs'].items():
    line['programs'][program] = {
        'peak_bytes_per_chip': p['peak_bytes'], 'headroom_bytes': p['headroom_bytes'],
        'temp_bytes': p['memory']['temp_bytes'], 'argument_bytes': p['memory']['argument_bytes'],
        'compile_seconds': p['compile_seconds'], 'flops_per_step': p.get('flops_per_step'),
        'xla_estimated_step_seconds': p.get('xla_estimated_step_seconds'),
        'xla_estimated_mfu': p.get('xla_estimated_mfu'),
        'collectives': {k: v for k, v in p['collectives'].items() if v['count']}}
  return line


def main(argv):
  del argv
  from diffusion_jax.modes import compile as compile_mode  # pylint: disable=g-import-not-at-top
  for name in FLAGS.configs or pod_configs():
    config = importlib.import_module(f'configs.{name}').get_config()
    if FLAGS.programs:
      config.compile.programs = tuple(FLAGS.programs)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
      try:
        report = compile_mode.compile_for_topology(config, workdir)
      except compile_mode.DoesNotFitError as e:
        report = e.report
    line = summary(name, report)
    line['wall_seconds'] = round(time.perf_counter() - start, 1)
    print(json.dumps(line), flush=True)


if __name__ == '__main__':
  app.run(main)
