"""DDPM on CIFAR-10 exactly as Ho et al. 2020 (35,746,307 parameters).

  python main.py --config=configs/cifar10_ddpm.py --workdir=gs://bucket/cifar10_ddpm \\
      --config.data.data_dir=gs://bucket/tensorflow_datasets

ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16x16, dropout 0.1, T = 1000 linear
betas 1e-4..0.02, epsilon prediction, Adam 2e-4 with 5000 warm-up steps, grad clip 1.0,
batch 128, EMA 0.9999, random flips, 800k steps. The paper reports FID 3.17.

Target pod: v5e-8 (batch 128 = 16 images per chip).
`--mode=compile` compiles it for that pod on any machine and reports per-chip memory, FLOPs
and collectives (benchmarks/compile_pods.py; figures in benchmarks/RESULTS.md).
"""

from configs import default


def get_config():
  config = default.get_config()  # The defaults are this paper's settings.
  config.data.dataset = 'cifar10'
  config.data.resolution = 32
  config.data.random_flip = True
  config.sample.sampler = 'ddpm'
  config.sample.steps = 0
  config.sample.num_samples = 50_000
  config.sample.batch_size = 1024  # A multiple of 8..256 devices; the
                                    # last batch's extra samples are dropped.
  config.training.num_grid_samples = 128  # One grid image per device up to 128 chips.
  config.compile.topology = 'v5e-8'  # The target pod of the docstring.
  return config
