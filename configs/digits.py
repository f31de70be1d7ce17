"""The DDPM CPU demo: a small DDPM on scikit-learn's 8x8 handwritten digits (ships offline).

  python main.py --config=configs/digits.py --workdir=runs/digits
  python main.py --config=configs/digits.py --workdir=runs/digits --mode=sample

Trains in about 4 minutes on a 2-core CPU split into one device per core (4 min 12 s measured
2026-12-03; 4 min 57 s on one device, idle): 3000 steps plus compilation and the final eval;
configs/digits_flow.py (the README's demo) gets better samples in about 60% of the time. Notebook 01 and the DDPM samplers use this one.
Sample grids appear in runs/digits/samples/. At the end of training the in-training eval scores 512 EMA samples with `classifier_fd` (the Fréchet
distance in the features of a small digits classifier, trained once in seconds and cached; lower
is better) and logs it in one line, e.g. `classifier_fd at step 3000: ...`; the figures are also
in runs/digits/eval/ and the best checkpoint in runs/digits/checkpoints_best/.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'digits'
  config.data.resolution = 8
  config.data.channels = 1
  config.data.random_flip = False      # Mirrored digits are not digits.
  config.data.shuffle_buffer = 2048
  config.data.cache = True

  config.model.unet.ch = 32                 # 0.7M parameters: ~20 train steps/s on 2 CPU cores.
  config.model.unet.ch_mult = (1, 2)        # Feature maps 8x8 and 4x4.
  config.model.unet.num_res_blocks = 1
  config.model.unet.attn_resolutions = (4,)
  config.model.unet.num_groups = 8
  config.model.unet.dropout = 0.0

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.lr_schedule = 'cosine'
  config.optim.ema_decay = 0.998
  config.optim.ema_warmup = True

  config.training.batch_size = 64
  config.training.num_train_steps = 3000
  config.training.log_every_steps = 100
  config.training.sample_every_steps = 1000
  config.training.checkpoint_every_steps = 1000
  config.training.num_grid_samples = 64

  # One in-training eval, at the last step: 512 samples (2 sampling calls of 256) scored with
  # classifier_fd; its line closes the training log.
  config.training.eval_every_steps = 3000
  config.eval.train_metrics = ('classifier_fd',)
  config.eval.train_num_samples = 512

  config.sample.sampler = 'ddim'
  config.sample.steps = 100
  config.sample.num_samples = 256
  config.sample.batch_size = 256
  return config
