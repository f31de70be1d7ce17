"""The README's CPU demo: flow matching with configs/digits.py's U-Net, half its steps at
twice its learning rate; objective 'flow_matching' (rectified-flow path, velocity targets,
logit-normal t), Heun ODE sampler.

  python main.py --config=configs/digits_flow.py --workdir=runs/digits_flow
  python main.py --config=configs/digits_flow.py --workdir=runs/digits_flow --mode=sample

Ends, like the DDPM demo, with one in-training eval of 512 EMA samples (`classifier_fd at step
1500: ...`, lower is better). Measured on the 2-core CPU (2026-12-03, 512 samples, seed 0; the
sweep is in benchmarks/RESULTS.md, "The demo's recipe"):
  - this config (1500 steps, Adam 2e-3, Heun 18 steps = 35 calls): 2.68, against 3.15 for
    configs/digits.py (DDPM, 3000 steps, DDIM 100) in half its wall-clock time: 2 min 30 s
    against 4 min 57 s, run one after the other on the idle machine on one device; split into
    one device per core, as main.py now does, 147 s and 168 s against 163 s and 181 s for one
    device with two steps per call, run right after each;
  - 1000 / 1200 steps at 2e-3: 3.40 / 3.56; 1000 steps at 1e-3: 3.49;
  - 3000 steps at 1e-3 with Heun 50 (the earlier version of this config): 2.66.
The DDPM objective does not get there in 1500 steps (4.90 at 2e-3; 4.16 with v-prediction and
Min-SNR weighting), nor EDM (3.46 at 2e-3).
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.diffusion.objective = 'flow_matching'
  config.diffusion.flow_matching.time_dist = 'logit_normal'
  config.diffusion.flow_matching.logit_mean = 0.0
  config.diffusion.flow_matching.logit_std = 1.0
  config.diffusion.flow_matching.time_shift = 1.0
  config.diffusion.flow_matching.prediction = 'velocity'
  config.eval.metrics = ('ode_nll',)   # 'vlb' is the discrete-time (ddpm) bound.

  config.optim.learning_rate = 2e-3
  # One step per compiled call: with the CPU split into one device per core (mesh.cpu_devices),
  # two unrolled steps per call no longer pay for their longer compile (benchmarks/RESULTS.md).
  config.training.steps_per_call = 1
  config.training.num_train_steps = 1500
  config.training.eval_every_steps = 1500
  config.training.sample_every_steps = 500
  config.training.checkpoint_every_steps = 500

  config.sample.sampler = 'heun'
  config.sample.steps = 18             # 35 network calls per sample (DDIM in digits.py: 100).
  return config
