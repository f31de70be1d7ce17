"""DDPM on CelebA at 64x64 (center crop 140 -> 64, as in DDIM's CelebA setting).

  python main.py --config=configs/celeba64.py --workdir=gs://bucket/celeba64 \\
      --config.data.data_dir=gs://bucket/tensorflow_datasets

ch 128, ch_mult (1, 2, 2, 2, 4), attention at 16x16, dropout 0.1, batch 128, 500k steps.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'celeb_a'
  config.data.resolution = 64
  config.model.ch_mult = (1, 2, 2, 2, 4)
  config.model.attn_resolutions = (16,)
  config.training.num_train_steps = 500_000
  config.sample.steps = 100
  return config
