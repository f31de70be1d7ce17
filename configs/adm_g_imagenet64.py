"""ADM-G on ImageNet 64x64: guided-diffusion's class-conditional 64x64 diffusion model guided by
its noisy classifier (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"),
sampled from imported weights with the README's settings.

Published figures: the paper's abstract gives no classifier-guided 64x64 FID (its guided figures
are 2.97 at 128x128, 4.59 at 256x256 and 7.72 at 512x512, 250 steps); none is claimed here.
(guided-diffusion's README results table lists 2.07 for ImageNet 64x64; which sampling setting
that row is, is not verified here.)

Reproduce (on a GPU/TPU host with the checkpoints in models/; NOT run here: this repository was
built on CPU only, without network access, so neither the download nor the FID was done):

  MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 \\
    --dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine \\
    --num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True \\
    --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
  python -m diffusion_jax.convert --from=openai --source=models/64x64_diffusion.pt \\
      --workdir=runs/adm_g_imagenet64 --config=configs/adm_g_imagenet64.py \\
      --model_flags="$MODEL_FLAGS" --diffusion_flags="--timestep_respacing 250"
  python -m diffusion_jax.convert --from=openai_classifier --source=models/64x64_classifier.pt \\
      --workdir=runs/adm_g_imagenet64_classifier \\
      --classifier_flags="--image_size 64 --classifier_scale 1.0 --classifier_depth 4" \\
      --diffusion_flags="--diffusion_steps 1000 --noise_schedule cosine"
  python main.py --config=configs/adm_g_imagenet64.py --workdir=runs/adm_g_imagenet64 \\
      --mode=sample
  python -m diffusion_jax.fid runs/adm_g_imagenet64/samples/<tag>/samples.npz \\
      VIRTUAL_imagenet64_labeled.npz      # guided-diffusion's reference batch (evaluations/)

The `--config` of the diffusion model's convert puts this file's sampling fields (the
classifier's run, its scale, 50,000 samples) into the run's config.json; its model / diffusion
/ sampler fields are exactly what `convert --from=openai` writes for MODEL_FLAGS and
`--timestep_respacing 250` (tests/test_classifier_import.py checks the two agree field by
field), so `--mode=sample` with or without `--config` samples the same. The classifier's
DIFFUSION_FLAGS must give the diffusion model's schedule (here cosine): guidance refuses a
classifier trained on another. guided-diffusion's evaluations/evaluator.py, run on the same
samples.npz (arr_0 uint8 NHWC, their format), is the paper's own measurement; our fid compares
our Inception features of the samples with the reference batch's precomputed statistics.

Settings (README, classifier_sample.py): classifier scale 1.0 with the depth-4 classifier,
250 respaced ancestral steps (`--timestep_respacing 250`, the learned variance:
sample.variance='learned_range'), x0 clipped, 50,000 samples. Labels: classifier_sample.py
draws them uniformly at random over the 1000 classes; our sample.class_labels='' cycles through
them instead (exactly 50 per class in 50,000 samples). `configs/adm_g_imagenet64.py:ddim25` is
the README's 25-step DDIM variant (`--timestep_respacing ddim25 --use_ddim True` in its
convert); the README gives its 25-step flags at 128x128 only, so the 250-step scale is kept.
The converted network runs in float32 (their --use_fp16 casts the torso to float16 at run
time; the weights are float32).
"""

from typing import Optional, Sequence

import ml_collections

from configs import default

MODEL_FLAGS = ('--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 '
               '--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine '
               '--num_channels 192 --num_head_channels 64 --num_res_blocks 3 '
               '--resblock_updown True --use_new_attention_order True --use_fp16 True '
               '--use_scale_shift_norm True')
CLASSIFIER_FLAGS = '--image_size 64 --classifier_scale 1.0 --classifier_depth 4'
NUM_CLASSES = 1000
NUM_SAMPLES = 50_000
VARIANTS = ('ddim25',)


