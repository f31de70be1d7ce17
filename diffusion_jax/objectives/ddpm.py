"""The 'ddpm' objective: discrete-time DDPM / improved DDPM (Ho et al. 2020, Nichol & Dhariwal
2021) on the process of processes/discrete.py, with the fields of `config.diffusion.ddpm`.

Training: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at an integer t ~ U{0..T-1}; the network
regresses the epsilon / x0 / v target (`ddpm.prediction_type`), weighted simply or by Min-SNR,
and a `model.learn_sigma` network adds the variance term of the hybrid loss. Sampling: the DDPM
family of sampling/solvers.py (ddpm, ddim, dpm_solver_pp, euler, heun: diffusers' names) on the
schedule respaced by `sample.spacing`. Likelihood: the variational bound ('vlb', every term) and
the probability-flow ODE of the schedule read as a continuous VP process ('ode_nll').

The module implements the protocol of objectives/base.py.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.config.errors import check_choice
from diffusion_jax.objectives import base
from diffusion_jax.processes import discrete, respacing
from diffusion_jax.processes.discrete import Schedule
from diffusion_jax.sampling import solvers

NAME = 'ddpm'
SAMPLERS = tuple(solvers.SAMPLERS)
LIKELIHOOD_METRICS = ('vlb', 'ode_nll')
LOSS_WEIGHTINGS = ('simple', 'min_snr')


def schedule(config) -> Schedule:
  """The training schedule of `config.diffusion.ddpm` (concrete arrays, also under jit)."""
  with jax.ensure_compile_time_eval():
    return discrete.make_schedule(config.diffusion.ddpm)


# ---------------------------------------------------------------- training


def training_example(config, x0: jax.Array, noise: jax.Array,
                     key: jax.Array) -> Dict[str, jax.Array]:
  """Per-example arrays of a batch x0 [B,H,W,C]: 'x_t' = q_sample(x0, t, noise) and 't' [B]
  (uniform training steps drawn from `key`), with 'x0' and 'noise' for the loss."""
  sched = schedule(config)
  t = jax.random.randint(key, (x0.shape[0],), 0, sched.num_timesteps)
  return {'x0': x0, 'noise': noise, 't': t, 'x_t': discrete.q_sample(sched, x0, t, noise)}


def training_target(sched: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
                    prediction_type: str) -> jax.Array:
  """What the network is regressed onto for `prediction_type`."""
  if prediction_type == 'epsilon':
    return noise
  if prediction_type == 'x0':
    return x0
  if prediction_type == 'v':
    return discrete.v_from_x0_eps(sched, t, x0, noise)
  raise ValueError(f'diffusion.ddpm.prediction_type={prediction_type!r} is unknown; '
                   f'use one of {discrete.PREDICTION_TYPES}.')


def loss_weight(sched: Schedule, t: jax.Array, weighting: str, prediction_type: str,
                min_snr_gamma: float = 5.0) -> jax.Array:
  """Per-example weight [B] of the MSE on the `prediction_type` target.

  simple: 1 (Ho et al.). min_snr (Hang et al. 2023): the weight that makes the loss equal to
  min(SNR, gamma) * ||x0 - x0_hat||^2, i.e. min(SNR, gamma) / SNR for epsilon,
  min(SNR, gamma) for x0 and min(SNR, gamma) / (SNR + 1) for v.
  """
  if weighting == 'simple':
    return jnp.ones(jnp.shape(t), jnp.float32)
  if weighting != 'min_snr':
    raise ValueError(f'diffusion.ddpm.loss_weighting={weighting!r} is unknown; '
                     f'use one of {LOSS_WEIGHTINGS}.')
  s = discrete.snr(sched, t)
  clipped = jnp.minimum(s, min_snr_gamma)
  if prediction_type == 'epsilon':
    return clipped / s
  if prediction_type == 'x0':
    return clipped
  if prediction_type == 'v':
    return clipped / (s + 1.0)
  raise ValueError(f'diffusion.ddpm.prediction_type={prediction_type!r} is unknown; '
                   f'use one of {discrete.PREDICTION_TYPES}.')


def diffusion_loss(sched: Schedule, output: jax.Array, x0: jax.Array, noise: jax.Array,
                   t: jax.Array, prediction_type: str, weighting: str = 'simple',
                   min_snr_gamma: float = 5.0) -> jax.Array:
  """Per-example weighted mean squared error [B] between `output` and the training target."""
  target = training_target(sched, x0.astype(jnp.float32), noise.astype(jnp.float32), t,
                           prediction_type)
  return base.weighted_mse(output, target,
                           loss_weight(sched, t, weighting, prediction_type, min_snr_gamma))


def per_example_loss(config, output: jax.Array, example: Dict[str, jax.Array]) -> jax.Array:
  """The training loss [B] of the network's `output` on `example` (`training_example`'s).

  Without `model.learn_sigma`: L_simple, the (`loss_weighting`-weighted) MSE of
  `diffusion_loss`. With it (output [B, ..., 2C]), the hybrid objective of Nichol & Dhariwal:

    L_hybrid = L_simple + lambda L_vlb,   L_vlb = T E_t[L_t]  =>  lambda T L_t per example,

  lambda = `ddpm.vlb_weight` (0.001 in the paper, i.e. T/1000 L_t) and L_t the bits/dim
  `discrete.vlb_term` computed with the mean prediction under stop_gradient: the mean is learnt
  from L_simple alone and the variance channels only from L_vlb.
  """
  dcfg, learn_sigma = config.diffusion.ddpm, config.model.learn_sigma
  sched = schedule(config)
  x0, noise, t, x_t = example['x0'], example['noise'], example['t'], example['x_t']
  prediction, v = discrete.split_learned_sigma(output, learn_sigma)
  loss = diffusion_loss(sched, prediction, x0, noise, t, dcfg.prediction_type,
                        dcfg.loss_weighting, dcfg.min_snr_gamma)
  if not learn_sigma:
    return loss
  frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), v], axis=-1)
  mean, log_var, _ = discrete.p_mean_variance(sched, frozen, x_t, t, dcfg.prediction_type,
                                              learn_sigma=True)
  vlb = discrete.vlb_term(sched, x0, x_t, t, mean, log_var)
  return loss + dcfg.vlb_weight * sched.num_timesteps * vlb


# ---------------------------------------------------------------- sampling


def _sampler_options(config, sched: Schedule, name: str,
                     variance_noise: Optional[jax.Array]) -> Dict:
  """The keyword options `config.sample` gives DDPM-family sampler `name`."""
  scfg = config.sample
  if variance_noise is not None and name not in ('ddpm', 'ddim'):
    raise ValueError(f'variance_noise is taken by the ddpm and ddim samplers, not by '
                     f'sample.sampler={name!r}.')
  extra = {} if variance_noise is None else dict(variance_noise=variance_noise)
  if name == 'ddpm':
    return dict(variance=scfg.variance, **extra)
  if name == 'ddim':
    options = dict(eta=scfg.eta, set_alpha_to_one=bool(scfg.set_alpha_to_one), **extra)
    if not scfg.set_alpha_to_one:  # abar of training step 0, which `sched` may not keep.
      options['final_alpha_cumprod'] = float(respacing.alphas_cumprod64(sched)[0])
    return options
  if name == 'dpm_solver_pp':
    return dict(solver_order=int(scfg.solver_order), solver_type=scfg.solver_type)
  return dict(steps=int(scfg.steps), rho=float(scfg.rho), s_churn=float(scfg.s_churn),
              s_tmin=float(scfg.s_tmin), s_tmax=float(scfg.s_tmax), s_noise=float(scfg.s_noise))


def sample(apply_fn: Callable[..., jax.Array], config, noise: jax.Array, rng: jax.Array, *,
           labels: Optional[jax.Array] = None, null_label: Optional[int] = None,
           trajectory_every: int = 0, trajectory_images: Optional[int] = None,
           variance_noise: Optional[jax.Array] = None,
           classifier_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None):
  """Runs `config.sample`'s DDPM-family sampler from x_T = `noise` [B,H,W,C]: respaces the
  schedule (`solvers.sampling_schedule`), builds the denoiser, dispatches.

  apply_fn(x_t, timesteps [B], labels [B] or None) -> output. Returns x_0 [B, H, W, C], or
  (x_0, loop.Trajectory) of the first `trajectory_images` samples with trajectory_every > 0.
  variance_noise [steps, B, H, W, C]: the per-step noise of ddpm / ddim instead of draws from
  `rng`. sample.clip_denoised=False turns thresholding off; otherwise sample.thresholding
  decides ('auto': `solvers.default_thresholding` of the sampler).
  classifier_fn(x_t, timesteps [B]) -> logits [B, K]: classifier guidance towards `labels` with
  sample.classifier_scale, in the mean form for ddpm and the score form for the other samplers
  (guided-diffusion's p_sample / ddim_sample; sampling/classifier_guidance.py).
  """
  scfg = config.sample
  name = scfg.sampler
  full = schedule(config)
  sched = solvers.sampling_schedule(full, name, int(scfg.steps), str(scfg.spacing))
  thresholding = scfg.thresholding
  if thresholding == 'auto':
    thresholding = solvers.default_thresholding(name)
  denoise = solvers.make_denoiser(
      apply_fn, sched, config.diffusion.ddpm.prediction_type,
      thresholding=thresholding if scfg.clip_denoised else 'none',
      dynamic_threshold_percentile=scfg.dynamic_threshold_percentile, labels=labels,
      null_label=null_label, guidance_scale=scfg.guidance_scale,
      learn_sigma=config.model.learn_sigma,
      use_clipped_model_output=bool(scfg.use_clipped_model_output),
      classifier_fn=classifier_fn, classifier_scale=float(scfg.classifier_scale),
      classifier_form='mean' if name == 'ddpm' else 'score')
  options = _sampler_options(config, full, name, variance_noise)
  if trajectory_images is not None:
    options['trajectory_images'] = trajectory_images
  return solvers.get_sampler(name)(denoise, sched, noise, rng,
                                   trajectory_every=trajectory_every, **options)


def sampling_steps(config) -> int:
  """The sampler's steps (ddpm with sample.steps = 0 and the 'ddimN' / 'a,b,c' spacings fix
  their own count)."""
  scfg = config.sample
  if scfg.sampler in solvers.CONTINUOUS_SAMPLERS:
    return int(scfg.steps)
  return solvers.sampling_schedule(schedule(config), scfg.sampler, int(scfg.steps),
                                   str(scfg.spacing)).num_timesteps


def network_evaluations(config) -> int:
  """Network evaluations per sample, without guidance: heun corrects every step but the last."""
  steps = sampling_steps(config)
  return 2 * steps - 1 if config.sample.sampler == 'heun' else steps


# ---------------------------------------------------------------- likelihood


def probability_flow(apply_fn: Callable[[jax.Array, jax.Array], jax.Array],
                     config) -> base.ProbabilityFlow:
  """The PF-ODE of the schedule read as a continuous VP process on tau in [0, 1] (log abar
  interpolated linearly in the step index, discrete.continuous_log_alphas_cumprod):

    dx/dtau = f(x, tau) = -1/2 beta(tau) (x - eps_hat(x, tau) / sigma(tau)),

  the prior N(0, I) at tau = 1. The network sees the fractional timestep; a learn_sigma output's
  variance half is dropped (the ODE only needs the mean). The density is that of step 0.
  """
  sched = schedule(config)
  prediction_type, learn_sigma = config.diffusion.ddpm.prediction_type, config.model.learn_sigma

  def drift(tau: jax.Array, x: jax.Array) -> jax.Array:
    t_net = jnp.full((x.shape[0],), discrete.network_timestep(sched, tau), jnp.float32)
    output, _ = discrete.split_learned_sigma(apply_fn(x, t_net), learn_sigma)
    log_abar = discrete.continuous_log_alphas_cumprod(sched, tau)
    sigma = jnp.sqrt(-jnp.expm1(log_abar))
    _, eps = discrete.x0_eps_from_scaled(output, x, jnp.exp(0.5 * log_abar), sigma,
                                         prediction_type)
    return -0.5 * discrete.continuous_beta(sched, tau) * (x.astype(jnp.float32) - eps / sigma)
  return base.ProbabilityFlow(drift, t0=0.0, t1=1.0, prior_std=1.0)


# ---------------------------------------------------------------- config


def check_config(config) -> List[str]:
  """Problems with `config.diffusion.ddpm` and the DDPM-family sampler fields of config.sample
  (empty list = fine); each names the field and the fix."""
  errors: List[str] = []
  d = config.diffusion.ddpm
  check_choice(errors, 'diffusion.ddpm.beta_schedule', d.beta_schedule, discrete.BETA_SCHEDULES)
  check_choice(errors, 'diffusion.ddpm.prediction_type', d.prediction_type,
               discrete.PREDICTION_TYPES)
  check_choice(errors, 'diffusion.ddpm.loss_weighting', d.loss_weighting, LOSS_WEIGHTINGS)
  if d.num_timesteps < 2:
    errors.append(f'diffusion.ddpm.num_timesteps={d.num_timesteps} must be >= 2.')
  if d.beta_schedule in ('linear', 'scaled_linear', 'sigmoid') and not (
      0 < d.beta_start < d.beta_end < 1):
    errors.append(f'diffusion.ddpm.beta_start={d.beta_start} and beta_end={d.beta_end} must '
                  'satisfy 0 < beta_start < beta_end < 1.')
  if d.vlb_weight < 0:
    errors.append(f'diffusion.ddpm.vlb_weight={d.vlb_weight} must be >= 0 (0.001 in Nichol & '
                  'Dhariwal).')
  errors.extend(solvers.check_sampler_config(config.sample, config.model, d.num_timesteps))
  return errors
