"""`--mode=eval`: likelihood of the newest checkpoint on `data.eval_split`, in bits/dim, and
the sample-quality figures papers report (FID, KID, precision/recall, IS, classifier_fd).

Likelihood metrics, chosen by `eval.metrics`:

* 'vlb': the variational bound of Ho et al. / Nichol & Dhariwal, per image
    L = L_T + sum_{t=1}^{T-1} L_t + L_0                     (bits/dim, diffusion.py),
  with every one of the T terms evaluated (one noise draw per term and image), not sampled: for
  each batch one jitted `lax.scan` over t runs the network T times on the batch, which is
  sharded over the mesh's data axis. The breakdown reports the prior L_T, the decoder L_0 and
  the KL terms summed over `eval.num_kl_buckets` equal ranges of t; they add up to the total.
* 'ode_nll': the exact likelihood through the probability-flow ODE (likelihood.py), with uniform
  dequantisation, as Song et al. 2021 report it.

Padded examples of the last batch (mask 0) are left out of every average. Class-conditional
models are scored on log p(x | y) with the true labels. Results go to TensorBoard / the log
(clu metric writers, under `<workdir>/eval`) and to `<workdir>/eval/vlb_step<step>.json`.

Sample metrics ('fid', 'kid', 'precision_recall', 'is', 'classifier_fd'): `eval.num_samples`
samples are drawn with the run's `config.sample` settings (`sampling.make_sample_fn`, sharded
over the mesh; batch b uses fold_in(sample.seed, b) as --mode=sample does), or read from
`eval.samples`; quantised to uint8 and streamed through Inception (inception.py, resized by
`eval.fid_resize`) and compared with `eval.reference` (default: data.split's statistics, cached
under `eval.fid_stats_dir`). Each figure goes to `<workdir>/eval/<metric>_step<step>.json` with
the number of samples, the reference, the resize mode and the weights' sha256 beside it.

One `SampleMetricsEvaluator` holds what does not change between evaluations (feature networks,
reference statistics, the compiled sampler); --mode=eval calls it once, and training calls it
every `training.eval_every_steps` through `TrainingEvaluator`, which also keeps the best
checkpoint (`<workdir>/checkpoints_best`, `<workdir>/eval/best.json`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import (checkpoints, class_labels, classifier_fd, diffusion, fid, images,
                           inception, input_pipeline, likelihood, models, multihost, sampling,
                           sharding)
from diffusion_jax.config_validation import ConfigError, validate_config

PyTree = Any
METRICS = fid.LIKELIHOOD_METRICS + fid.SAMPLE_METRICS


def make_vlb_fn(model: models.UNet, schedule: diffusion.Schedule, config, mesh: Mesh
                ) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array],
                              Tuple[jax.Array, jax.Array]]:
  """Returns jitted `vlb(params, x0 [B,H,W,C], labels [B], rng) -> (terms [B, T], prior [B])`.

  terms[:, t] is L_t in bits/dim (t = 0 the decoder L_0, t >= 1 the KL terms) with x_t drawn
  from q(x_t | x_0) with noise keyed by fold_in(rng, t); prior is L_T. Both are sharded like
  the batch. The reverse variance is learned (`model.learn_sigma`) or `eval.variance`.
  """
  ecfg, dcfg = config.eval, config.diffusion
  learn_sigma = config.model.learn_sigma
  batch_shard = sharding.batch_sharding(mesh)

  def vlb(params, x0, labels, rng):
    x0 = x0.astype(jnp.float32)

    def term(_, t):
      t_batch = jnp.full((x0.shape[0],), t, jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(rng, t), x0.shape, jnp.float32)
      x_t = diffusion.q_sample(schedule, x0, t_batch,
                               jax.lax.with_sharding_constraint(noise, batch_shard))
      output = model.apply({'params': params}, x_t, jnp.take(schedule.timesteps, t_batch),
                           labels, train=False)
      mean, log_var, _ = diffusion.p_mean_variance(
          schedule, output, x_t, t_batch, dcfg.prediction_type, learn_sigma,
          variance=ecfg.variance, clip_denoised=ecfg.clip_denoised)
      return None, diffusion.vlb_term(schedule, x0, x_t, t_batch, mean, log_var)

    _, terms = jax.lax.scan(term, None, jnp.arange(schedule.num_timesteps))
    return terms.T, diffusion.prior_bpd(schedule, x0)

  replicated = sharding.replicated(mesh)
  # params: as given (FSDP-sharded as restored, or replicated); XLA gathers each weight in use.
  return jax.jit(vlb, in_shardings=(None, batch_shard, batch_shard, replicated),
                 out_shardings=(batch_shard, batch_shard))


def make_ode_nll_fn(model: models.UNet, schedule: diffusion.Schedule, config, mesh: Mesh
                    ) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array],
                                  Tuple[jax.Array, jax.Array]]:
  """Returns jitted `ode_nll(params, x [B,H,W,C] in [-1,1], labels [B], rng) -> (bpd [B], steps)`.

  bpd is the dequantised PF-ODE NLL (NaN where the solver failed); steps the solver's step count.
  The ODE is that of config.diffusion.objective (`likelihood.objective_log_likelihood`).
  """
  ecfg = config.eval

  def ode_nll(params, x, labels, rng):
    deq_key, probe_key = jax.random.split(rng)
    apply_fn = lambda x_t, t: model.apply({'params': params}, x_t, t, labels, train=False)
    result = likelihood.objective_log_likelihood(
        apply_fn, schedule, config.diffusion, likelihood.dequantize(x, deq_key), probe_key,
        learn_sigma=config.model.learn_sigma, probe=ecfg.ode_probe,
        num_probes=ecfg.ode_num_probes, solver=ecfg.ode_solver, rtol=ecfg.ode_rtol,
        atol=ecfg.ode_atol, max_steps=ecfg.ode_max_steps)
    bpd = likelihood.bpd_from_log_prob(result.log_prob, math.prod(x.shape[1:]), True)
    return jnp.where(result.successful, bpd, jnp.nan), result.num_steps

  replicated, batch_shard = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  # params: as given (FSDP-sharded as restored, or replicated); XLA gathers each weight in use.
  return jax.jit(ode_nll, in_shardings=(None, batch_shard, batch_shard, replicated),
                 out_shardings=(batch_shard, replicated))


def kl_buckets(num_timesteps: int, num_buckets: int) -> List[Tuple[int, int]]:
  """Up to `num_buckets` contiguous, equal ranges [start, end) covering the KL steps 1..T-1."""
  edges = np.unique(np.round(np.linspace(1, num_timesteps, num_buckets + 1)).astype(int))
  return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _bucket_name(start: int, end: int) -> str:
  return f'kl_t{start:04d}-{end - 1:04d}'


class _MaskedMean:
  """Running masked means of named per-example values, accumulated in float64 on the host."""

  def __init__(self):
    self.sums: Dict[str, float] = {}
    self.count = 0.0

  def add(self, mask: np.ndarray, values: Dict[str, np.ndarray]) -> None:
    mask = np.asarray(mask, np.float64)
    self.count += float(mask.sum())
    for name, v in values.items():
      self.sums[name] = self.sums.get(name, 0.0) + float(np.sum(mask * np.asarray(v, np.float64)))

  def means(self) -> Dict[str, float]:
    return {name: s / self.count for name, s in self.sums.items()}


def _write_eval_scalars(workdir: str, step: int, scalars: Dict[str, float]) -> epath.Path:
  """Writes `scalars` at `step` to TensorBoard under `<workdir>/eval` (created); returns it."""
  out_dir = epath.Path(workdir) / 'eval'
  writer = metric_writers.create_default_writer(str(out_dir),
                                                just_logging=jax.process_index() > 0)
  writer.write_scalars(int(step), scalars)
  writer.flush()
  writer.close()
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
  return out_dir


def _likelihood_eval(config, workdir: str, mesh: Mesh) -> Dict[str, Any]:
  """Bits/dim of the newest checkpoint in `workdir` on `data.eval_split`.

  Returns the dict written to `<workdir>/eval/vlb_step<step>.json`:
    {'step', 'eval_split', 'use_ema', 'num_examples', 'num_timesteps',
     'vlb': {'bpd', 'prior_bpd', 'decoder_bpd', 'kl_bpd', 'kl_buckets': {'kl_tSSSS-EEEE': bpd}},
     'ode_nll': {'bpd', 'mean_num_steps', 'num_failed_batches'}}       (the metrics asked for)
  where vlb.bpd = prior_bpd + decoder_bpd + kl_bpd and kl_bpd = sum of kl_buckets.
  """
  ecfg = config.eval
  metrics = tuple(m for m in ecfg.metrics if m in fid.LIKELIHOOD_METRICS)
  params, step = checkpoints.restore_params(config, workdir, mesh, ecfg.use_ema, ecfg.ema)
  model = models.create_model(config.model, config.data.channels)
  schedule = diffusion.make_schedule(config.diffusion)
  num_timesteps = schedule.num_timesteps
  buckets = kl_buckets(num_timesteps, ecfg.num_kl_buckets)

  dataset = input_pipeline.create_dataset(
      config.data, ecfg.batch_size // jax.process_count(), split=config.data.eval_split,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      train=False)
  batch_shard = sharding.batch_sharding(mesh)
  vlb_fn = make_vlb_fn(model, schedule, config, mesh) if 'vlb' in metrics else None
  ode_fn = make_ode_nll_fn(model, schedule, config, mesh) if 'ode_nll' in metrics else None
  base_rng = jax.random.PRNGKey(ecfg.seed)

  vlb_mean, ode_mean = _MaskedMean(), _MaskedMean()
  ode_steps: List[int] = []
  ode_failed = 0
  num_examples = 0
  for i, batch in enumerate(input_pipeline.global_batches(dataset, batch_shard)):
    if 0 <= ecfg.num_batches <= i:
      break
    mask = multihost.to_host(batch['mask'])
    num_examples += int(mask.sum())
    labels = batch.get('label')
    if labels is None:
      zeros = np.zeros((ecfg.batch_size,), np.int32)  # Ignored by unconditional models.
      labels = jax.make_array_from_callback(zeros.shape, batch_shard, lambda idx: zeros[idx])
    rng = jax.random.fold_in(base_rng, i)
    if vlb_fn is not None:
      terms, prior = (multihost.to_host(a) for a in vlb_fn(params, batch['image'], labels,
                                                             jax.random.fold_in(rng, 0)))
      values = {'prior_bpd': prior, 'decoder_bpd': terms[:, 0]}
      values |= {_bucket_name(a, b): terms[:, a:b].sum(axis=1) for a, b in buckets}
      values['bpd'] = prior + terms.sum(axis=1)
      vlb_mean.add(mask, values)
    if ode_fn is not None:
      bpd, steps = ode_fn(params, batch['image'], labels, jax.random.fold_in(rng, 1))
      bpd, steps = multihost.to_host(bpd), int(jax.device_get(steps))
      ode_steps.append(steps)
      if not np.all(np.isfinite(bpd)):
        ode_failed += 1
        logging.warning('PF-ODE solve failed on batch %d after %d steps (eval.ode_max_steps='
                        '%d); the batch is left out of ode_nll.', i, steps, ecfg.ode_max_steps)
      else:
        ode_mean.add(mask, {'bpd': bpd})
    logging.info('eval batch %d: %d examples so far', i + 1, num_examples)
  if num_examples == 0:
    raise ValueError(f'data.eval_split={config.data.eval_split!r} gave no examples to evaluate.')

  results: Dict[str, Any] = {
      'step': int(step), 'eval_split': config.data.eval_split, 'use_ema': bool(ecfg.use_ema),
      'num_examples': num_examples, 'num_timesteps': num_timesteps}
  scalars: Dict[str, float] = {}
  if vlb_fn is not None:
    means = vlb_mean.means()
    kl = {_bucket_name(a, b): means[_bucket_name(a, b)] for a, b in buckets}
    results['vlb'] = {'bpd': means['bpd'], 'prior_bpd': means['prior_bpd'],
                      'decoder_bpd': means['decoder_bpd'], 'kl_bpd': sum(kl.values()),
                      'kl_buckets': kl}
    scalars |= {f'vlb/{name}': value for name, value in means.items()}
    scalars['vlb/kl_bpd'] = results['vlb']['kl_bpd']
  if ode_fn is not None:
    bpd = ode_mean.means().get('bpd', float('nan'))
    results['ode_nll'] = {'bpd': bpd, 'mean_num_steps': float(np.mean(ode_steps)),
                          'num_failed_batches': ode_failed}
    scalars |= {'ode_nll/bpd': bpd, 'ode_nll/num_steps': float(np.mean(ode_steps))}

  out_dir = _write_eval_scalars(workdir, step, scalars)
  if jax.process_index() == 0:
    (out_dir / f'vlb_step{step}.json').write_text(json.dumps(results, indent=2))
    logging.info('Eval of step %d on %d examples: %s', step, num_examples,
                 json.dumps({k: v for k, v in scalars.items()}))
  multihost_utils.sync_global_devices('eval done')
  return results


def check_config(config) -> None:
  """Raises ConfigError for any problem of `config` in --mode=eval, before anything runs.

  `validate_config(mode='eval')` owns every eval check (it calls `fid.check_eval_config` for
  the metric names and sample-metric fields).
  """
  validate_config(config, mode='eval')


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
  num_classes = config.model.num_classes
  try:
    wanted = class_labels.parse_class_labels(scfg.class_labels, num_classes)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  model = models.create_model(config.model, config.data.channels)
  schedule = diffusion.make_schedule(config.diffusion)
  sample_fn = sampling.make_sample_fn(model, schedule, config, mesh, scfg.batch_size)

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
  dataset = input_pipeline.create_dataset(
      config.data, batch_size // jax.process_count(), split=split, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), train=False)
  seen = 0
  for batch in input_pipeline.global_batches(dataset, sharding.batch_sharding(mesh)):
    mask = multihost.to_host(batch['mask']) > 0
    x = images.to_uint8(multihost.to_host(batch['image'])[mask])
    if limit > 0:
      x = x[:limit - seen]
    seen += len(x)
    yield x
    if 0 < limit <= seen:
      return


def stats_dir(config, workdir: str) -> str:
  """Where reference statistics and the digits classifier are cached (eval.fid_stats_dir)."""
  return config.eval.fid_stats_dir or str(epath.Path(workdir) / 'eval' / 'fid_stats')


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


def reference_features(config, workdir: str, feature_fn: fid.FeatureFn, checksum: str,
                       keep: int, mesh: Mesh, progress: bool = False
                       ) -> Tuple[fid.FeatureSet, str]:
  """(features of eval.reference, its description); data.split's are cached in fid_stats_dir
  (keyed by `fid.reference_stats_path`) and read from there by every later evaluation."""
  ecfg = config.eval
  if ecfg.reference:
    return (fid.features_of_source(ecfg.reference, feature_fn, ecfg.feature_batch_size, keep,
                                   False), ecfg.reference)
  path = fid.reference_stats_path(stats_dir(config, workdir), dataset_source_id(config.data),
                                  config.data.split, config.data.resolution, ecfg.fid_resize,
                                  checksum, ecfg.reference_num_images)
  if epath.Path(path).exists():
    cached = fid.load_stats_file(path)
    if keep == 0 or (cached.features is not None and len(cached.features) >= min(
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
  features = fid.extract_features(batches, feature_fn, ecfg.feature_batch_size,
                                  max(keep, ecfg.num_kept_features))
  if jax.process_index() == 0:
    fid.save_feature_set(path, features, dataset=config.data.dataset, split=config.data.split,
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
    self.wanted = [m for m in metrics if m in fid.SAMPLE_METRICS]
    self.inception_metrics = [m for m in self.wanted if m in fid.INCEPTION_METRICS]
    self.keep = ecfg.num_kept_features if any(
        m in self.wanted for m in ('kid', 'precision_recall')) else 0
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
          str(epath.Path(stats_dir(config, workdir)) / f'classifier_{config.data.dataset}.npz'),
          config.data.dataset)
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
      generated = fid.extract_features(image_stream(), self.feature_fn, ecfg.feature_batch_size,
                                       self.keep, self.want_logits)
      figures = fid.compare(generated, self.reference, self.inception_metrics,
                            kid_subset_size=ecfg.kid_subset_size,
                            kid_num_subsets=ecfg.kid_num_subsets, pr_k=ecfg.pr_k,
                            is_splits=ecfg.is_splits, seed=ecfg.seed)
      info = {**common, 'num_samples': generated.num_images, 'reference': self.reference_name,
              'num_reference': self.reference.num_images, 'resize': ecfg.fid_resize,
              'inception_weights': self.weights_path, 'inception_sha256': self.checksum}
      for metric in self.inception_metrics:
        results[metric] = {k: figures[k] for k in METRIC_FIGURES[metric]} | info
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


def write_sample_results(workdir: str, step: int, results: Dict[str, Dict[str, Any]]
                         ) -> Dict[str, float]:
  """Writes each metric's figures to `<workdir>/eval/<metric>_step<step>.json` (process 0) and
  its numbers to TensorBoard (`<workdir>/eval`, as `<metric>/<figure>`); returns those scalars."""
  scalars = {f'{metric}/{name}': value for metric, figures in results.items()
             for name, value in figures.items()
             if isinstance(value, (int, float)) and name not in ('step',)}
  out_dir = _write_eval_scalars(workdir, step, scalars)
  if jax.process_index() == 0:
    for metric, figures in results.items():
      (out_dir / f'{metric}_step{step}.json').write_text(json.dumps(figures, indent=2))
    logging.info('Sample metrics of step %d: %s', step, json.dumps(scalars))
  return scalars


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
        tmp.rename(self.best_path)
    logging.info('%s at step %d: %.6g (best %.6g at step %d%s)', self.figure, step, value,
                 self.best['value'] if self.best else float('nan'),
                 self.best['step'] if self.best else -1, ', saved' if improved else '')
    return results

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_best(workdir: str) -> Optional[Dict[str, Any]]:
  """`<workdir>/eval/best.json` ({'metric', 'value', 'step'}) or None when there is none yet."""
  path = epath.Path(workdir) / 'eval' / 'best.json'
  return json.loads(path.read_text()) if path.exists() else None


def _samples_file_batches(path: str, batch_size: int
                          ) -> Tuple[int, Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]]:
  """(number of samples, (uint8 images, labels or None) batches) of a samples npz (`arr_1`:
  labels, optional)."""
  with epath.Path(path).open('rb') as f:
    with np.load(f) as data:
      labels = data['arr_1'] if 'arr_1' in data.files else None
  samples = fid.load_samples_npz(path)
  return len(samples), ((samples[i:i + batch_size],
                         None if labels is None else labels[i:i + batch_size])
                        for i in range(0, len(samples), batch_size))


def _sample_metrics_eval(config, workdir: str, mesh: Mesh, params: PyTree, step: int
                         ) -> Dict[str, Dict[str, Any]]:
  """The figures of every sample metric in eval.metrics, by metric name (with progress bars)."""
  ecfg = config.eval
  evaluator = SampleMetricsEvaluator(config, workdir, mesh, ecfg.metrics, ecfg.num_samples,
                                     draw_samples=not ecfg.samples, progress=True)
  if ecfg.samples:
    total, batches = _samples_file_batches(ecfg.samples, ecfg.feature_batch_size)
    return evaluator.score(batches, step, ecfg.samples, total)
  return evaluator(params, step)


def evaluate(config, workdir: str, mesh: Optional[Mesh] = None) -> Dict[str, Any]:
  """`--mode=eval`: the metrics of `eval.metrics` for the newest checkpoint in `workdir`.

  Likelihood metrics as `_likelihood_eval` (written to vlb_step<step>.json); each sample metric
  to `<workdir>/eval/<metric>_step<step>.json` and TensorBoard as `<metric>/<figure>`. Returns
  the likelihood dict (when asked for) with each sample metric's dict under its name.
  """
  check_config(config)
  mesh = mesh or sharding.create_mesh(config.mesh)
  ecfg = config.eval
  results: Dict[str, Any] = {}
  if any(m in fid.LIKELIHOOD_METRICS for m in ecfg.metrics):
    results = _likelihood_eval(config, workdir, mesh)
  if not any(m in fid.SAMPLE_METRICS for m in ecfg.metrics):
    return results
  if ecfg.samples:
    params, step = None, checkpoints.latest_step_on_disk(workdir)  # 0 without checkpoints.
  else:
    params, step = checkpoints.restore_params(config, workdir, mesh, config.sample.use_ema,
                                              config.sample.ema)
  sample_results = _sample_metrics_eval(config, workdir, mesh, params, step)
  write_sample_results(workdir, step, sample_results)
  multihost_utils.sync_global_devices('sample metrics done')
  results.update(sample_results)
  results.setdefault('step', int(step))
  return results