def parse_variant(variant: str, known: Sequence[str]) -> set:
  """The comma-separated options of `configs/adm_g_*.py:OPTIONS`; an unknown one is an error."""
  options = {v.strip() for v in (variant or '').split(',') if v.strip()}
  unknown = sorted(options - set(known))
  if unknown:
    raise ValueError(f'config options {unknown} are unknown; use any of {tuple(known)} '
                     '(e.g. configs/adm_g_imagenet128.py:ddim25).')
  return options


def adm_g(resolution: int, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
          num_heads: int, num_head_channels: int, dropout: float, noise_schedule: str,
          class_cond: bool, classifier_scale: float, batch_size: int, ddim25: bool,
          dataset: str, name: Optional[str] = None) -> ml_collections.ConfigDict:
  """The ADM-G sampling config at `resolution`: the model / diffusion / sampler fields that
  `convert --from=openai` writes for guided-diffusion's MODEL_FLAGS (attention at 32, 16, 8;
  scale-shift norm; resblock up/down; learned sigma; 1000 steps, respaced to 250 or ddim25),
  plus the classifier guidance and sample-count fields."""
  config = default.get_config()
  name = name or f'adm_g_imagenet{resolution}'
  d = config.data
  d.dataset, d.split, d.eval_split, d.label_key = dataset, 'train', 'validation', 'label'
  d.resolution, d.channels, d.random_flip = resolution, 3, False

  m, u = config.model, config.model.unet
  m.arch = 'unet'
  u.ch, u.ch_mult, u.num_res_blocks = ch, tuple(ch_mult), num_res_blocks
  u.attn_resolutions = (32, 16, 8)
  u.num_heads, u.num_head_channels = num_heads, num_head_channels
  u.dropout = dropout
  u.resblock_updown, u.use_scale_shift_norm = True, True
  u.num_groups, u.norm_eps, u.downsample_padding = 32, 1e-5, 1
  m.num_classes = NUM_CLASSES if class_cond else 0
  m.null_class = False            # Their label embedding has no null row: no CFG.
  m.learn_sigma = True
  m.flip_sin_to_cos, m.freq_shift, m.timestep_scale = True, 0, 1.0  # No rescale_timesteps.

  config.diffusion.objective = 'ddpm'
  p = config.diffusion.ddpm
  p.num_timesteps = 1000
  if noise_schedule == 'linear':
    p.beta_schedule, p.beta_start, p.beta_end = 'linear', 0.0001, 0.02
  else:
    p.beta_schedule = 'cosine'
  p.prediction_type, p.loss_weighting = 'epsilon', 'simple'
  p.vlb_weight = 1.0 / 1000       # Their hybrid loss, rescale_learned_sigmas=False.

  s = config.sample
  s.sampler = 'ddim' if ddim25 else 'ddpm'
  s.steps = 1000
  s.spacing = 'ddim25' if ddim25 else '250'  # Their --timestep_respacing.
  s.eta = 0.0
  s.clip_denoised, s.thresholding = True, 'static'
  s.use_clipped_model_output, s.set_alpha_to_one = True, True
  s.variance = 'learned_range'
  config.eval.variance = 'fixed_large'
  s.classifier_scale = classifier_scale
  s.classifier_workdir = f'runs/{name}_classifier'  # The docstring's classifier convert.
  s.classifier_use_ema = True
  s.class_labels = ''             # Cycles through the 1000 classes (theirs: uniform draws).
  s.num_samples = NUM_SAMPLES
  s.batch_size = batch_size
  config.eval.metrics = ('fid',)
  config.eval.num_samples = NUM_SAMPLES
  config.eval.feature_batch_size = 256  # Inception batch: a multiple of up to 256 chips.
  return config


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  options = parse_variant(variant, VARIANTS)
  return adm_g(64, ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, num_heads=4,
               num_head_channels=64, dropout=0.1, noise_schedule='cosine', class_cond=True,
               classifier_scale=1.0, batch_size=256, ddim25='ddim25' in options,
               dataset='imagenet_resized/64x64')
