"""diffusion-jax command line: train, sample from, or evaluate a diffusion model.

  python main.py --config=configs/digits.py --workdir=runs/digits               # train (resumes)
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=sample # samples.npz + grid
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=eval   # bits/dim
  python main.py --config=configs/cifar10_ddpm.py --workdir=gs://bucket/run \\
      --config.training.batch_size=256                                          # any field

On a multi-host TPU pod or a multi-node GPU cluster the same command runs on every host;
`jax.distributed` is initialised when diffusion_jax/distributed.py detects a cluster (SLURM,
Open MPI, Cloud TPU VM / GKE, or the --coordinator_address flags) and logs what it found.
"""

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples and TensorBoard events.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to do.')
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
  absl_logging.get_absl_handler().addFilter(_QuietCheckpointLogs())
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import distributed  # pylint: disable=g-import-not-at-top
  try:
    cluster = distributed.detect_cluster(os.environ, distributed.cloud_tpu_vm_present(),
                                         FLAGS.coordinator_address, FLAGS.num_processes,
                                         FLAGS.process_id)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  distributed.initialize_distributed(cluster, FLAGS.distributed)
  from diffusion_jax import config_validation, sample_mode, train  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'eval':
      from diffusion_jax import evaluation  # pylint: disable=g-import-not-at-top
      results = evaluation.evaluate(FLAGS.config, FLAGS.workdir)
      summary = {k: v['bpd'] for k, v in results.items() if isinstance(v, dict)}
      print(f'Step {results["step"]}, {results["num_examples"]} images: bits/dim {summary}; '
            f'details in {FLAGS.workdir}/eval/vlb_step{results["step"]}.json')
    else:
      out_dir = sample_mode.generate(FLAGS.config, FLAGS.workdir)
      print(f'Samples written to {out_dir}')
  except (config_validation.ConfigError, FileNotFoundError, ValueError,
          train.NonFiniteLossError) as e:
    raise app.UsageError(str(e)) from e


if __name__ == '__main__':
  app.run(main)
