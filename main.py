"""diffusion-jax command line: train, sample from, or evaluate a diffusion model.

  python main.py --config=configs/digits.py --workdir=runs/digits               # train (resumes)
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=sample # samples.npz + grid
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=eval   # bits/dim
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
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to do.')
flags.DEFINE_bool('distributed', None,
                  'Call jax.distributed.initialize() (default: auto-detect a TPU pod or SLURM, '
                  'or when --coordinator_address is given).')
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


def _wants_distributed() -> bool:
  if FLAGS.distributed is not None:
    return FLAGS.distributed
  if FLAGS.coordinator_address:
    return True
  return ('SLURM_NTASKS' in os.environ and int(os.environ['SLURM_NTASKS']) > 1) or (
      'TPU_WORKER_HOSTNAMES' in os.environ and ',' in os.environ['TPU_WORKER_HOSTNAMES'])


def _initialize_distributed(jax) -> None:
  """jax.distributed.initialize(): auto-detected on Cloud TPU / SLURM, else from the flags.

  CPU processes exchange collectives over gloo (multi-process CPU runs, tests, debugging).
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise app.UsageError('--coordinator_address needs --num_processes and --process_id.')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  else:
    jax.distributed.initialize()


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  absl_logging.get_absl_handler().addFilter(_QuietCheckpointLogs())
  import jax  # pylint: disable=g-import-not-at-top
  if _wants_distributed():
    _initialize_distributed(jax)
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
