"""ADM-G on ImageNet 128x128: guided-diffusion's class-conditional 128x128 diffusion model guided
by its noisy classifier (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis"), sampled from imported weights with the README's settings.

Published figure: FID 2.97 (ADM-G, 250 sampling steps, 50,000 samples against the ImageNet
training set; the paper's abstract). Its abstract also says guidance matches BigGAN-deep with as
few as 25 forward passes per sample (the `:ddim25` variant below); no figure of that is claimed
here.

Reproduce (on a GPU/TPU host with the checkpoints in models/; NOT run here: this repository was
built on CPU only, without network access, so neither the download nor the FID was done):

  MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 \\
    --image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 \\
    --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True \\
    --use_scale_shift_norm True"
  python -m diffusion_jax.convert --from=openai --source=models/128x128_diffusion.pt \\
      --workdir=runs/adm_g_imagenet128 --config=configs/adm_g_imagenet128.py \\
      --model_flags="$MODEL_FLAGS" --diffusion_flags="--timestep_respacing 250"
  python -m diffusion_jax.convert --from=openai_classifier --source=models/128x128_classifier.pt \\
      --workdir=runs/adm_g_imagenet128_classifier \\
      --classifier_flags="--image_size 128 --classifier_scale 0.5"
  python main.py --config=configs/adm_g_imagenet128.py --workdir=runs/adm_g_imagenet128 \\
      --mode=sample
  python -m diffusion_jax.fid runs/adm_g_imagenet128/samples/<tag>/samples.npz \\
      VIRTUAL_imagenet128_labeled.npz     # guided-diffusion's reference batch (evaluations/)

25-step DDIM (the README's "sampling from a 128x128 classifier-guided model, 25 step DDIM",
whose CLASSIFIER_FLAGS carry --classifier_scale 1.0): convert the diffusion model with
`--config=configs/adm_g_imagenet128.py:ddim25 --diffusion_flags="--timestep_respacing ddim25
--use_ddim True"` into another workdir and sample with the same `:ddim25` config.

The `--config` of the diffusion model's convert puts this file's sampling fields (the
classifier's run, its scale, 50,000 samples) into the run's config.json; its model / diffusion
/ sampler fields are exactly what `convert --from=openai` writes for MODEL_FLAGS and the
respacing (tests/test_classifier_import.py checks the two agree field by field).
guided-diffusion's evaluations/evaluator.py, run on the same samples.npz (arr_0 uint8 NHWC,
their format), is the paper's own measurement; our fid compares our Inception features of the
samples with the reference batch's precomputed statistics.

Settings (README, classifier_sample.py): classifier scale 0.5, the default classifier (width
128, depth 2, attention pooling, attention at 32/16/8), 250 respaced ancestral steps with the
learned variance (sample.variance='learned_range'), x0 clipped, 50,000 samples. Labels:
classifier_sample.py draws them uniformly at random over the 1000 classes; our
sample.class_labels='' cycles through them instead (exactly 50 per class). The converted
network runs in float32 (their --use_fp16 only casts the torso at run time).
"""

import ml_collections

from configs import adm_g_imagenet64

MODEL_FLAGS = ('--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 '
               '--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 '
               '--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True '
               '--use_scale_shift_norm True')
CLASSIFIER_FLAGS = '--image_size 128 --classifier_scale 0.5'
VARIANTS = ('ddim25',)


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  options = adm_g_imagenet64.parse_variant(variant, VARIANTS)
  ddim25 = 'ddim25' in options
  return adm_g_imagenet64.adm_g(
      128, ch=256, ch_mult=(1, 1, 2, 3, 4), num_res_blocks=2, num_heads=4, num_head_channels=-1,
      dropout=0.0, noise_schedule='linear', class_cond=True,
      classifier_scale=1.0 if ddim25 else 0.5, batch_size=256, ddim25=ddim25,
      dataset='imagenet2012')
