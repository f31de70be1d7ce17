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
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
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
  return jax.jit(vlb, in_shardings=(replicated, batch_shard, batch_shard, replicated),
                 out_shardings=(batch_shard, batch_shard))


def make_ode_nll_fn(model: models.UNet, schedule: diffusion.Schedule, config, mesh: Mesh
                    ) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array],
                                  Tuple[jax.Array, jax.Array]]:
  """Returns jitted `ode_nll(params, x [B,H,W,C] in [-1,1], labels [B], rng) -> (bpd [B], steps)`.

  bpd is the dequantised PF-ODE NLL (NaN where the solver failed); steps the solver's step count.
  """
  ecfg = config.eval

  def ode_nll(params, x, labels, rng):
    deq_key, probe_key = jax.random.split(rng)
    apply_fn = lambda x_t, t: model.apply({'params': params}, x_t, t, labels, train=False)
    result = likelihood.ode_log_likelihood(
        apply_fn, schedule, likelihood.dequantize(x, deq_key), probe_key,
        prediction_type=config.diffusion.prediction_type,
        learn_sigma=config.model.learn_sigma, probe=ecfg.ode_probe,
        num_probes=ecfg.ode_num_probes, solver=ecfg.ode_solver, rtol=ecfg.ode_rtol,
        atol=ecfg.ode_atol, max_steps=ecfg.ode_max_steps)
    bpd = likelihood.bpd_from_log_prob(result.log_prob, math.prod(x.shape[1:]), True)
    return jnp.where(result.successful, bpd, jnp.nan), result.num_steps

  replicated, batch_shard = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(ode_nll, in_shardings=(replicated, batch_shard, batch_shard, replicated),
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
  params, step = checkpoints.restore_params(config, workdir, mesh, ecfg.use_ema)
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


def draw_samples(config, params: PyTree, mesh: Mesh, num_samples: int
                 ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Yields (uint8 [b, H, W, C], labels [b]) batches of `num_samples` samples in total.

  config.sample's sampler and settings; batch b is keyed fold_in(PRNGKey(sample.seed), b) and
  labelled by sample index like --mode=sample, so the two draw the same images.
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
  rng = jax.random.PRNGKey(scfg.seed)
  for b in range(math.ceil(num_samples / scfg.batch_size)):
    indices = b * scfg.batch_size + np.arange(scfg.batch_size)
    labels = class_labels.labels_for(indices, wanted, num_classes)
    x = multihost.to_host(sample_fn(params, jax.random.fold_in(rng, b), labels))
    keep = indices < num_samples
    yield images.to_uint8(x[keep]), labels[keep]


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


def reference_features(config, workdir: str, feature_fn: fid.FeatureFn, checksum: str,
                       keep: int, mesh: Mesh) -> Tuple[fid.FeatureSet, str]:
  """(features of eval.reference, its description); data.split's are cached in fid_stats_dir."""
  ecfg = config.eval
  if ecfg.reference:
    return (fid.features_of_source(ecfg.reference, feature_fn, ecfg.feature_batch_size, keep,
                                   False), ecfg.reference)
  stats_dir = ecfg.fid_stats_dir or str(epath.Path(workdir) / 'eval' / 'fid_stats')
  path = fid.reference_stats_path(stats_dir, config.data.dataset, config.data.split,
                                  config.data.resolution, ecfg.fid_resize, checksum,
                                  ecfg.reference_num_images)
  if epath.Path(path).exists():
    cached = fid.load_stats_file(path)
    if keep == 0 or (cached.features is not None and len(cached.features) >= min(
        keep, cached.num_images)):
      logging.info('Reference statistics from %s', path)
      return cached, path
  logging.info('Computing the reference statistics of %s/%s into %s', config.data.dataset,
               config.data.split, path)
  features = fid.extract_features(
      _dataset_batches(config, config.data.split, ecfg.feature_batch_size,
                       ecfg.reference_num_images, mesh),
      feature_fn, ecfg.feature_batch_size, max(keep, ecfg.num_kept_features))
  if jax.process_index() == 0:
    fid.save_feature_set(path, features, dataset=config.data.dataset, split=config.data.split,
                         resize=ecfg.fid_resize, sha256=checksum)
  return features, path


def _sample_metrics_eval(config, workdir: str, mesh: Mesh, params: PyTree, step: int
                         ) -> Dict[str, Dict[str, Any]]:
  """The figures of every sample metric in eval.metrics, by metric name."""
  ecfg = config.eval
  wanted = [m for m in ecfg.metrics if m in fid.SAMPLE_METRICS]
  inception_metrics = [m for m in wanted if m in fid.INCEPTION_METRICS]
  feature_fn, checksum, weights_path, want_logits = None, '', '', 'is' in wanted
  if inception_metrics:
    inc_params, num_logits, weights_path, checksum = inception.load_inception(
        ecfg.inception_path)
    if want_logits and not num_logits:
      raise ConfigError(f"eval.metrics has 'is', but the Inception weights {weights_path} have "
                        'no 1008-way classifier (fc.weight); set eval.inception_path to weights '
                        "that do, or drop 'is'.")
    if checksum not in inception.KNOWN_WEIGHTS:
      logging.warning('Inception weights %s (sha256 %s) are not a known file: figures may not '
                      'be comparable with published ones.', weights_path, checksum)
    feature_fn = inception.make_feature_fn(inc_params, num_logits, ecfg.fid_resize, mesh)
  keep = ecfg.num_kept_features if any(
      m in wanted for m in ('kid', 'precision_recall')) else 0

  if ecfg.samples:
    with epath.Path(ecfg.samples).open('rb') as f:
      with np.load(f) as data:
        sample_labels = data['arr_1'] if 'arr_1' in data.files else None
    all_samples = fid.load_samples_npz(ecfg.samples)
    batches = ((all_samples[i:i + ecfg.feature_batch_size],
                None if sample_labels is None else sample_labels[i:i + ecfg.feature_batch_size])
               for i in range(0, len(all_samples), ecfg.feature_batch_size))
    source = ecfg.samples
  else:
    batches = draw_samples(config, params, mesh, ecfg.num_samples)
    source = f'{config.sample.sampler}/{config.sample.steps} steps, seed {config.sample.seed}'

  kept_samples, kept_labels = [], []

  def image_stream():
    for x, labels in batches:
      if 'classifier_fd' in wanted:
        kept_samples.append(x)
        kept_labels.append(labels)
      yield x

  results: Dict[str, Dict[str, Any]] = {}
  common = {'step': int(step), 'samples': source}
  if inception_metrics:
    generated = fid.extract_features(image_stream(), feature_fn, ecfg.feature_batch_size, keep,
                                     want_logits)
    reference, reference_name = reference_features(config, workdir, feature_fn, checksum, keep,
                                                   mesh)
    figures = fid.compare(generated, reference, inception_metrics,
                          kid_subset_size=ecfg.kid_subset_size,
                          kid_num_subsets=ecfg.kid_num_subsets, pr_k=ecfg.pr_k,
                          is_splits=ecfg.is_splits, seed=ecfg.seed)
    info = {**common, 'num_samples': generated.num_images, 'reference': reference_name,
            'num_reference': reference.num_images, 'resize': ecfg.fid_resize,
            'inception_weights': weights_path, 'inception_sha256': checksum}
    names = {'fid': ('fid',), 'kid': ('kid', 'kid_std'),
             'precision_recall': ('precision', 'recall'), 'is': ('is', 'is_std')}
    for metric in inception_metrics:
      results[metric] = {k: figures[k] for k in names[metric]} | info
    results.get('kid', {}).update(kid_subset_size=ecfg.kid_subset_size,
                                  kid_num_subsets=ecfg.kid_num_subsets)
    results.get('precision_recall', {}).update(k=ecfg.pr_k)
    results.get('is', {}).update(splits=ecfg.is_splits)
  else:
    for _ in image_stream():
      pass
  if 'classifier_fd' in wanted:
    stats_dir = ecfg.fid_stats_dir or str(epath.Path(workdir) / 'eval' / 'fid_stats')
    conditional = bool(config.model.num_classes > 0 and kept_labels
                       and kept_labels[0] is not None)
    results['classifier_fd'] = classifier_fd.score_samples(
        np.concatenate(kept_samples), np.concatenate(kept_labels) if conditional else None,
        str(epath.Path(stats_dir) / f'classifier_{config.data.dataset}.npz'),
        config.data.dataset) | common
  return results


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
    params, step = checkpoints.restore_params(config, workdir, mesh, config.sample.use_ema)
  sample_results = _sample_metrics_eval(config, workdir, mesh, params, step)
  scalars = {f'{metric}/{name}': value for metric, figures in sample_results.items()
             for name, value in figures.items()
             if isinstance(value, (int, float)) and name not in ('step',)}
  out_dir = _write_eval_scalars(workdir, step, scalars)
  if jax.process_index() == 0:
    for metric, figures in sample_results.items():
      (out_dir / f'{metric}_step{step}.json').write_text(json.dumps(figures, indent=2))
    logging.info('Sample metrics of step %d: %s', step, json.dumps(scalars))
  multihost_utils.sync_global_devices('sample metrics done')
  results.update(sample_results)
  results.setdefault('step', int(step))
  return results
