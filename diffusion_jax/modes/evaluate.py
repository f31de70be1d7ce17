"""`--mode=eval`: the metrics of `eval.metrics` for the newest checkpoint of a run.

Likelihood metrics ('vlb', 'ode_nll': evaluation/likelihood_metrics.py) are scored on
`data.eval_split`; sample metrics ('fid', 'kid', 'precision_recall', 'is', 'classifier_fd':
evaluation/sample_metrics.py) on `eval.num_samples` samples drawn with the run's `config.sample`
(or read from `eval.samples`). Each figure goes to `<workdir>/eval/<metric>_step<step>.json` and
TensorBoard (`<workdir>/eval`).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax.evaluation import checks, feature_sets
from diffusion_jax.evaluation.likelihood_metrics import likelihood_eval
from diffusion_jax.evaluation.sample_metrics import SampleMetricsEvaluator
from diffusion_jax.evaluation.writers import write_sample_results
from diffusion_jax.modes.validation import validate_config
from diffusion_jax.parallel import sharding
from diffusion_jax.training import checkpoints, restore

PyTree = Any


def _samples_file_batches(path: str, batch_size: int
                          ) -> Tuple[int, Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]]:
  """(number of samples, (uint8 images, labels or None) batches) of a samples npz (`arr_1`:
  labels, optional)."""
  with epath.Path(path).open('rb') as f:
    with np.load(f) as data:
      labels = data['arr_1'] if 'arr_1' in data.files else None
  samples = feature_sets.load_samples_npz(path)
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

  Likelihood metrics as `likelihood_metrics.likelihood_eval` (written to vlb_step<step>.json);
  each sample metric to `<workdir>/eval/<metric>_step<step>.json` and TensorBoard as
  `<metric>/<figure>`. Returns the likelihood dict (when asked for) with each sample metric's
  dict under its name.
  """
  validate_config(config, mode='eval')
  mesh = mesh or sharding.create_mesh(config.mesh)
  ecfg = config.eval
  results: Dict[str, Any] = {}
  if any(m in checks.LIKELIHOOD_METRICS for m in ecfg.metrics):
    results = likelihood_eval(config, workdir, mesh)
  if not any(m in checks.SAMPLE_METRICS for m in ecfg.metrics):
    return results
  if ecfg.samples:
    params, step = None, checkpoints.latest_step_on_disk(workdir)  # 0 without checkpoints.
  else:
    params, step = restore.restore_params(config, workdir, mesh, config.sample.use_ema,
                                          config.sample.ema)
  sample_results = _sample_metrics_eval(config, workdir, mesh, params, step)
  write_sample_results(workdir, step, sample_results)
  multihost_utils.sync_global_devices('sample metrics done')
  results.update(sample_results)
  results.setdefault('step', int(step))
  return results
