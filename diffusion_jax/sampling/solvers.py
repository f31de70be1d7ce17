"""Samplers: from noise x_T to images, each one pure function compiled as a single loop.

Every sampler has the signature

  sampler(denoise, schedule, noise, rng, *, trajectory_every=0, trajectory_images=None,
          **options)
      -> x_0                              if trajectory_every == 0
      -> (x_0, Trajectory(x_t, x0))       otherwise, each [K, n, H, W, C], K = ceil(steps / k)

`denoise` wraps the network (see `make_denoiser`): `denoise(x_t, t)` with an int32 index t into
the schedule the sampler is given (shared by the batch), or `denoise(x_t, timestep, sigma=s)` at
a continuous noise level. `noise` is x_T [B, H, W, C] (standard normal), `rng` drives any fresh
noise. The denoiser must be built on the same schedule as the sampler is run on
(`objectives.ddpm.sample` does this); the only exception is `ddim_sample(..., steps=S)` and
`dpm_solver_pp_sample(..., steps=S)`, which respace a full schedule themselves and map the indices
back. Schedules must be concrete (closed over, not jit arguments): every per-step coefficient is
computed in float64 NumPy at trace time. The loop is a `lax.fori_loop` (a scan), so a whole run
is one XLA program; jit the call (with a batch sharding) from outside.

With `trajectory_every` = k > 0 the state after every k-th loop step (and after the last one) is
recorded: x_t, the sample after the step (variance-preserving scale, so x_t[-1] is the output),
and x0, the prediction the step was computed from; only the first n = `trajectory_images` samples
of the batch are recorded (None = all), so the loop carries [K, n, ...] buffers, not [K, B, ...].

ddpm and ddim take `variance_noise` [steps, B, H, W, C] (diffusers' name): the standard normal
noise of every step, used instead of draws from `rng`, e.g. to reproduce another
implementation's run step by step.

Registered names (diffusers' spellings): ddpm, ddim, dpm_solver_pp, euler, heun.
"""

from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.config.errors import check_choice
from diffusion_jax.processes import discrete, respacing
from diffusion_jax.processes.discrete import Schedule
from diffusion_jax.sampling import classifier_guidance, guidance, karras, loop

VARIANCES = ('fixed_small', 'fixed_large', 'learned_range')
THRESHOLDINGS = ('static', 'dynamic', 'none')
# sample.thresholding also takes 'auto': each sampler's diffusers default (`default_thresholding`).
CONFIG_THRESHOLDINGS = ('auto',) + THRESHOLDINGS
DPM_SOLVER_TYPES = ('multistep', 'singlestep')
CONTINUOUS_SAMPLERS = ('euler', 'heun')  # Run on Karras sigmas, not on a respaced schedule.


class Prediction(NamedTuple):
  """What the network says about x_0 and the noise at (x_t, t); all float32 [B, H, W, C].

  log_variance: the learned reverse-step variance (learn_sigma models at schedule indices),
  else None.
  classifier_gradient: s * grad log p(y | x_t) of classifier guidance in its 'mean' form
  (ddpm_sample adds the step's variance times it to the mean), else None.
  """
  x0: jax.Array
  eps: jax.Array
  log_variance: Optional[jax.Array] = None
  classifier_gradient: Optional[jax.Array] = None


Denoiser = Callable[..., Prediction]


# ---------------------------------------------------------------- the denoiser


def dynamic_threshold(x0: jax.Array, percentile: float = 0.995) -> jax.Array:
  """Imagen's dynamic thresholding: x0 -> clip(x0, -s, s) / s, s = max(1, quantile(|x0|, p)).

  The quantile is taken per example over all its values.
  """
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def default_thresholding(sampler: str) -> str:
  """What sample.thresholding='auto' means for `sampler`: what its diffusers scheduler does by
  default. DDPMScheduler and DDIMScheduler clip x0 to [-1, 1] (clip_sample=True);
  DPMSolverMultistepScheduler, EulerDiscreteScheduler and HeunDiscreteScheduler do not."""
  return 'static' if sampler in ('ddpm', 'ddim') else 'none'


