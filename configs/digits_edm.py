"""The CPU demo with the EDM objective (Karras et al. 2022) on scikit-learn's 8x8 digits.

  python main.py --config=configs/digits_edm.py --workdir=runs/digits_edm
  python main.py --config=configs/digits_edm.py --workdir=runs/digits_edm --mode=sample

The network and training budget of configs/digits.py, trained with EDM's preconditioning,
log-normal noise levels and loss weighting (diffusion.objective='edm', the paper's sigma_data,
P_mean, P_std), and sampled with EDM's deterministic Heun sampler (sample.sampler='heun',
18 steps = 35 network evaluations instead of DDIM's 100). Like the digits demo it ends with one
in-training eval that logs `classifier_fd at step 3000: ...` (lower is better). Measured
(2026-12, 512 samples, seed 0): 2.34 here against 3.15 for configs/digits.py, at the same cost
per training step; 32 Heun steps give 2.36, so 18 suffice. Wall-clock on a busy shared 2-core
CPU: 30 minutes (the digits demo took 16 minutes there at another, quieter time).
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.diffusion.objective = 'edm'
  config.diffusion.edm.sigma_data = 0.5
  config.diffusion.edm.p_mean = -1.2
  config.diffusion.edm.p_std = 1.2
  config.diffusion.edm.sigma_min = 0.002
  config.diffusion.edm.sigma_max = 80.0
  config.eval.metrics = ('classifier_fd',)  # 'vlb' is a ddpm-only metric.

  config.sample.sampler = 'heun'
  config.sample.steps = 18       # 35 network evaluations (ddim in digits.py: 100).
  config.sample.rho = 7.0
  return config
