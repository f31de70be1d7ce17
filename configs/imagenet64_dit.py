"""Class-conditional ImageNet 64x64 with a pixel-space DiT-B/4 trained by flow matching with
x-prediction (JiT: Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise").

  tfds build imagenet_resized/64x64 --data_dir=gs://bucket/tensorflow_datasets \\
      --file_format=array_record            # once, where the hosts can read it
  python main.py --config=configs/imagenet64_dit.py --workdir=gs://bucket/imagenet64_dit \\
      --config.data.data_dir=gs://bucket/tensorflow_datasets
  python main.py --config=configs/imagenet64_dit.py --workdir=gs://bucket/imagenet64_dit \\
      --mode=eval --config.eval.metrics="('fid',)" --config.eval.num_samples=50000

Choices:
- Network: DiT-B (hidden 768, 12 blocks, 12 heads, MLP ratio 4; 130M parameters) on RGB pixels
  in 4x4 patches: 64x64 -> 16x16 = 256 tokens, the token count of DiT-XL/2 on 32x32 latents.
  Each token carries 48 pixel values, fewer than its width 768, so nothing is bottlenecked; JiT
  shows that with larger patches (16x16x3 = 768 values per token at 256 px) the network should
  predict the clean image rather than the noise or velocity, which lies off the data manifold.
  For DiT-L/4 set model.dit.hidden_size=1024, depth=24, num_heads=16 (dit.DIT_SIZES).
- Objective: diffusion.objective='flow_matching' with flow_matching.prediction='x0' (JiT's x-prediction,
  trained with the velocity loss, the 1/t^2 weight clamped at t = 0.05). Times are logit-normal
  with mean 0.8 and std 0.8: JiT's (-0.8, 0.8) in its convention where t = 1 is clean data,
  mirrored to ours (t = 1 is noise), so training concentrates on the noisier half.
- Precision and memory: bfloat16 compute (float32 parameters, LayerNorm statistics, softmax and
  optimizer state), remat per block. Mesh: FSDP over every device (mesh.data = 1, mesh.fsdp =
  -1: weights, EMA and Adam moments split over all chips, the batch too); on multi-host pods
  `--config.mesh.data=-1 --config.mesh.fsdp=8` shards within each 8-chip host and is data
  parallel across hosts. 130M parameters need 2.2 GB of state (parameters, Adam, EMA): 64 MiB
  per chip at fsdp=32, and the train step peaks at 3.8 GiB of a v5p chip's 95 GiB
  (`--mode=compile`, libtpu 0.0.42.1, benchmarks/RESULTS.md); fsdp=8 holds 4x that state per
  chip (~0.27 GB), far inside too.
- Optimisation: AdamW (no weight decay), lr 2e-4 after 5k warm-up steps, beta2 0.95 as JiT,
  batch 1024, gradient clipping 1, EMA 0.9999; 400k steps (~320 epochs of the 1.28M images).
  Labels are dropped with probability 0.1 for classifier-free guidance; samples use 50 Heun
  steps (99 network calls) at guidance 1.5.

Published comparison point: FID 2.07 (50k samples vs the training set) of ADM, the
class-conditional U-Net of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs"), on ImageNet
64x64 with 250 sampling steps. Untuned here: no result of this config is claimed.

Target pod: v5p-64 (32 chips, batch 1024 = 32 images per chip).
`--mode=compile` compiles it for that pod on any machine and reports per-chip memory, FLOPs
and collectives (benchmarks/compile_pods.py; figures in benchmarks/RESULTS.md).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'imagenet_resized/64x64'
  config.data.split = 'train'
  config.data.eval_split = 'validation'
  config.data.label_key = 'label'
  config.data.resolution = 64
  config.data.channels = 3
  config.data.random_flip = True

  config.model.arch = 'dit'
  config.model.dit.hidden_size = 768   # DiT-B ...
  config.model.dit.depth = 12
  config.model.dit.num_heads = 12
  config.model.dit.mlp_ratio = 4.0
  config.model.dit.patch_size = 4      # ... /4: 256 tokens of 4x4x3 pixels.
  config.model.dit.pos_embed = 'sincos'
  config.model.num_classes = 1000      # + the null class (classifier-free guidance).
  config.model.dit.dropout = 0.0
  config.model.learn_sigma = False
  config.model.dtype = 'bfloat16'
  config.model.param_dtype = 'float32'
  config.model.remat = True

  config.diffusion.objective = 'flow_matching'
  config.diffusion.flow_matching.prediction = 'x0'
  config.diffusion.flow_matching.x0_min_t = 0.05
  config.diffusion.flow_matching.time_dist = 'logit_normal'
  config.diffusion.flow_matching.logit_mean = 0.8
  config.diffusion.flow_matching.logit_std = 0.8
  config.diffusion.flow_matching.time_shift = 1.0

  config.optim.optimizer = 'adamw'
  config.optim.weight_decay = 0.0
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.b2 = 0.95
  config.optim.grad_clip = 1.0
  config.optim.ema_decay = 0.9999

  config.training.batch_size = 1024
  config.training.num_train_steps = 400_000
  config.training.cond_drop_prob = 0.1
  config.training.log_every_steps = 100
  config.training.sample_every_steps = 10_000
  config.training.checkpoint_every_steps = 5_000
  config.training.num_grid_samples = 128
  config.training.eval_every_steps = 50_000
  config.eval.train_metrics = ('fid',)
  config.eval.train_num_samples = 10_000
  config.eval.metrics = ('fid',)
  config.eval.num_samples = 50_000
  config.eval.feature_batch_size = 256  # Inception batch: a multiple of up to 256 chips.

  config.sample.sampler = 'heun'
  config.sample.steps = 50
  config.sample.guidance_scale = 1.5
  config.sample.num_samples = 50_000
  config.sample.batch_size = 1024

  config.mesh.data = 1                 # Every device on the fsdp axis (any device count); on
  config.mesh.fsdp = -1                # hosts of 8 chips, --config.mesh.data=-1
                                       # --config.mesh.fsdp=8 keeps each shard group in a host.
  config.compile.topology = 'v5p-64'  # The target pod of the docstring.
  return config