def resolve_thresholding(clip_denoised: bool, thresholding: Optional[str]) -> str:
  """`thresholding` if given, else 'static' with `clip_denoised` and 'none' without."""
  if thresholding is None:
    return 'static' if clip_denoised else 'none'
  if thresholding not in THRESHOLDINGS:
    raise ValueError(f'sample.thresholding={thresholding!r} is unknown; use one of '
                     f'{THRESHOLDINGS}.')
  return thresholding


def make_denoiser(apply_fn: Callable[..., jax.Array], schedule: Schedule, prediction_type: str,
                  clip_denoised: bool = True, *, thresholding: Optional[str] = None,
                  dynamic_threshold_percentile: float = 0.995,
                  labels: Optional[jax.Array] = None, null_label: Optional[int] = None,
                  guidance_scale: float = 1.0, learn_sigma: bool = False,
                  takes_labels: Optional[bool] = None,
                  use_clipped_model_output: bool = True,
                  classifier_fn: Optional[classifier_guidance.ClassifierFn] = None,
                  classifier_scale: float = 0.0, classifier_form: str = 'score') -> Denoiser:
  """Turns `apply_fn(x_t, timesteps [B][, labels [B]]) -> output` into a `Denoiser`.

  denoise(x_t, t) -> Prediction: t is an int32 index into `schedule` (shared by the batch); the
    network sees schedule.timesteps[t], and learn_sigma models get
    log_variance = discrete.learned_log_variance(schedule, v, t).
  denoise(x_t, timestep, sigma=s) -> Prediction: at the continuous noise level
    s = sqrt((1 - abar) / abar) (x_t = a x0 + s' eps with a = 1/sqrt(1+s^2), s' = s a); the network
    sees the float `timestep`; log_variance is None.

  thresholding (default 'static' if clip_denoised else 'none'): 'static' clips x0 to [-1, 1],
  'dynamic' applies `dynamic_threshold` with `dynamic_threshold_percentile`. With
  use_clipped_model_output (diffusers' name) eps is recomputed from the thresholded x0,
  eps = (x_t - a x0) / s', so (x0, eps) stay consistent with x_t; without it eps is the model's
  own (diffusers' DDIMScheduler default). Only DDIM uses eps; the other samplers read x0 alone.
  labels / null_label / guidance_scale / learn_sigma / takes_labels: see `make_network_fn`.
  classifier_fn (logits of (x_t, network timesteps)) with classifier_scale s: classifier
  guidance towards `labels` (sampling/classifier_guidance.py), after thresholding as
  guided-diffusion applies it; classifier_form 'score' shifts (x0, eps) by the gradient,
  'mean' returns it as Prediction.classifier_gradient for ddpm_sample's mean.
  """
  if prediction_type not in discrete.PREDICTION_TYPES:
    raise ValueError(f'diffusion.ddpm.prediction_type={prediction_type!r} is unknown; '
                     f'use one of {discrete.PREDICTION_TYPES}.')
  method = resolve_thresholding(clip_denoised, thresholding)
  if method == 'dynamic' and not 0.0 < dynamic_threshold_percentile <= 1.0:
    raise ValueError(f'sample.dynamic_threshold_percentile={dynamic_threshold_percentile} '
                     'must be in (0, 1].')
  if classifier_form not in classifier_guidance.FORMS:
    raise ValueError(f'classifier_form={classifier_form!r} is unknown; use one of '
                     f'{classifier_guidance.FORMS}.')
  classifier_guidance.guided_labels(labels, classifier_fn)
  net = guidance.make_network_fn(apply_fn, labels=labels, null_label=null_label,
                        guidance_scale=guidance_scale, learn_sigma=learn_sigma,
                        takes_labels=takes_labels)

  def denoise(x_t: jax.Array, t: jax.Array, sigma: Optional[jax.Array] = None) -> Prediction:
    x_t = x_t.astype(jnp.float32)
    batch = x_t.shape[0]
    if sigma is None:
      t = jnp.asarray(t, jnp.int32)
      timesteps = jnp.full((batch,), schedule.timesteps[t], jnp.int32)
      a, s = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
    else:
      timesteps = jnp.full((batch,), t, jnp.float32)
      a = jax.lax.rsqrt(1.0 + jnp.square(jnp.asarray(sigma, jnp.float32)))
      s = sigma * a
    output, v = net(x_t, timesteps)
    x0, eps = discrete.x0_eps_from_scaled(output, x_t, a, s, prediction_type)
    if method != 'none':
      x0 = (jnp.clip(x0, -1.0, 1.0) if method == 'static'
            else dynamic_threshold(x0, dynamic_threshold_percentile))
      if use_clipped_model_output:
        eps = (x_t - a * x0) / s
    log_var = None
    if v is not None and sigma is None:
      log_var = discrete.learned_log_variance(schedule, v, jnp.full((batch,), t, jnp.int32))
    gradient = None
    if classifier_fn is not None:
      gradient = classifier_scale * classifier_guidance.log_prob_gradient(
          classifier_fn, x_t, timesteps, labels)
      if classifier_form == 'score':
        x0, eps = classifier_guidance.guide_score(x0, eps, gradient, a, s)
        gradient = None
    return Prediction(x0, eps, log_var, gradient)
  return denoise


