"""Likelihood metrics of `--mode=eval`: the variational bound (every one of the T terms, bits/dim)
and the exact NLL through the probability-flow ODE, on `data.eval_split`."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

import flax.linen as nn

from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import checks, likelihood
from diffusion_jax.evaluation.writers import write_eval_scalars
from diffusion_jax.nn import backbones
from diffusion_jax.objectives import ddpm
from diffusion_jax.parallel import multihost, sharding
from diffusion_jax.processes import discrete
from diffusion_jax.training import restore

PyTree = Any


def make_vlb_fn(model: nn.Module, config, mesh: Mesh
                ) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array],
                              Tuple[jax.Array, jax.Array]]:
  """Returns jitted `vlb(params, x0 [B,H,W,C], labels [B], rng) -> (terms [B, T], prior [B])`.

  terms[:, t] is L_t in bits/dim (t = 0 the decoder L_0, t >= 1 the KL terms) with x_t drawn
  from q(x_t | x_0) with noise keyed by fold_in(rng, t); prior is L_T. Both are sharded like
  the batch. The reverse variance is learned (`model.learn_sigma`) or `eval.variance`. The
  bound is that of objective 'ddpm' (its schedule and prediction type).
  """
  ecfg, dcfg = config.eval, config.diffusion.ddpm
  learn_sigma = config.model.learn_sigma
  schedule = ddpm.schedule(config)
  batch_shard = sharding.batch_sharding(mesh)

  def vlb(params, x0, labels, rng):
    x0 = x0.astype(jnp.float32)

    def term(_, t):
      t_batch = jnp.full((x0.shape[0],), t, jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(rng, t), x0.shape, jnp.float32)
      x_t = discrete.q_sample(schedule, x0, t_batch,
                               jax.lax.with_sharding_constraint(noise, batch_shard))
      output = model.apply({'params': params}, x_t, jnp.take(schedule.timesteps, t_batch),
                           labels, train=False)
      mean, log_var, _ = discrete.p_mean_variance(
          schedule, output, x_t, t_batch, dcfg.prediction_type, learn_sigma,
          variance=ecfg.variance, clip_denoised=ecfg.clip_denoised)
      return None, discrete.vlb_term(schedule, x0, x_t, t_batch, mean, log_var)

    _, terms = jax.lax.scan(term, None, jnp.arange(schedule.num_timesteps))
    return terms.T, discrete.prior_bpd(schedule, x0)

  replicated = sharding.replicated(mesh)
  # params: as given (FSDP-sharded as restored, or replicated); XLA gathers each weight in use.
  return jax.jit(vlb, in_shardings=(None, batch_shard, batch_shard, replicated),
                 out_shardings=(batch_shard, batch_shard))


def make_ode_nll_fn(model: nn.Module, config, mesh: Mesh
                    ) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array],
                                  Tuple[jax.Array, jax.Array]]:
  """Returns jitted `ode_nll(params, x [B,H,W,C] in [-1,1], labels [B], rng) -> (bpd [B], steps)`.

  bpd is the dequantised PF-ODE NLL (NaN where the solver failed); steps the solver's step count.
  The ODE is that of config.diffusion.objective (`likelihood.nll_bpd`).
  """
  ecfg = config.eval

  def ode_nll(params, x, labels, rng):
    apply_fn = lambda x_t, t: model.apply({'params': params}, x_t, t, labels, train=False)
    bpd, result = likelihood.nll_bpd_and_solve(
        apply_fn, config, x, rng, probe=ecfg.ode_probe, num_probes=ecfg.ode_num_probes,
        solver=ecfg.ode_solver, rtol=ecfg.ode_rtol, atol=ecfg.ode_atol,
        max_steps=ecfg.ode_max_steps)
    return bpd, result.num_steps

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


def likelihood_eval(config, workdir: str, mesh: Mesh) -> Dict[str, Any]:
  """Bits/dim of the newest checkpoint in `workdir` on `data.eval_split`.

  Returns the dict written to `<workdir>/eval/vlb_step<step>.json`:
    {'step', 'eval_split', 'use_ema', 'num_examples', 'num_timesteps',
     'vlb': {'bpd', 'prior_bpd', 'decoder_bpd', 'kl_bpd', 'kl_buckets': {'kl_tSSSS-EEEE': bpd}},
     'ode_nll': {'bpd', 'mean_num_steps', 'num_failed_batches'}}       (the metrics asked for)
  where vlb.bpd = prior_bpd + decoder_bpd + kl_bpd and kl_bpd = sum of kl_buckets.
  """
  ecfg = config.eval
  metrics = tuple(m for m in ecfg.metrics if m in checks.LIKELIHOOD_METRICS)
  params, step = restore.restore_params(config, workdir, mesh, ecfg.use_ema, ecfg.ema)
  model = backbones.create_model(config.model, config.data.channels)
  num_timesteps = config.diffusion.ddpm.num_timesteps  # The bound's terms ('vlb' is ddpm's).
  buckets = kl_buckets(num_timesteps, ecfg.num_kl_buckets)

  dataset = pipeline.create_dataset(
      config.data, ecfg.batch_size // jax.process_count(), split=config.data.eval_split,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      train=False)
  batch_shard = sharding.batch_sharding(mesh)
  vlb_fn = make_vlb_fn(model, config, mesh) if 'vlb' in metrics else None
  ode_fn = make_ode_nll_fn(model, config, mesh) if 'ode_nll' in metrics else None
  base_rng = jax.random.PRNGKey(ecfg.seed)

  vlb_mean, ode_mean = _MaskedMean(), _MaskedMean()
  ode_steps: List[int] = []
  ode_failed = 0
  num_examples = 0
  for i, batch in enumerate(pipeline.global_batches(dataset, batch_shard)):
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

  out_dir = write_eval_scalars(workdir, step, scalars)
  if jax.process_index() == 0:
    (out_dir / f'vlb_step{step}.json').write_text(json.dumps(results, indent=2))
    logging.info('Eval of step %d on %d examples: %s', step, num_examples,
                 json.dumps({k: v for k, v in scalars.items()}))
  multihost_utils.sync_global_devices('eval done')
  return results
