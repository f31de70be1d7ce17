"""Class-conditional CIFAR-10 with classifier-free guidance (Ho & Salimans 2022) on the DDPM U-Net.

  python main.py --config=configs/cifar10_cond.py --workdir=gs://bucket/cifar10_cond \\
      --config.data.data_dir=gs://bucket/tensorflow_datasets
  python main.py --config=configs/cifar10_cond.py --workdir=gs://bucket/cifar10_cond \\
      --mode=sample --config.sample.num_samples=50000 --config.sample.guidance_scale=1.5

The network and training of `cifar10_ddpm` plus a class embedding (10 classes and a null class);
labels are dropped to the null class with probability 0.1. Samples cycle through the classes.

Target pod: v5e-8 (batch 128 = 16 images per chip).
`--mode=compile` compiles it for that pod on any machine and reports per-chip memory, FLOPs
and collectives (benchmarks/compile_pods.py; figures in benchmarks/RESULTS.md).
"""

from configs import cifar10_ddpm


def get_config():
  config = cifar10_ddpm.get_config()
  config.data.label_key = 'label'
  config.model.num_classes = 10
  config.training.cond_drop_prob = 0.1
  config.sample.sampler = 'ddim'
  config.sample.steps = 100
  config.sample.guidance_scale = 1.5
  config.sample.num_samples = 50_000
  config.sample.batch_size = 1024  # A multiple of 8..256 devices; the
                                    # last batch's extra samples are dropped.
  config.training.num_grid_samples = 128  # One grid image per device up to 128 chips.
  config.compile.topology = 'v5e-8'  # The target pod of the docstring.
  return config