# ---------------------------------------------------------------- shared machinery


def _np(a: jax.Array) -> np.ndarray:
  """A schedule array in float64 NumPy (schedules must be concrete, see the module docstring)."""
  if isinstance(a, jax.core.Tracer):
    raise ValueError('samplers need a concrete schedule: close over it instead of passing it '
                     'through jit as an argument.')
  return np.asarray(a, np.float64)


def _f32(a) -> jax.Array:
  return jnp.asarray(a, jnp.float32)


def spacing_convention(sampler: str) -> str:
  """diffusers' reading of sample.spacing linspace / leading for `sampler` (see respacing)."""
  return 'dpm_solver' if sampler == 'dpm_solver_pp' else 'ddim'


def _respaced(denoise: Denoiser, schedule: Schedule, steps: Optional[int], spacing: str,
              convention: str = 'ddim') -> Tuple[Denoiser, Schedule]:
  """(denoise, schedule) on `steps` respaced steps; the denoiser keeps the original indices."""
  if steps is None:
    return denoise, schedule
  kept = respacing.respaced_timesteps(schedule.num_timesteps, steps, spacing, convention)
  if len(kept) == schedule.num_timesteps:
    return denoise, schedule
  original = jnp.asarray(kept, jnp.int32)

  def respaced_denoise(x_t, t, sigma=None):
    return denoise(x_t, original[t]) if sigma is None else denoise(x_t, t, sigma=sigma)
  return respaced_denoise, respacing.respace(schedule, kept)


def _step_noise(rng: jax.Array, variance_noise: Optional[jax.Array], num_steps: int,
                shape) -> Callable[[jax.Array], jax.Array]:
  """z_i of loop step i: variance_noise[i] when given ([num_steps, *shape]), else from `rng`."""
  if variance_noise is None:
    return lambda i: loop.step_normal(rng, i, shape)
  if tuple(variance_noise.shape) != (num_steps,) + tuple(shape):
    raise ValueError(f'variance_noise has shape {tuple(variance_noise.shape)}; it must be '
                     f'[steps, B, H, W, C] = {(num_steps,) + tuple(shape)}.')
  return lambda i: variance_noise[i].astype(jnp.float32)


# ---------------------------------------------------------------- DDPM and DDIM


