"""diffusion-jax command line: train, sample from, or evaluate a diffusion model.

  python main.py --config=configs/digits.py --workdir=runs/digits               # train (resumes)
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=sample # samples.npz + grid
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=eval   # bits/dim
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=export # jax.export sampler
  python main.py --config=... --workdir=... --mode=posthoc_ema \\
      --config.posthoc_ema.sigma_rel=0.08    # EDM2 post-hoc EMA from the run's EMA snapshots
  python main.py --config=configs/cifar10_ddpm.py --workdir=gs://bucket/run \\
      --config.training.batch_size=256                                          # any field
  python main.py --config=configs/imagenet64_dit.py --workdir=runs/plan --mode=compile \\
      --config.compile.topology=v5p-128   # compile for a pod here: per-chip memory, FLOPs

On a multi-host TPU pod or a multi-node GPU cluster the same command runs on every host;
`jax.distributed` is initialised when diffusion_jax/parallel/distributed.py detects a cluster (SLURM,
Open MPI, Cloud TPU VM / GKE, or the --coordinator_address flags) and logs what it found.
"""

import logging
import os
from typing import Any, Dict

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from diffusion_jax import modes

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples and TensorBoard events.')
flags.DEFINE_enum('mode', 'train', list(modes.MODES), 'What to do (diffusion_jax/modes/).')
flags.DEFINE_bool('distributed', None,
                  'Call jax.distributed.initialize() (default: when a cluster of several '
                  'processes is detected: SLURM, Open MPI, a Cloud TPU VM or GKE TPU pod, or '
                  '--coordinator_address).')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for jax.distributed (clusters without auto-detection).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietCheckpointLogs(logging.Filter):
  """Drops orbax's per-save INFO lines (dozens per checkpoint); its warnings still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if FLAGS.mode == 'compile':  # Compiles for a described pod: never the local accelerator.
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  absl_logging.get_absl_handler().addFilter(_QuietCheckpointLogs())
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  try:
    cluster = distributed.detect_cluster(os.environ, distributed.cloud_tpu_vm_present(),
                                         FLAGS.coordinator_address, FLAGS.num_processes,
                                         FLAGS.process_id)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  from diffusion_jax.config import run_config  # pylint: disable=g-import-not-at-top
  from diffusion_jax.config.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from diffusion_jax.modes import validation  # pylint: disable=g-import-not-at-top
  from diffusion_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  # The mode's module is imported before jax.distributed starts: train and eval import
  # TensorFlow (~4 s), which sample and export never do.
  run_mode = modes.entry(FLAGS.mode)
  try:  # Before any backend starts: how many XLA devices the CPU is split into.
    cpu_devices = sharding.configure_cpu_devices(
        FLAGS.config.mesh, validation.batch_sizes(FLAGS.config), cluster.is_multi_process)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  distributed.initialize_distributed(cluster, FLAGS.distributed)
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  if jax.devices()[0].platform == 'cpu' and cpu_devices is not None:
    logging.info('The CPU is split into %d XLA devices (mesh.cpu_devices=%d; 0 = one per core '
                 'of the %d usable, as many as every batch splits over).', cpu_devices,
                 FLAGS.config.mesh.cpu_devices, sharding.usable_cores())
  # Only a bad config and a missing checkpoint are usage errors; anything else (orbax, JAX,
  # tfds) keeps its traceback.
  try:
    config = FLAGS.config
    if FLAGS.mode not in ('train', 'compile'):
      config = run_config_for_mode(config, FLAGS.workdir)
    result = run_mode(config, FLAGS.workdir)
    if FLAGS.mode == 'eval':
      print(eval_summary(result, FLAGS.workdir))
    elif FLAGS.mode == 'compile':
      from diffusion_jax.modes import compile as compile_mode  # pylint: disable=g-import-not-at-top
      print(compile_mode.format_report(result))
    elif FLAGS.mode in WRITTEN:
      print(f'{WRITTEN[FLAGS.mode]} written to {result}')
  except (ConfigError, run_config.LockedFieldError) as e:
    raise app.UsageError(str(e)) from e
  except checkpoints.NoCheckpointError as e:  # Sample / eval before training.
    raise app.UsageError(str(e)) from e


# What the modes that write a folder print before its path.
WRITTEN = {'sample': 'Samples', 'export': 'Exported sampler', 'posthoc_ema': 'Post-hoc EMA'}


def run_config_for_mode(config, workdir: str):
  """--mode=sample|eval|export|posthoc_ema: the run's own <workdir>/config.json (when there is
  one) with the explicit command-line overrides applied. The --config file only supplies the
  fields the run's config.json lacks (sections it predates, e.g. `export`, or fields an import
  did not write); its other values are not requests, so a --config whose model or diffusion
  fields differ from the run's (e.g. configs/cifar10_ddpm.py after `convert --from=diffusers`)
  is fine. An override changing a model/diffusion field of the saved run raises
  run_config.LockedFieldError naming each field."""
  from diffusion_jax.config import run_config  # pylint: disable=g-import-not-at-top
  saved = run_config.load_run_config(workdir, fallback=config)
  if saved is None:
    return config
  overrides = config_flags.get_override_values(FLAGS['config'])
  merged = run_config.config_for_run(saved, overrides)
  logging.info('Using the run\'s own %s with overrides %s', run_config.config_path(workdir),
               sorted(overrides))
  return merged


def eval_summary(results: Dict[str, Any], workdir: str) -> str:
  """One line per metric: bits/dim for likelihood metrics, the figures for sample metrics, and
  where the details were written (<workdir>/eval/)."""
  step = results.get('step')
  lines = []
  for name, value in results.items():
    if not isinstance(value, dict):
      continue
    if 'bpd' in value:
      lines.append(f'{name}: {value["bpd"]:.4f} bits/dim on {results["num_examples"]} images')
    else:
      figures = {k: v for k, v in value.items() if isinstance(v, float)}
      lines.append(f'{name}: ' + ', '.join(f'{k}={v:.4g}' for k, v in sorted(figures.items())))
  lines.append(f'Step {step}; details in {workdir}/eval/')
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(main)
