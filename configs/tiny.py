"""A tiny config for tests and debugging: trains and samples in seconds on one CPU core.

  python main.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.unet.ch = 16
  config.model.unet.num_groups = 8
  config.model.unet.ch_mult = (1, 2)
  config.model.unet.attn_resolutions = (4,)
  config.diffusion.ddpm.num_timesteps = 100
  config.optim.warmup_steps = 10
  config.training.batch_size = 16
  config.training.num_train_steps = 6
  config.training.log_every_steps = 2
  config.training.sample_every_steps = 3
  config.training.checkpoint_every_steps = 3
  config.training.num_grid_samples = 16
  config.training.eval_every_steps = 0  # The digits demo's in-training eval is off here.
  config.training.async_checkpointing = False
  config.sample.steps = 5
  config.sample.num_samples = 24
  config.sample.batch_size = 16
  return config