def ddpm_sample(denoise: Denoiser, schedule: Schedule, noise: jax.Array, rng: jax.Array, *,
                variance: str = 'fixed_small', trajectory_every: int = 0,
                trajectory_images: Optional[int] = None,
                variance_noise: Optional[jax.Array] = None, **unused):
  """Ancestral sampling (Ho et al.) over every step of `schedule` (respace it for fewer steps).

  x_{t-1} = c1_t x0_hat + c2_t x_t + sigma_t z, the posterior mean of `discrete.q_posterior`;
  sigma_t^2: 'fixed_small' beta~_t, 'fixed_large' beta_t (beta~_1 at t = 0, as guided-diffusion),
  'learned_range' exp(Prediction.log_variance) of a learn_sigma model. No noise at the last step.
  Classifier guidance in the mean form (Prediction.classifier_gradient g) adds Sigma_t g, Sigma_t
  the step's variance before the last-step cut (guided-diffusion's condition_mean: beta~_t,
  which is 0 at t = 0, for fixed_small; [beta~_1, beta_1..] for fixed_large; the learned one).
  z of loop step i is variance_noise[i] if given ([steps, B, H, W, C]), else drawn from `rng`.
  Options other than `variance` (e.g. steps) are ignored.
  """
  del unused
  if variance not in VARIANCES:
    raise ValueError(f'sample.variance={variance!r} is unknown; use one of {VARIANCES}.')
  n = schedule.num_timesteps
  post_var, betas = _np(schedule.posterior_variance), _np(schedule.betas)
  if variance == 'fixed_small':
    std = np.exp(0.5 * _np(schedule.posterior_log_variance_clipped))
    var = post_var
  else:
    var = np.append(post_var[1] if n > 1 else betas[0], betas[1:])
    std = np.sqrt(var)
  std[0] = 0.0
  std, var, coef1 = _f32(std), _f32(var), _f32(schedule.posterior_mean_coef1)
  coef2 = _f32(schedule.posterior_mean_coef2)
  z_of = _step_noise(rng, variance_noise, n, noise.shape)

  def step(i, carry):
    (x,) = carry
    t = n - 1 - i
    pred = denoise(x, t)
    if variance == 'learned_range':
      if pred.log_variance is None:
        raise ValueError("sample.variance='learned_range' needs a model trained with "
                         'model.learn_sigma=True (and make_denoiser(..., learn_sigma=True)).')
      sigma = jnp.where(t > 0, jnp.exp(0.5 * pred.log_variance), 0.0)
    else:
      sigma = std[t]
    mean = coef1[t] * pred.x0 + coef2[t] * x
    if pred.classifier_gradient is not None:
      step_var = jnp.exp(pred.log_variance) if variance == 'learned_range' else var[t]
      mean = mean + step_var * pred.classifier_gradient
    x = mean + sigma * z_of(i)
    return (x,), x, pred.x0

  return loop.run_loop(step, (noise.astype(jnp.float32),), n, trajectory_every, trajectory_images)


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """The DDIM paper's 'uniform' subsequence 0, k, 2k, ... with k = T // steps (ascending)."""
  return respacing.respaced_timesteps(num_timesteps, steps, 'leading')


def ddim_sample(denoise: Denoiser, schedule: Schedule, noise: jax.Array, rng: jax.Array, *,
                steps: Optional[int] = None, eta: float = 0.0, spacing: str = 'leading',
                set_alpha_to_one: bool = True, final_alpha_cumprod: Optional[float] = None,
                trajectory_every: int = 0, trajectory_images: Optional[int] = None,
                variance_noise: Optional[jax.Array] = None, **unused):
  """DDIM (Song et al. 2021) over every step of `schedule`; eta = 0 deterministic, 1 DDPM-like.

  x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
  sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev). At the last step
  abar_prev = 1 with set_alpha_to_one (diffusers' DDIMScheduler default), else abar of training
  step 0: `final_alpha_cumprod` if given (needed when `schedule` is respaced without step 0),
  else abar at index 0 of `schedule` as passed in. With `steps` < schedule length the schedule
  is first respaced with `spacing` ('leading' = the paper's uniform 0, k, 2k, ...). eta may be
  traced. z of loop step i is variance_noise[i] if given ([steps, B, H, W, C]), else from `rng`.
  """
  del unused
  if not set_alpha_to_one and final_alpha_cumprod is None:
    final_alpha_cumprod = float(respacing.alphas_cumprod64(schedule)[0])
  final = 1.0 if set_alpha_to_one else float(final_alpha_cumprod)
  denoise, schedule = _respaced(denoise, schedule, steps, spacing)
  n = schedule.num_timesteps
  abar = respacing.alphas_cumprod64(schedule)
  abar_prev = np.append(final, abar[:-1])
  # sigma^2 = eta^2 (1 - abar_prev) r with r = (1 - abar / abar_prev) / (1 - abar) in [0, 1], so
  # the eps coefficient sqrt(1 - abar_prev - sigma^2) = sqrt((1 - abar_prev)(1 - eta^2 r)): a
  # product, not a difference of nearly equal float32 numbers (which is ~0.5% off at the last
  # steps). With a static eta every coefficient is computed in float64.
  ratio = (1 - abar / abar_prev) / (1 - abar)
  static_eta = guidance.static_float(eta)
  noiseless = static_eta == 0.0
  if static_eta is not None:
    sigma_of = _f32(static_eta * np.sqrt((1 - abar_prev) * ratio))
    eps_coef_of = _f32(np.sqrt((1 - abar_prev) * np.maximum(1 - static_eta**2 * ratio, 0.0)))
    coefficients = lambda t: (sigma_of[t], eps_coef_of[t])
  else:
    one_minus_prev, ratio32 = _f32(1 - abar_prev), _f32(ratio)
    coefficients = lambda t: (eta * jnp.sqrt(one_minus_prev[t] * ratio32[t]), jnp.sqrt(
        one_minus_prev[t] * jnp.maximum(1.0 - eta**2 * ratio32[t], 0.0)))
  sqrt_prev = _f32(np.sqrt(abar_prev))
  z_of = _step_noise(rng, variance_noise, n, noise.shape)

  def step(i, carry):
    (x,) = carry
    t = n - 1 - i
    pred = denoise(x, t)
    sigma, eps_coef = coefficients(t)
    x = sqrt_prev[t] * pred.x0 + eps_coef * pred.eps
    if not noiseless:
      x = x + sigma * z_of(i)
    return (x,), x, pred.x0

  return loop.run_loop(step, (noise.astype(jnp.float32),), n, trajectory_every, trajectory_images)


