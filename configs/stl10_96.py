"""DDPM on STL-10 unlabelled images at 96x96 (the 96x96 case: 96 = 3 * 2^5).

  python main.py --config=configs/stl10_96.py --workdir=gs://bucket/stl10_96 \\
      --config.data.data_dir=gs://bucket/tensorflow_datasets

ch 128, ch_mult (1, 2, 2, 2, 4) -> feature maps 96, 48, 24, 12, 6; attention at 24 and 12,
AdaGN scale-shift, 2 heads of 64 channels; bf16 compute.

Target pod: v5e-8 (batch 64 = 8 images per chip).
`--mode=compile` compiles it for that pod on any machine and reports per-chip memory, FLOPs
and collectives (benchmarks/compile_pods.py; figures in benchmarks/RESULTS.md).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'stl10'
  config.data.split = 'unlabelled'
  config.data.eval_split = 'test'
  config.data.resolution = 96
  config.model.unet.ch_mult = (1, 2, 2, 2, 4)
  config.model.unet.attn_resolutions = (24, 12)
  config.model.unet.num_head_channels = 64
  config.model.unet.use_scale_shift_norm = True
  config.model.unet.resblock_updown = True
  config.model.dtype = 'bfloat16'
  config.training.batch_size = 64
  config.training.num_train_steps = 500_000
  config.sample.steps = 100
  config.compile.topology = 'v5e-8'  # The target pod of the docstring.
  return config
