"""Default configuration: every field diffusion-jax reads, documented in one place.

Other configs start from `get_config()` here and override what differs. Run any of them with

  python main.py --config=configs/default.py --workdir=runs/default

Fields can be overridden on the command line: `--config.training.batch_size=64`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config (the DDPM CIFAR-10 setting of Ho et al. 2020)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, per-step noise/timesteps/dropout and data order.

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  # 'digits' (scikit-learn's 8x8 digits, offline), 'folder' (images under
  # `data.folder`), or any tensorflow-datasets name such as 'cifar10',
  # 'celeb_a', 'stl10', 'mnist', 'oxford_flowers102', 'imagenet_resized/64x64'.
  data.dataset = 'cifar10'
  data.split = 'train'         # tfds split string used for training.
  data.eval_split = 'test'     # Split used by --mode=eval.
  data.data_dir = None         # tfds data_dir (may be a gs:// path); None = tfds default.
  data.folder = ''             # Root folder of PNG/JPEG files when dataset == 'folder'.
  data.image_key = 'image'     # Feature holding the image in a tfds example.
  data.label_key = ''          # Feature holding the class label; '' = unlabelled.
  data.resolution = 32         # Images are center-cropped and resized to this size.
  data.channels = 3            # 1 for grayscale datasets (digits, mnist), 3 for RGB.
  data.random_flip = True      # Random horizontal flips (Ho et al. use them on CIFAR-10).
  data.shuffle_buffer = 10_000
  data.cache = False           # Cache decoded examples in memory (small datasets only).
  data.prefetch = 2            # Batches prefetched by tf.data.

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  model.ch = 128                       # Base channel count.
  model.ch_mult = (1, 2, 2, 2)         # Channel multiplier per resolution level.
  model.num_res_blocks = 2             # Residual blocks per level (the up path has one more).
  model.attn_resolutions = (16,)       # Feature-map sizes that get self-attention.
  model.num_heads = 1                  # Attention heads ...
  model.num_head_channels = -1         # ... or channels per head (overrides num_heads if > 0).
  model.dropout = 0.1
  model.resblock_updown = False        # BigGAN-style up/downsampling residual blocks.
  model.use_scale_shift_norm = False   # AdaGN: inject the timestep as scale and shift.
  model.num_groups = 32                # GroupNorm groups.
  model.num_classes = 0                # > 0: class-conditional; one extra null class is added.
  model.learn_sigma = False            # Output 2x channels: epsilon and the variance interpolation.
  model.dtype = 'float32'              # Compute dtype ('bfloat16' on TPU/GPU for speed).
  model.param_dtype = 'float32'        # Parameter storage dtype.
  model.remat = False                  # Rematerialise each block in the backward pass.

  # ---------------------------------------------------------------- diffusion
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = 'linear'   # linear | cosine | scaled_linear | sigmoid
  diffusion.beta_start = 1e-4          # For linear / scaled_linear / sigmoid.
  diffusion.beta_end = 0.02
  diffusion.prediction_type = 'epsilon'  # epsilon | x0 | v
  diffusion.loss_weighting = 'simple'    # simple | min_snr
  diffusion.min_snr_gamma = 5.0          # gamma of Min-SNR weighting (Hang et al. 2023).

  # ---------------------------------------------------------------- optimizer
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = 'adam'        # adam | adamw
  optim.learning_rate = 2e-4
  optim.lr_schedule = 'constant'  # constant | cosine (after warmup)
  optim.warmup_steps = 5000
  optim.weight_decay = 0.0        # adamw only.
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.grad_clip = 1.0           # Global-norm clipping; <= 0 disables it.
  optim.ema_decay = 0.9999
  optim.ema_warmup = False        # Use min(decay, (1 + n) / (10 + n)) at update n.

  # ---------------------------------------------------------------- training
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128            # Global batch, split over all devices and hosts.
  training.num_train_steps = 800_000
  training.log_every_steps = 100
  training.sample_every_steps = 10_000  # Writes a sample grid (PNG + TensorBoard); 0 = never.
  training.num_grid_samples = 64
  training.checkpoint_every_steps = 10_000
  training.keep_checkpoints = 3
  training.async_checkpointing = True
  training.cond_drop_prob = 0.0        # Labels dropped to the null class (classifier-free guidance).

  # ---------------------------------------------------------------- sampling
  config.sample = sample = ml_collections.ConfigDict()
  sample.sampler = 'ddim'        # ddpm | ddim
  sample.steps = 100             # Sampling steps (ddpm uses num_timesteps if 0).
  sample.eta = 0.0               # DDIM eta: 0 deterministic, 1 DDPM-like noise.
  sample.variance = 'fixed_small'  # DDPM reverse variance: fixed_small | fixed_large
  sample.clip_denoised = True    # Clip the predicted x0 to [-1, 1].
  sample.num_samples = 64        # --mode=sample writes this many images.
  sample.batch_size = 64         # Global batch per sampling call.
  sample.seed = 0
  sample.use_ema = True

  # ---------------------------------------------------------------- devices
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1                 # Devices on the data axis; -1 = all of them.
  return config