# ---------------------------------------------------------------- DPM-Solver++


def dpm_solver_coefficients(alphas_cumprod_desc: np.ndarray, solver_order: int = 2,
                            solver_type: str = 'multistep') -> np.ndarray:
  """Per-step weights W [S, 5] of DPM-Solver++ (Lu et al. 2022) on S grid points.

  Grid point i (noise decreasing) has alpha_i = sqrt(abar_i), sigma_i = sqrt(1 - abar_i),
  lambda_i = log(alpha_i / sigma_i); point S is the clean sample (sigma = 0, lambda = inf). Loop
  step i evaluates D_i = x0_hat(x_i) and sets

    x_next = W[i] . (x_i, x_{i-1}, D_i, D_{i-1}, D_{i-2}).

  With h = lambda_{i+1} - lambda_i and q = alpha_{i+1} (1 - e^{-h}):
    order 1:  x_{i+1} = (sigma_{i+1} / sigma_i) x_i + q D_i        (= DDIM; x_S = D_{S-1})
    2M:       D_i -> D_i + (D_i - D_{i-1}) / (2r),  r = (lambda_i - lambda_{i-1}) / h
    3M:       + alpha_{i+1} (h - 1 + e^{-h}) D' + alpha_{i+1} (h^2/2 - h + 1 - e^{-h}) D'',
              D' and D'' the derivatives in lambda from the divided differences of D_i, D_{i-1},
              D_{i-2} (the Taylor expansion of the exact solution, third order).
    2S:       pairs of steps (i, i+1): step i goes to x_{i+1} by order 1 (the midpoint u), step
              i+1 from x_i to x_{i+2} with h = lambda_{i+2} - lambda_i, r = (lambda_{i+1} -
              lambda_i) / h: (sigma_{i+2} / sigma_i) x_i + q D_i + q / (2r) (D_{i+1} - D_i).
  Orders drop at the start (no history) and at the end (min(order, S - i)): the last step is
  first order, straight to the clean sample.
  """
  if solver_order not in (1, 2, 3):
    raise ValueError(f'sample.solver_order={solver_order} must be 1, 2 or 3.')
  if solver_type not in DPM_SOLVER_TYPES:
    raise ValueError(f'sample.solver_type={solver_type!r} is unknown; use one of '
                     f'{DPM_SOLVER_TYPES}.')
  if solver_type == 'singlestep' and solver_order > 2:
    raise ValueError(f'sample.solver_order={solver_order} is not available with '
                     "sample.solver_type='singlestep'; use 1 or 2 (DPM-Solver++(2S)).")
  abar = np.asarray(alphas_cumprod_desc, np.float64)
  n = len(abar)
  alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
  lam = np.log(alpha) - np.log(sigma)
  w = np.zeros((n, 5))

  def first_order(src, dst):
    """(coefficient of x_src, q) of the order-1 step from grid point src to dst."""
    if dst == n:
      return 0.0, 1.0
    h = lam[dst] - lam[src]
    return sigma[dst] / sigma[src], -alpha[dst] * np.expm1(-h)

  if solver_type == 'singlestep':
    pairs = (n - 1) // 2 if solver_order == 2 else 0
    for i in range(n):
      if i < 2 * pairs and i % 2 == 1:  # Second step of a pair: x_{i-1} -> x_{i+1}.
        cx, q = first_order(i - 1, i + 1)
        r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i - 1])
        w[i] = (0.0, cx, q / (2 * r), q * (1 - 1 / (2 * r)), 0.0)
      else:
        cx, q = first_order(i, i + 1)
        w[i] = (cx, 0.0, q, 0.0, 0.0)
    return w

  for i in range(n):
    order = min(solver_order, i + 1, n - i)
    cx, q = first_order(i, i + 1)
    w[i, 0], w[i, 2] = cx, q
    if order == 2:
      r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
      w[i, 2:4] += (q / (2 * r), -q / (2 * r))
    elif order == 3:
      h, h0, h1 = lam[i + 1] - lam[i], lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2]
      dd0 = np.array([1.0, -1.0, 0.0]) / h0
      dd1 = np.array([0.0, 1.0, -1.0]) / h1
      d2 = 2.0 * (dd0 - dd1) / (h0 + h1)
      d1 = dd0 + 0.5 * h0 * d2
      phi1 = h + np.expm1(-h)                     # h - 1 + e^{-h}
      phi2 = 0.5 * h * h - phi1                   # h^2/2 - h + 1 - e^{-h}
      w[i, 2:5] += alpha[i + 1] * (phi1 * d1 + phi2 * d2)
  return w


