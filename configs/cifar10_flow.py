"""Flow matching on CIFAR-10 with configs/cifar10_ddpm.py's U-Net and training (35.7M parameters).

  python main.py --config=configs/cifar10_flow.py --workdir=gs://bucket/cifar10_flow \\
      --config.data.data_dir=gs://bucket/tensorflow_datasets
  # FID on 50k samples and the exact NLL through the ODE (bits/dim on the test split):
  python main.py --config=configs/cifar10_flow.py --workdir=gs://bucket/cifar10_flow --mode=eval \\
      --config.eval.metrics="('fid','ode_nll')" --config.eval.num_samples=50000

The rectified-flow / flow-matching setting: x_t = (1 - t) x0 + t eps, velocity targets, t uniform
on [0, 1] (as Lipman et al. and Liu et al. train; SD3's logit-normal t is
`--config.diffusion.flow_matching.time_dist=logit_normal`), no time shift at 32x32, Heun on 50 steps
(99 network evaluations). Everything else is Ho et al.'s: Adam 2e-4, 5000 warm-up steps, batch
128, EMA 0.9999, dropout 0.1, random flips, 800k steps.

Published comparison points (other networks and solvers, so a guide, not a reproduction):
Lipman et al. 2023 ("Flow Matching for Generative Modeling", Table 1, CIFAR-10, FM with the OT
path, which is this path, on a U-Net, adaptive dopri5): FID 6.35, NLL 2.99 bits/dim, 142 NFE.
Liu et al. 2023 ("Flow Straight and Fast", Table 1, 1-Rectified Flow, DDPM++ network, RK45):
FID 2.58.

Target pod: v5e-8 (batch 128 = 16 images per chip).
`--mode=compile` compiles it for that pod on any machine and reports per-chip memory, FLOPs
and collectives (benchmarks/compile_pods.py; figures in benchmarks/RESULTS.md).
"""

from configs import cifar10_ddpm


def get_config():
  config = cifar10_ddpm.get_config()
  config.diffusion.objective = 'flow_matching'
  config.diffusion.flow_matching.time_dist = 'uniform'
  config.diffusion.flow_matching.time_shift = 1.0
  config.diffusion.flow_matching.prediction = 'velocity'
  config.sample.sampler = 'heun'
  config.sample.steps = 50
  config.eval.metrics = ('ode_nll',)   # 'vlb' is the discrete-time (ddpm) bound.
  config.compile.topology = 'v5e-8'  # The target pod of the docstring.
  return config
