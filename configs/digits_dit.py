"""The CPU demo with a DiT backbone: a small Diffusion Transformer (Peebles & Xie 2023;
model.arch = 'dit') trained by flow matching on the 8x8 digits of configs/digits.py.

  python main.py --config=configs/digits_dit.py --workdir=runs/digits_dit
  python main.py --config=configs/digits_dit.py --workdir=runs/digits_dit --mode=sample

8x8 digits in 2x2 patches are 16 tokens of width 128; 6 adaLN-Zero blocks with 4 heads (1.86M
parameters, 8.2 GFLOP per train step of 64 images against the U-Net's 5.1). Same data, batch,
step count, EMA and in-training eval (classifier_fd on 512 EMA samples at step 3000) as the
U-Net demo; the objective and sampler are those of configs/digits_flow.py (rectified flow,
logit-normal t, Heun on 50 steps = 99 network calls against DDIM's 100).

Measured on the 2-core CPU (2026-12-03, two runs side by side, then alone): classifier_fd 2.97
at step 3000, against 3.15 for the U-Net demo (configs/digits.py). A step takes 180 ms against
the U-Net's 97 ms on an idle machine (benchmarks/train_throughput.py, batch 64), so the run
takes about twice the U-Net demo's time (~10 min). Recipes tried at the same 3000 steps:
  - DDPM objective (epsilon, DDIM 100), Adam 5e-4, warm-up 200: 27.4 (step 2000)
  - DDPM objective, Adam 1e-3, warm-up 100: 10.1
  - flow matching, Adam 1e-3, warm-up 100: 3.60
  - flow matching, Adam 2e-3, warm-up 200 (this config): 2.97
  - flow matching, 96 wide x 4 deep (74 ms a step), Adam 1e-3, 5000 steps: 3.36
"""

from configs import digits_flow


def get_config():
  config = digits_flow.get_config()
  config.model.arch = 'dit'
  config.model.dit.hidden_size = 128
  config.model.dit.depth = 6
  config.model.dit.num_heads = 4
  config.model.dit.mlp_ratio = 4.0
  config.model.dit.patch_size = 2       # 8x8 -> 4x4 = 16 tokens.
  config.model.dit.pos_embed = 'sincos'
  config.model.dit.dropout = 0.0
  # The adaLN-Zero gates start at 0, so the transformer wants a larger step than the U-Net's
  # 1e-3 to get going in 3000 steps; the longer warm-up keeps the first updates stable.
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 200
  # The 3000 steps and Heun-50 eval of the measurements above (digits_flow.py is shorter).
  config.training.num_train_steps = 3000
  config.training.eval_every_steps = 3000
  config.training.sample_every_steps = 1000
  config.training.checkpoint_every_steps = 1000
  config.sample.steps = 50
  return config