def dpm_solver_pp_sample(denoise: Denoiser, schedule: Schedule, noise: jax.Array,
                         rng: jax.Array, *, solver_order: int = 2,
                         solver_type: str = 'multistep', steps: Optional[int] = None,
                         spacing: str = 'linspace', trajectory_every: int = 0,
                         trajectory_images: Optional[int] = None, **unused):
  """DPM-Solver++ (data prediction, in lambda) over every step of `schedule`, then to x_0.

  solver_order 2 / 3 with 'multistep' (2M default, 3M), or 2 with 'singlestep' (2S); see
  `dpm_solver_coefficients`. One model evaluation per schedule step. With `steps` < schedule
  length the schedule is first respaced with `spacing`, read as diffusers'
  DPMSolverMultistepScheduler does (linspace: 999, 949, ..., 50 for 20 of 1000 steps; see
  respacing). Deterministic: `rng` is unused.
  """
  del unused, rng
  denoise, schedule = _respaced(denoise, schedule, steps, spacing, 'dpm_solver')
  n = schedule.num_timesteps
  w = _f32(dpm_solver_coefficients(respacing.alphas_cumprod64(schedule)[::-1], solver_order,
                                   solver_type))

  def step(i, carry):
    x, x_prev, d_prev, d_prev2 = carry
    pred = denoise(x, n - 1 - i)
    c = w[i]
    x_next = c[0] * x + c[1] * x_prev + c[2] * pred.x0 + c[3] * d_prev + c[4] * d_prev2
    return (x_next, x, pred.x0, d_prev), x_next, pred.x0

  x = noise.astype(jnp.float32)
  zeros = jnp.zeros_like(x)
  return loop.run_loop(step, (x, zeros, zeros, zeros), n, trajectory_every, trajectory_images)


# ---------------------------------------------------------------- Karras / EDM samplers


def schedule_sigmas(schedule: Schedule) -> np.ndarray:
  """sigma_t = sqrt((1 - abar_t) / abar_t) of every schedule index (float64, ascending)."""
  abar = respacing.alphas_cumprod64(schedule)
  return np.sqrt((1.0 - abar) / abar)


def sigma_to_timestep(schedule: Schedule, sigmas: np.ndarray) -> np.ndarray:
  """Network timesteps (float64) of noise levels: linear in log sigma between schedule steps.

  Clamped to the schedule's first / last timestep outside [sigma_min, sigma_max].
  """
  log_sigmas = np.log(schedule_sigmas(schedule))
  return np.interp(np.log(np.maximum(sigmas, 1e-20)), log_sigmas,
                   np.asarray(schedule.timesteps, np.float64))


