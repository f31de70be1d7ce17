"""diffusion-jax command line: train, or sample from, a diffusion model.

  python main.py --config=configs/digits.py --workdir=runs/digits               # train (resumes)
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=sample # samples.npz + grid
  python main.py --config=configs/cifar10_ddpm.py --workdir=gs://bucket/run \\
      --config.training.batch_size=256                                          # any field

On a multi-host TPU pod or a multi-node GPU cluster the same command runs on every host;
`jax.distributed` is initialised when the environment says there are several processes.
"""

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples and TensorBoard events.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'What to do.')
flags.DEFINE_bool('distributed', None,
                  'Call jax.distributed.initialize() (default: auto-detect a TPU pod or SLURM).')
config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietCheckpointLogs(logging.Filter):
  """Drops orbax's per-save INFO lines (dozens per checkpoint); its warnings still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def _wants_distributed() -> bool:
  if FLAGS.distributed is not None:
    return FLAGS.distributed
  return ('SLURM_NTASKS' in os.environ and int(os.environ['SLURM_NTASKS']) > 1) or (
      'TPU_WORKER_HOSTNAMES' in os.environ and ',' in os.environ['TPU_WORKER_HOSTNAMES'])


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  absl_logging.get_absl_handler().addFilter(_QuietCheckpointLogs())
  import jax  # pylint: disable=g-import-not-at-top
  if _wants_distributed():
    jax.distributed.initialize()
  from diffusion_jax import config_validation, sampling, train  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
      out_dir = sampling.generate(FLAGS.config, FLAGS.workdir)
      print(f'Samples written to {out_dir}')
  except (config_validation.ConfigError, FileNotFoundError, ValueError,
          train.NonFiniteLossError) as e:
    raise app.UsageError(str(e)) from e


if __name__ == '__main__':
  app.run(main)
