"""Sample-quality metrics (FID, KID, precision/recall, IS, classifier_fd) of a run's samples
against a cached reference, for `--mode=eval` and the in-training eval.

One `SampleMetricsEvaluator` holds what does not change between evaluations (feature networks,
reference statistics, the compiled sampler); --mode=eval calls it once, and training calls it
every `training.eval_every_steps` through `TrainingEvaluator`, which also keeps the best
checkpoint (`<workdir>/checkpoints_best`, `<workdir>/eval/best.json`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np
import tqdm
from clu import metric_writers
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import images
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import checks, classifier_fd, feature_sets, inception
from diffusion_jax.evaluation import metrics as metrics_lib
from diffusion_jax.evaluation.writers import read_best, write_sample_results
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import multihost, sharding
from diffusion_jax.pipelines import sampler
from diffusion_jax.sampling import class_labels
from diffusion_jax.training import checkpoints, restore

PyTree = Any


def make_sample_drawer(config, mesh: Mesh
                       ) -> Callable[[PyTree, int], Iterator[Tuple[np.ndarray, np.ndarray]]]:
  """Builds the sampler once; returns `draw(params, num_samples)` yielding (uint8 [b, H, W, C],
  labels [b]) batches of `num_samples` samples in total.

  config.sample's sampler and settings; batch b is keyed fold_in(PRNGKey(sample.seed), b) and
  labelled by sample index like --mode=sample, so the two draw the same images. The jitted
  sampler is compiled at the first call and reused by every later one (training evaluates
  many times with one drawer).
  """
  scfg = config.sample
  classifier = restore.restore_guidance_classifier(config, mesh)  # sample.classifier_scale.
  num_classes = sampler.label_classes(config, classifier)
  try:
    wanted = class_labels.parse_class_labels(scfg.class_labels, num_classes)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  model = backbones.create_model(config.model, config.data.channels)
  sample_fn = sampler.make_sample_fn(model, config, mesh, scfg.batch_size,
                                     classifier=classifier)

  def draw(params: PyTree, num_samples: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    rng = jax.random.PRNGKey(scfg.seed)
    for b in range(math.ceil(num_samples / scfg.batch_size)):
      indices = b * scfg.batch_size + np.arange(scfg.batch_size)
      labels = class_labels.labels_for(indices, wanted, num_classes)
      x = multihost.to_host(sample_fn(params, jax.random.fold_in(rng, b), labels))
      keep = indices < num_samples
      yield images.to_uint8(x[keep]), labels[keep]
  return draw


def _progress(iterable, total: Optional[int], desc: str, enabled: bool):
  """`iterable` with a tqdm bar (counting images) on process 0 when `enabled`."""
  return tqdm.tqdm(iterable, total=total, desc=desc, unit='img', unit_scale=False,
                   disable=not enabled or jax.process_index() != 0)


def _counted(batches: Iterable[Any], bar) -> Iterator[Any]:
  """Passes `batches` (arrays, or tuples whose first item is the images) on, advancing `bar`
  by the number of images of each."""
  with bar:
    for batch in batches:
      bar.update(len(batch[0] if isinstance(batch, tuple) else batch))
      yield batch


def _dataset_batches(config, split: str, batch_size: int, limit: int, mesh: Mesh
                     ) -> Iterator[np.ndarray]:
  """uint8 images of `split` (the masked padding dropped), at most `limit` (-1: all)."""
  dataset = pipeline.create_dataset(
      config.data, batch_size // jax.process_count(), split=split, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), train=False)
  seen = 0
  for batch in pipeline.global_batches(dataset, sharding.batch_sharding(mesh)):
    mask = multihost.to_host(batch['mask']) > 0
    x = images.to_uint8(multihost.to_host(batch['image'])[mask])
    if limit > 0:
      x = x[:limit - seen]
    seen += len(x)
    yield x
    if 0 < limit <= seen:
      return


def dataset_source_id(data_config) -> str:
  """The dataset part of a reference cache key: the tfds name, 'digits', or for
  data.dataset='folder' 'folder-<sha1 of the folder's absolute path, 12 hex>' so two folders
  never share a cache file."""
  if data_config.dataset != 'folder':
    return data_config.dataset
  folder = str(data_config.folder)
  if '://' not in folder:
    folder = os.path.abspath(os.path.expanduser(folder))
  return 'folder-' + hashlib.sha1(folder.rstrip('/').encode()).hexdigest()[:12]


def folder_fingerprint(folder: str) -> str:
  """sha256 of the sorted (relative path, size) of a folder's images: which files the
  reference of data.dataset='folder' read, so added, removed, renamed or resized files make
  another cache file (a file rewritten to the same size is not seen). One listing and one stat
  per image, once per evaluator."""
  root = epath.Path(folder)
  digest = hashlib.sha256()
  for path in feature_sets.folder_images(folder):
    digest.update(f'{path.relative_to(root)}\0{path.stat().length}\n'.encode())
  return digest.hexdigest()


# Bumped when what a reference cache file holds changes meaning (v2: reservoir-kept rows).
REFERENCE_CACHE_VERSION = 2


def reference_cache_key(config, checksum: str) -> Dict[str, Any]:
  """Everything data.split's reference features depend on, as the cache is keyed
  (feature_sets.reference_stats_path): the images (dataset identity, data_dir, split,
  resolution, center_crop, channels, image_key, how many), how they are resized for Inception,
  and the full sha256 of the Inception weights."""
  dcfg, ecfg = config.data, config.eval
  key = {'version': REFERENCE_CACHE_VERSION, 'dataset': dataset_source_id(dcfg),
         'data_dir': str(dcfg.data_dir or ''), 'split': str(dcfg.split),
         'resolution': int(dcfg.resolution), 'center_crop': int(dcfg.center_crop),
         'channels': int(dcfg.channels), 'image_key': str(dcfg.image_key),
         'reference_num_images': int(ecfg.reference_num_images), 'resize': str(ecfg.fid_resize),
         'inception_sha256': str(checksum)}
  if dcfg.dataset == 'folder':
    key['folder_files'] = folder_fingerprint(str(dcfg.folder))
  return key


def reference_features(config, workdir: str, feature_fn: feature_sets.FeatureFn, checksum: str,
                       keep: int, mesh: Mesh, progress: bool = False
                       ) -> Tuple[feature_sets.FeatureSet, str]:
  """(features of eval.reference, its description); data.split's are cached in fid_stats_dir
  under `reference_cache_key` and read from there by every later evaluation with that key.

  A cache file is used when its stored key is the one asked for and it kept enough rows; rows
  are kept with eval.seed (the seed is stored, and reported with KID and precision/recall).
  """
  ecfg = config.eval
  if ecfg.reference:
    return (feature_sets.features_of_source(ecfg.reference, feature_fn, ecfg.feature_batch_size,
                                            keep, False, keep_seed=ecfg.seed), ecfg.reference)
  key = reference_cache_key(config, checksum)
  path = feature_sets.reference_stats_path(feature_sets.stats_dir(config, workdir), key)
  key_json = feature_sets.cache_key_json(key)
  if epath.Path(path).exists():
    stored = feature_sets.read_stats_info(path, 'cache_key')
    cached = feature_sets.load_stats_file(path) if stored == key_json else None
    if cached is None:
      logging.warning('%s was written for another reference (%s, not %s): computing it again.',
                      path, stored, key_json)
    elif keep == 0 or (cached.features is not None and len(cached.features) >= min(
        keep, cached.num_images)):
      logging.info('Reference statistics from %s', path)
      return cached, path
  logging.info('Computing the reference statistics of %s/%s into %s', config.data.dataset,
               config.data.split, path)
  limit = ecfg.reference_num_images
  batches = _counted(_dataset_batches(config, config.data.split, ecfg.feature_batch_size,
                                      limit, mesh),
                     _progress(None, limit if limit > 0 else None,
                               f'reference {config.data.dataset}/{config.data.split}',
                               progress))
  features = feature_sets.extract_features(batches, feature_fn, ecfg.feature_batch_size,
                                           max(keep, ecfg.num_kept_features),
                                           keep_seed=ecfg.seed)
  if jax.process_index() == 0:
    feature_sets.save_feature_set(path, features, cache_key=key_json,
                                  dataset=config.data.dataset, split=config.data.split,
                                  resize=ecfg.fid_resize, sha256=checksum)
  return features, path


# The figures a sample metric writes, and (first) the one the in-training eval ranks by.
METRIC_FIGURES = {'fid': ('fid',), 'kid': ('kid', 'kid_std'),
                  'precision_recall': ('precision', 'recall'), 'is': ('is', 'is_std'),
                  'classifier_fd': ('classifier_fd',)}


class SampleMetricsEvaluator:
  """The sample metrics `metrics` of one run, with everything fixed built once.

  Construction loads the feature networks (Inception, the digits classifier), computes or
  reads the cached reference statistics and, when `draw_samples`, builds the sampler; each
  call then only samples and scores. --mode=eval builds one and calls it once; training
  builds one before its loop and calls it every training.eval_every_steps.
  """

  def __init__(self, config, workdir: str, mesh: Mesh, metrics: Sequence[str],
               num_samples: int, *, draw_samples: bool = True, progress: bool = False):
    ecfg = config.eval
    self.config, self.num_samples, self.progress = config, num_samples, progress
    self.wanted = [m for m in metrics if m in checks.SAMPLE_METRICS]
    self.inception_metrics = [m for m in self.wanted if m in checks.INCEPTION_METRICS]
    self.keep = ecfg.num_kept_features if any(
        m in self.wanted for m in metrics_lib.ROW_METRICS) else 0
    self.want_logits = 'is' in self.wanted
    self.feature_fn, self.checksum, self.weights_path = None, '', ''
    self.reference, self.reference_name = None, ''
    if self.inception_metrics:
      inc_params, num_logits, self.weights_path, self.checksum = inception.load_inception(
          ecfg.inception_path)
      if self.want_logits and not num_logits:
        raise ConfigError(f"eval.metrics has 'is', but the Inception weights "
                          f'{self.weights_path} have no 1008-way classifier (fc.weight); set '
                          "eval.inception_path to weights that do, or drop 'is'.")
      if not inception.is_known_weights(self.checksum):
        logging.warning('Inception weights %s (sha256 %s) are not a known file: figures may '
                        'not be comparable with published ones.', self.weights_path,
                        self.checksum)
      self.feature_fn = inception.make_feature_fn(inc_params, num_logits, ecfg.fid_resize, mesh)
      self.reference, self.reference_name = reference_features(
          config, workdir, self.feature_fn, self.checksum, self.keep, mesh, progress)
    self.scorer = None
    if 'classifier_fd' in self.wanted:
      self.scorer = classifier_fd.Scorer(
          str(epath.Path(feature_sets.stats_dir(config, workdir))
              / f'classifier_{config.data.dataset}.npz'), config.data.dataset)
    self.draw = make_sample_drawer(config, mesh) if draw_samples else None

  def __call__(self, params: PyTree, step: int) -> Dict[str, Dict[str, Any]]:
    """Draws `num_samples` samples with `params` and scores them."""
    scfg = self.config.sample
    source = f'{scfg.sampler}/{scfg.steps} steps, seed {scfg.seed}'
    return self.score(self.draw(params, self.num_samples), step, source, self.num_samples)

  def score(self, batches: Iterable[Tuple[np.ndarray, Optional[np.ndarray]]], step: int,
            source: str, total: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """The figures of every wanted metric, by metric name, for (uint8 images, labels or None)
    batches; `source` describes them in the results."""
    ecfg = self.config.eval
    kept_samples, kept_labels = [], []

    def image_stream():
      for x, labels in _counted(batches, _progress(None, total, 'samples -> features',
                                                   self.progress)):
        if self.scorer is not None:
          kept_samples.append(x)
          kept_labels.append(labels)
        yield x

    results: Dict[str, Dict[str, Any]] = {}
    common = {'step': int(step), 'samples': source}
    if self.inception_metrics:
      generated = feature_sets.extract_features(image_stream(), self.feature_fn,
                                                ecfg.feature_batch_size, self.keep,
                                                self.want_logits, keep_seed=ecfg.seed)
      figures = feature_sets.compare(generated, self.reference, self.inception_metrics,
                                     kid_subset_size=ecfg.kid_subset_size,
                                     kid_num_subsets=ecfg.kid_num_subsets, pr_k=ecfg.pr_k,
                                     is_splits=ecfg.is_splits, seed=ecfg.seed)
      info = {**common, 'num_samples': generated.num_images, 'reference': self.reference_name,
              'num_reference': self.reference.num_images, 'resize': ecfg.fid_resize,
              'inception_weights': self.weights_path, 'inception_sha256': self.checksum}
      for metric in self.inception_metrics:
        results[metric] = {k: figures[k] for k in METRIC_FIGURES[metric]} | info
      kept = {'samples': feature_sets.kept_info(generated),
              'reference': feature_sets.kept_info(self.reference)}
      for metric in metrics_lib.ROW_METRICS:
        results.get(metric, {}).update(kept_features=kept)
      results.get('kid', {}).update(kid_subset_size=ecfg.kid_subset_size,
                                    kid_num_subsets=ecfg.kid_num_subsets)
      results.get('precision_recall', {}).update(k=ecfg.pr_k)
      results.get('is', {}).update(splits=ecfg.is_splits)
    else:
      for _ in image_stream():
        pass
    if self.scorer is not None:
      conditional = bool(self.config.model.num_classes > 0 and kept_labels
                         and kept_labels[0] is not None)
      results['classifier_fd'] = self.scorer(
          np.concatenate(kept_samples), np.concatenate(kept_labels) if conditional else None
      ) | common
    return results


BEST_SUBDIR = 'checkpoints_best'


class TrainingEvaluator:
  """The in-training eval: every training.eval_every_steps (and at the last step), the metrics
  of eval.train_metrics on eval.train_num_samples EMA samples against the reference of
  --mode=eval (data.split's cached statistics unless eval.reference), written like --mode=eval
  (`<workdir>/eval/<metric>_step<step>.json`, TensorBoard under `<workdir>/eval`) and to the
  training writer as `eval/<metric>/<figure>`.

  The best state (lowest value of the first metric, e.g. FID) is saved to
  `<workdir>/checkpoints_best/<step>` by its own orbax manager (keeps 1), which the keep-K
  policy of `<workdir>/checkpoints` never touches. The best value and step are persisted in
  `<workdir>/eval/best.json` after the checkpoint is complete, and read at start, so a resumed
  run keeps comparing with the best of the earlier runs.
  """

  def __init__(self, config, workdir: str, mesh: Mesh):
    ecfg, tcfg = config.eval, config.training
    self.config, self.every, self.workdir = config, tcfg.eval_every_steps, workdir
    self.metric = ecfg.train_metrics[0]
    self.figure = METRIC_FIGURES[self.metric][0]
    self.evaluator = SampleMetricsEvaluator(config, workdir, mesh, ecfg.train_metrics,
                                            ecfg.train_num_samples)
    self.best_path = epath.Path(workdir) / 'eval' / 'best.json'
    self.best = read_best(workdir)
    if self.best is not None and self.best['metric'] != self.figure:
      logging.warning('%s ranks checkpoints by %s, but this run ranks by %s: starting a new '
                      'best.', self.best_path, self.best['metric'], self.figure)
      self.best = None
    self.manager = checkpoints.create_manager(workdir, keep=1, async_save=False,
                                              subdir=BEST_SUBDIR)

  def due(self, step: int, is_last: bool) -> bool:
    return self.every > 0 and (step % self.every == 0 or is_last)

  def __call__(self, state: PyTree, ema_params: PyTree, step: int,
               writer: metric_writers.MetricWriter) -> Dict[str, Dict[str, Any]]:
    """Scores `ema_params` (laid out as the sampler takes them) at `step`, writes the figures,
    and saves `state` as the best checkpoint when the first metric improved."""
    results = self.evaluator(ema_params, step)
    scalars = write_sample_results(self.workdir, step, results)
    writer.write_scalars(step, {f'eval/{name}': value for name, value in scalars.items()})
    value = float(results[self.metric][self.figure])
    improved = np.isfinite(value) and (self.best is None or value < self.best['value'])
    if improved:
      if step in self.manager.all_steps():  # Saved by a run that stopped before its next
        self.manager.delete(step)           # regular checkpoint and was resumed from before.
      checkpoints.save(self.manager, step, state, self.config)
      self.manager.wait_until_finished()
      self.best = {'metric': self.figure, 'value': value, 'step': int(step)}
      if jax.process_index() == 0:
        self.best_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.best_path.parent / (self.best_path.name + '.tmp')
        tmp.write_text(json.dumps(self.best, indent=2))
        tmp.replace(self.best_path)  # rename would refuse an existing best.json.
    logging.info('%s at step %d: %.6g (best %.6g at step %d%s)', self.figure, step, value,
                 self.best['value'] if self.best else float('nan'),
                 self.best['step'] if self.best else -1, ', saved' if improved else '')
    return results

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