def _karras_sample(denoise: Denoiser, schedule: Schedule, noise: jax.Array, rng: jax.Array, *,
                   heun: bool, steps: int, rho: float, s_churn: float, s_tmin: float,
                   s_tmax: float, s_noise: float, trajectory_every: int,
                   trajectory_images: Optional[int]):
  """EDM's Algorithm 2 (Heun) or its Euler variant on x = x0 + sigma eps (see `euler_sample`):
  `karras_loop` with D(x; sigma) the model at x / sqrt(1 + sigma^2) and the interpolated
  timestep of sigma."""
  all_sigmas = schedule_sigmas(schedule)
  sig = karras.karras_sigmas(all_sigmas[0], all_sigmas[-1], int(steps), rho)

  def x0_of(x, sigma, timestep):
    return denoise(x * jax.lax.rsqrt(1.0 + sigma**2), timestep, sigma=sigma).x0

  x = noise.astype(jnp.float32) * float(np.sqrt(1.0 + sig[0]**2))
  return karras.karras_loop(x0_of, sig, x, rng, heun=heun, s_churn=s_churn, s_tmin=s_tmin,
                     s_tmax=s_tmax, s_noise=s_noise, sigma_floor=float(all_sigmas[0]),
                     timestep_of=lambda s: sigma_to_timestep(schedule, s),
                     trajectory_every=trajectory_every, trajectory_images=trajectory_images)


def euler_sample(denoise: Denoiser, schedule: Schedule, noise: jax.Array, rng: jax.Array, *,
                 steps: int = 50, rho: float = 7.0, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float('inf'), s_noise: float = 1.0, trajectory_every: int = 0,
                 trajectory_images: Optional[int] = None, **unused):
  """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022).

  x = x_t / sqrt(abar) = x0 + sigma eps with sigma = sqrt((1 - abar) / abar); `steps` Karras
  sigmas (`karras_sigmas`, rho) from the schedule's sigma_max to sigma_min, then 0. The start is
  x = noise sqrt(1 + sigma_max^2), i.e. x_t = noise at sigma_max, as for the discrete samplers.
  D(x, sigma) is the model at the network input x / sqrt(1 + sigma^2) and the float timestep
  interpolated in log sigma (`sigma_to_timestep`). Stochastic churn (EDM): for s_tmin <= sigma_i
  <= s_tmax, sigma_hat = sigma_i (1 + gamma), gamma = min(s_churn / steps, sqrt(2) - 1), and
  x += s_noise sqrt(sigma_hat^2 - sigma_i^2) z before the step. One model call per step.
  """
  del unused
  return _karras_sample(denoise, schedule, noise, rng, heun=False, steps=steps, rho=rho,
                        s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                        trajectory_every=trajectory_every,
                        trajectory_images=trajectory_images)


def heun_sample(denoise: Denoiser, schedule: Schedule, noise: jax.Array, rng: jax.Array, *,
                steps: int = 50, rho: float = 7.0, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float('inf'), s_noise: float = 1.0, trajectory_every: int = 0,
                trajectory_images: Optional[int] = None, **unused):
  """Heun's second-order method (EDM Algorithm 2) on the ODE of `euler_sample`.

  x_e = x + (sigma_{i+1} - sigma_hat) d,  x_{i+1} = x + (sigma_{i+1} - sigma_hat) (d + d(x_e)) / 2,
  with the plain Euler step into sigma = 0. 2 steps - 1 model calls.
  """
  del unused
  return _karras_sample(denoise, schedule, noise, rng, heun=True, steps=steps, rho=rho,
                        s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                        trajectory_every=trajectory_every,
                        trajectory_images=trajectory_images)


# ---------------------------------------------------------------- registry and config entry


SAMPLERS = {
    'ddpm': ddpm_sample,
    'ddim': ddim_sample,
    'dpm_solver_pp': dpm_solver_pp_sample,
    'euler': euler_sample,
    'heun': heun_sample,
}


