"""EDM on unconditional CIFAR-10 (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): their DDPM++ setting (config F, "ours") on our U-Net.

  python main.py --config=configs/cifar10_edm.py --workdir=gs://bucket/cifar10_edm \\
      --config.data.data_dir=gs://bucket/tensorflow_datasets
  python main.py --config=configs/cifar10_edm.py --workdir=gs://bucket/cifar10_edm \\
      --mode=eval

Published target: FID 1.97 (50k samples, unconditional) with the deterministic Heun sampler,
18 steps = 35 network evaluations (their class-conditional model: 1.79).

What is EDM's here: the preconditioning with sigma_data = 0.5 and c_noise = ln(sigma) / 4, the
log-normal noise levels P_mean = -1.2, P_std = 1.2 and the loss weighting (diffusion.edm);
Adam lr 1e-3 (betas 0.9 / 0.999, eps 1e-8) ramped up linearly over 10 Mimg (19,531 steps) then
constant; batch 512 for 200 Mimg (390,625 steps); dropout 0.13; no gradient clipping; EMA with a
half-life of 0.5 Mimg, i.e. decay 0.5^(512 / 500,000) = 0.99929 per step of 512 images; Heun
with 18 steps, rho 7, sigma 0.002 .. 80. The network follows DDPM++: 128 channels x (2, 2, 2) at
32 / 16 / 8 pixels, 4 residual blocks per level, attention at 16x16 with one head, residual
blocks for up/downsampling, the noise level added (not scale-shift) to every block,
[sin, cos] positional embedding of c_noise -> 512-wide MLP: 56.5M parameters (theirs 55.7M).

What differs from their DDPM++: our residual blocks do not scale the skip sum by sqrt(1/2),
resample with nearest / average pooling inside the residual blocks rather than their [1, 1]
FIR filter with a 1x1 projection, and initialise as Ho et al.'s U-Net; EDM's loss is summed
over pixels, ours averaged (a constant factor 3072, absorbed by Adam); their EMA ramps its
half-life up to 0.05 x the images seen, ours uses optim.ema_warmup's (1 + n) / (10 + n); and
EDM's non-leaky geometric augmentation (probability 0.12, with augmentation labels fed to the
network) is not implemented: we use random horizontal flips instead, so expect the FID to land
somewhat above 1.97 (EDM adds the augmentation against overfitting on CIFAR-10's 50k images).
This config has not been trained to completion here; the FID above is the paper's.

Target pod: v5e-16 (batch 512 = 32 images per chip).
`--mode=compile` compiles it for that pod on any machine and reports per-chip memory, FLOPs
and collectives (benchmarks/compile_pods.py; figures in benchmarks/RESULTS.md).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'cifar10'
  config.data.resolution = 32
  config.data.random_flip = True

  config.model.unet.ch = 128
  config.model.unet.ch_mult = (2, 2, 2)
  config.model.unet.num_res_blocks = 4
  config.model.unet.attn_resolutions = (16,)
  config.model.unet.num_heads = 1
  config.model.unet.dropout = 0.13
  config.model.unet.resblock_updown = True
  config.model.unet.use_scale_shift_norm = False
  config.model.flip_sin_to_cos = False  # [sin, cos] as DDPM++ after its swap ...
  config.model.freq_shift = 1           # ... frequencies 10000^(-i / (64 - 1)) (endpoint=True).

  config.diffusion.objective = 'edm'
  config.diffusion.edm.sigma_data = 0.5
  config.diffusion.edm.p_mean = -1.2
  config.diffusion.edm.p_std = 1.2
  config.diffusion.edm.sigma_min = 0.002
  config.diffusion.edm.sigma_max = 80.0

  config.optim.optimizer = 'adam'
  config.optim.learning_rate = 1e-3
  config.optim.lr_schedule = 'constant'
  config.optim.warmup_steps = 19_531    # 10 Mimg at batch 512.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.grad_clip = 0.0          # EDM does not clip gradients.
  config.optim.ema_decay = 0.9992905    # Half-life 0.5 Mimg = 976.6 steps of 512.
  config.optim.ema_warmup = True

  config.training.batch_size = 512
  config.training.num_train_steps = 390_625  # 200 Mimg.
  config.training.num_grid_samples = 128

  config.sample.sampler = 'heun'
  config.sample.steps = 18              # 35 network evaluations.
  config.sample.rho = 7.0
  config.sample.s_churn = 0.0           # Deterministic (Algorithm 1).
  config.sample.num_samples = 50_000
  config.sample.batch_size = 1024

  config.eval.metrics = ('fid',)        # 'vlb' is ddpm-only.
  config.eval.num_samples = 50_000      # As the paper (which reports the best of 3 runs).
  config.eval.feature_batch_size = 256  # Inception batch: a multiple of up to 256 chips.
  config.compile.topology = 'v5e-16'  # The target pod of the docstring.
  return config
