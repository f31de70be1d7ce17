"""`--mode=eval`: likelihood of the newest checkpoint on `data.eval_split`, in bits/dim.

Two metrics, chosen by `eval.metrics`:

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
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import (checkpoints, diffusion, input_pipeline, likelihood, models, multihost,
                           sharding)
from diffusion_jax.config_validation import validate_config

PyTree = Any
METRICS = ('vlb', 'ode_nll')


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


def evaluate(config, workdir: str, mesh: Optional[Mesh] = None) -> Dict[str, Any]:
  """`--mode=eval`: bits/dim of the newest checkpoint in `workdir` on `data.eval_split`.

  Returns the dict written to `<workdir>/eval/vlb_step<step>.json`:
    {'step', 'eval_split', 'use_ema', 'num_examples', 'num_timesteps',
     'vlb': {'bpd', 'prior_bpd', 'decoder_bpd', 'kl_bpd', 'kl_buckets': {'kl_tSSSS-EEEE': bpd}},
     'ode_nll': {'bpd', 'mean_num_steps', 'num_failed_batches'}}       (the metrics asked for)
  where vlb.bpd = prior_bpd + decoder_bpd + kl_bpd and kl_bpd = sum of kl_buckets.
  """
  validate_config(config, mode='eval')
  mesh = mesh or sharding.create_mesh(config.mesh)
  ecfg = config.eval
  metrics = tuple(ecfg.metrics)
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

  out_dir = epath.Path(workdir) / 'eval'
  writer = metric_writers.create_default_writer(str(out_dir),
                                                just_logging=jax.process_index() > 0)
  writer.write_scalars(int(step), scalars)
  writer.flush()
  writer.close()
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f'vlb_step{step}.json').write_text(json.dumps(results, indent=2))
    logging.info('Eval of step %d on %d examples: %s', step, num_examples,
                 json.dumps({k: v for k, v in scalars.items()}))
  multihost_utils.sync_global_devices('eval done')
  return results