def get_sampler(name: str) -> Callable[..., Any]:
  """The sampler registered as `name`, or a ValueError naming `sample.sampler`."""
  if name not in SAMPLERS:
    raise ValueError(f'sample.sampler={name!r} is unknown; use one of {sorted(SAMPLERS)}.')
  return SAMPLERS[name]


def sampling_schedule(schedule: Schedule, sampler: str, steps: int, spacing: str) -> Schedule:
  """The schedule a discrete sampler runs on: `schedule` respaced to `steps` with `spacing`.

  ddpm with steps 0 runs on the full schedule; 'ddimN' / 'a,b,c' spacings fix the steps;
  euler / heun always get the full schedule (they pick their own sigmas). linspace / leading
  follow the sampler's diffusers scheduler (`spacing_convention`).
  """
  if sampler in CONTINUOUS_SAMPLERS:
    return schedule
  if not respacing.is_section_spacing(spacing) and sampler == 'ddpm' and not steps:
    return schedule
  kept = respacing.respaced_timesteps(schedule.num_timesteps, steps, spacing,
                                      spacing_convention(sampler))
  if len(kept) == schedule.num_timesteps:
    return schedule
  return respacing.respace(schedule, kept)


def check_sampler_config(sample_config, model_config, num_timesteps: int) -> List[str]:
  """Problems with the sampling algorithm in `config.sample` (sampler, steps, spacing, guidance,
  thresholding, solver, EDM churn, class labels) for `model_config` trained on `num_timesteps`
  steps (empty list = fine). Device-independent; each message names the field and the fix."""
  errors: List[str] = []
  if sample_config.sampler not in SAMPLERS:
    errors.append(f'sample.sampler={sample_config.sampler!r} is unknown; use one of '
                  f'{tuple(sorted(SAMPLERS))}.')
  check_choice(errors, 'sample.variance', sample_config.variance, VARIANCES)
  if (sample_config.sampler == 'ddpm' and sample_config.variance == 'learned_range'
      and not model_config.learn_sigma):
    errors.append("sample.variance='learned_range' needs a model trained with "
                  'model.learn_sigma=True; use fixed_small or fixed_large.')
  spacing = sample_config.spacing
  if sample_config.sampler in CONTINUOUS_SAMPLERS:
    if sample_config.steps < 1:
      errors.append(f'sample.steps={sample_config.steps} must be >= 1 for sample.sampler='
                    f'{sample_config.sampler!r}.')
  elif not (sample_config.sampler == 'ddpm' and sample_config.steps == 0
            and isinstance(spacing, str) and not respacing.is_section_spacing(spacing)):
    try:  # Checks sample.spacing and sample.steps (ddpm with steps 0 uses all T steps).
      respacing.respaced_timesteps(num_timesteps, sample_config.steps, spacing,
                                   spacing_convention(sample_config.sampler))
    except ValueError as e:
      errors.append(str(e))
  errors.extend(guidance.check_guidance_and_labels(sample_config, model_config))
  check_choice(errors, 'sample.thresholding', sample_config.thresholding,
                         CONFIG_THRESHOLDINGS)
  if sample_config.thresholding == 'dynamic' and not sample_config.clip_denoised:
    errors.append("sample.clip_denoised=False turns thresholding off, contradicting "
                  "sample.thresholding='dynamic'; set clip_denoised=True or thresholding='none'.")
  percentile = sample_config.dynamic_threshold_percentile
  if not 0.0 < percentile <= 1.0:
    errors.append(f'sample.dynamic_threshold_percentile={percentile} must be in (0, 1].')
  check_choice(errors, 'sample.solver_type', sample_config.solver_type, DPM_SOLVER_TYPES)
  if sample_config.solver_order not in (1, 2, 3):
    errors.append(f'sample.solver_order={sample_config.solver_order} must be 1, 2 or 3.')
  elif sample_config.solver_type == 'singlestep' and sample_config.solver_order == 3:
    errors.append("sample.solver_order=3 is only available with sample.solver_type="
                  "'multistep'; use 2 for singlestep (DPM-Solver++(2S)).")
  errors.extend(karras.check_karras_config(sample_config))
  if not 0.0 <= sample_config.eta <= 1.0:
    errors.append(f'sample.eta={sample_config.eta} must be in [0, 1].')
  return errors


