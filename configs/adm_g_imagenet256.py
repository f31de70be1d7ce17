"""ADM-G on ImageNet 256x256: guided-diffusion's 256x256 diffusion model guided by its noisy
classifier (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"), sampled
from imported weights with the README's settings; `:uncond` is their unconditional 256x256
model guided at scale 10.

Published figure: FID 4.59 (ADM-G, 250 sampling steps, 50,000 samples; the paper's abstract,
which also gives 7.72 at 512x512 and, with their upsampler, 3.94 at 256x256). No figure of the
unconditional model's guided samples or of 25 DDIM steps is claimed here.

Reproduce (on a GPU/TPU host with the checkpoints in models/; NOT run here: this repository was
built on CPU only, without network access, so neither the download nor the FID was done):

  MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 \\
    --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 \\
    --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True \\
    --use_scale_shift_norm True"
  python -m diffusion_jax.convert --from=openai --source=models/256x256_diffusion.pt \\
      --workdir=runs/adm_g_imagenet256 --config=configs/adm_g_imagenet256.py \\
      --model_flags="$MODEL_FLAGS" --diffusion_flags="--timestep_respacing 250"
  python -m diffusion_jax.convert --from=openai_classifier --source=models/256x256_classifier.pt \\
      --workdir=runs/adm_g_imagenet256_classifier \\
      --classifier_flags="--image_size 256 --classifier_scale 1.0"
  python main.py --config=configs/adm_g_imagenet256.py --workdir=runs/adm_g_imagenet256 \\
      --mode=sample
  python -m diffusion_jax.fid runs/adm_g_imagenet256/samples/<tag>/samples.npz \\
      VIRTUAL_imagenet256_labeled.npz     # guided-diffusion's reference batch (evaluations/)

Unconditional model, classifier scale 10 (the README's `256x256_diffusion_uncond.pt` line):
the same commands with `--class_cond False` in MODEL_FLAGS, `--source=models/
256x256_diffusion_uncond.pt`, another --workdir and `--config=configs/adm_g_imagenet256.py:uncond`
(model.num_classes=0, sample.classifier_scale=10.0; the labels guidance steers towards cycle
through the classifier's 1000 classes). 25-step DDIM: the option `ddim25` (also
`:uncond,ddim25`) with `--diffusion_flags="--timestep_respacing ddim25 --use_ddim True"`; the
README gives 25-step flags at 128x128 only, so the 250-step scale is kept.

The `--config` of the diffusion model's convert puts this file's sampling fields (the
classifier's run, its scale, 50,000 samples) into the run's config.json; its model / diffusion
/ sampler fields are exactly what `convert --from=openai` writes for MODEL_FLAGS and the
respacing (tests/test_classifier_import.py checks the two agree field by field).
guided-diffusion's evaluations/evaluator.py, run on the same samples.npz (arr_0 uint8 NHWC,
their format), is the paper's own measurement; our fid compares our Inception features of the
samples with the reference batch's precomputed statistics.

Settings (README, classifier_sample.py): classifier scale 1.0 (10.0 unconditional), the default
classifier (width 128, depth 2, attention pooling), 250 respaced ancestral steps with the
learned variance (sample.variance='learned_range'), x0 clipped, 50,000 samples. Labels:
classifier_sample.py draws them uniformly at random over the 1000 classes; our
sample.class_labels='' cycles through them instead (exactly 50 per class). The converted
network runs in float32 (their --use_fp16 only casts the torso at run time).
"""

import ml_collections

from configs import adm_g_imagenet64

MODEL_FLAGS = ('--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 '
               '--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 '
               '--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True '
               '--use_scale_shift_norm True')
UNCOND_MODEL_FLAGS = MODEL_FLAGS.replace('--class_cond True', '--class_cond False')
CLASSIFIER_FLAGS = '--image_size 256 --classifier_scale 1.0'
VARIANTS = ('ddim25', 'uncond')


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  options = adm_g_imagenet64.parse_variant(variant, VARIANTS)
  uncond = 'uncond' in options
  return adm_g_imagenet64.adm_g(
      256, ch=256, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, num_heads=4,
      num_head_channels=64, dropout=0.0, noise_schedule='linear', class_cond=not uncond,
      classifier_scale=10.0 if uncond else 1.0, batch_size=256, ddim25='ddim25' in options,
      dataset='imagenet2012')
