"""DDPM on CelebA at 64x64: a centered 140x140 crop of the 178x218 faces, resized to 64.

  python main.py --config=configs/celeba64.py --workdir=gs://bucket/celeba64 \\
      --config.data.data_dir=gs://bucket/tensorflow_datasets

Prepare the data once as ArrayRecord so that resuming costs nothing:
`tfds build celeb_a --data_dir=gs://bucket/tensorflow_datasets --file_format=array_record`.

ch 128, ch_mult (1, 2, 2, 2, 4), attention at 16x16, dropout 0.1, batch 128, 500k steps.

Target pod: v5e-8 (batch 128 = 16 images per chip).
`--mode=compile` compiles it for that pod on any machine and reports per-chip memory, FLOPs
and collectives (benchmarks/compile_pods.py; figures in benchmarks/RESULTS.md).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'celeb_a'
  config.data.resolution = 64
  config.data.center_crop = 140  # The common CelebA 64x64 crop (faces fill the square).
  config.model.unet.ch_mult = (1, 2, 2, 2, 4)
  config.model.unet.attn_resolutions = (16,)
  config.training.num_train_steps = 500_000
  config.sample.steps = 100
  config.compile.topology = 'v5e-8'  # The target pod of the docstring.
  return config
