"""The diffusion math: noise schedules, the forward process, posteriors and the training loss.

Everything here is a pure function over a `Schedule` pytree and never touches the network, so it
can be tested against closed forms and reused by every sampler. All schedule quantities are
computed in float64 with NumPy and stored as float32, and every function casts its inputs to
float32, whatever dtype the network computes in.

Notation (Ho et al. 2020): beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s, with
t = 0 .. T-1 indexing the arrays (index 0 is the first noising step).

  q(x_t | x_0)       = N(sqrt(abar_t) x_0, (1 - abar_t) I)
  q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I),
      c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t),
      beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t),  with abar_{-1} = 1.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np


BETA_SCHEDULES = ('linear', 'cosine', 'scaled_linear', 'sigmoid')
PREDICTION_TYPES = ('epsilon', 'x0', 'v')


@flax.struct.dataclass
class Schedule:
  """Per-timestep constants of a discrete diffusion process; float32 [T] except `timesteps`.

  `timesteps` (int32 [T]) is the network's timestep input for each index: arange(T) for the
  training schedule, the kept original steps for a respaced one.
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  timesteps: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def beta_schedule(name: str, num_timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> np.ndarray:
  """Returns float64 betas [T] of a named schedule.

  linear: Ho et al.; scaled_linear: linear in sqrt(beta) (Stable Diffusion);
  cosine: Nichol & Dhariwal, abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008, betas <= 0.999;
  sigmoid: beta_start + (beta_end - beta_start) * sigmoid(linspace(-6, 6, T)).
  """
  if name == 'linear':
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  if name == 'scaled_linear':
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64)**2
  if name == 'cosine':
    return cosine_betas(num_timesteps)
  if name == 'sigmoid':
    x = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return beta_start + (beta_end - beta_start) / (1.0 + np.exp(-x))
  raise ValueError(f'diffusion.ddpm.beta_schedule={name!r} is unknown; use one of {BETA_SCHEDULES}.')


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the cosine schedule: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)."""
  def abar(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2)**2
  return np.array([
      min(1.0 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
      for i in range(num_timesteps)
  ], dtype=np.float64)


def schedule_from_betas(betas: np.ndarray, timesteps: Optional[np.ndarray] = None) -> Schedule:
  """Builds a `Schedule` from betas [T] (computed in float64, stored as float32).

  `timesteps` are the network inputs of the T steps (default arange(T)).
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
    raise ValueError('betas must be a 1-D array with every value in (0, 1).')
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  # beta~_0 = 0; the log uses beta~_1 there, as guided-diffusion does, to stay finite.
  post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
      betas=f32(betas),
      alphas_cumprod=f32(abar),
      alphas_cumprod_prev=f32(abar_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(abar)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
      posterior_variance=f32(post_var),
      posterior_log_variance_clipped=f32(post_log_var),
      posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
      posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
      timesteps=jnp.asarray(np.arange(len(betas)) if timesteps is None else timesteps, jnp.int32),
  )


def make_schedule(diffusion_config) -> Schedule:
  """The schedule described by `config.diffusion`."""
  return schedule_from_betas(beta_schedule(
      diffusion_config.beta_schedule, diffusion_config.num_timesteps,
      diffusion_config.beta_start, diffusion_config.beta_end))


def extract(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] for a scalar or per-example t [B], shaped to broadcast against a rank-`ndim` batch."""
  out = jnp.take(values, jnp.asarray(t, jnp.int32))
  return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array
                   ) -> Tuple[jax.Array, jax.Array]:
  """Mean and variance of q(x_t | x_0)."""
  x0 = x0.astype(jnp.float32)
  mean = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
  var = extract(jnp.square(schedule.sqrt_one_minus_alphas_cumprod), t, x0.ndim)  # float64-derived.
  return mean, jnp.broadcast_to(var, x0.shape)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) given standard normal `noise`: sqrt(abar) x0 + sqrt(1-abar) noise."""
  x0 = x0.astype(jnp.float32)
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0 +
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise.astype(jnp.float32))


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
               ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
  x0, x_t = x0.astype(jnp.float32), x_t.astype(jnp.float32)
  mean = (extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0 +
          extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
  var = jnp.broadcast_to(extract(schedule.posterior_variance, t, x_t.ndim), x_t.shape)
  log_var = jnp.broadcast_to(
      extract(schedule.posterior_log_variance_clipped, t, x_t.ndim), x_t.shape)
  return mean, var, log_var


def v_from_x0_eps(schedule: Schedule, t: jax.Array, x0: jax.Array, eps: jax.Array) -> jax.Array:
  """The velocity target of Salimans & Ho: v = sqrt(abar) eps - sqrt(1 - abar) x0."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps -
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def x0_eps_from_scaled(output: jax.Array, x_t: jax.Array, a: jax.Array, s: jax.Array,
                       prediction_type: str) -> Tuple[jax.Array, jax.Array]:
  """(x0, eps) implied by a network output where x_t = a x0 + s eps, in float32.

  a = sqrt(abar), s = sqrt(1 - abar) (broadcastable to x_t; any noise level, discrete or
  continuous). epsilon: x0 = (x_t - s eps) / a; x0: eps = (x_t - a x0) / s;
  v = a eps - s x0 (Salimans & Ho): x0 = a x_t - s v, eps = s x_t + a v.
  The one conversion every caller (loss, samplers, likelihood) uses.
  """
  output, x_t = output.astype(jnp.float32), x_t.astype(jnp.float32)
  if prediction_type == 'epsilon':
    return (x_t - s * output) / a, output
  if prediction_type == 'x0':
    return output, (x_t - a * output) / s
  if prediction_type == 'v':
    return a * x_t - s * output, s * x_t + a * output
  raise ValueError(f'diffusion.ddpm.prediction_type={prediction_type!r} is unknown; '
                   f'use one of {PREDICTION_TYPES}.')


def x0_eps_from_output(schedule: Schedule, output: jax.Array, x_t: jax.Array, t: jax.Array,
                       prediction_type: str) -> Tuple[jax.Array, jax.Array]:
  """Converts a network output of `prediction_type` at training steps t [B] to (x0, eps)."""
  return x0_eps_from_scaled(output, x_t, extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim),
                            extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim),
                            prediction_type)


def split_learned_sigma(output: jax.Array, learn_sigma: bool
                        ) -> Tuple[jax.Array, Optional[jax.Array]]:
  """Splits a `learn_sigma` network output [..., 2C] into (prediction [..., C], v [..., C])."""
  if not learn_sigma:
    return output, None
  prediction, v = jnp.split(output, 2, axis=-1)
  return prediction, v


def learned_log_variance(schedule: Schedule, v: jax.Array, t: jax.Array) -> jax.Array:
  """Improved-DDPM variance: log sigma^2 = f log beta_t + (1 - f) log beta~_t, f = (v + 1) / 2."""
  frac = (v.astype(jnp.float32) + 1.0) / 2.0
  max_log = extract(jnp.log(schedule.betas), t, v.ndim)
  min_log = extract(schedule.posterior_log_variance_clipped, t, v.ndim)
  return frac * max_log + (1.0 - frac) * min_log


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio abar_t / (1 - abar_t)."""
  abar = jnp.take(schedule.alphas_cumprod, t)
  # 1 - abar from its float64-derived square root: float32 1 - abar loses digits near t = 0.
  return abar / jnp.square(jnp.take(schedule.sqrt_one_minus_alphas_cumprod, t))


# ---------------------------------------------------------------- variational bound
#
# Nichol & Dhariwal (2021): the reverse process p(x_{t-1} | x_t) = N(mu_theta, Sigma_theta) and
# the terms of the variational bound -log p(x_0) <= L_T + sum_{t>=1} L_{t} + L_0, with
#   L_T = KL(q(x_T | x_0) || N(0, I)),
#   L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))  for t >= 1 (index t here is t+1 there),
#   L_0 = -log p(x_0 | x_1), a Gaussian discretised to the 256 levels of 8-bit data.
# Every term is returned per example in bits per dimension: the sum over the D = H*W*C
# dimensions divided by D ln 2, so that the terms add up to the bound in bits/dim.

VARIANCE_TYPES = ('fixed_small', 'fixed_large')


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
              ) -> jax.Array:
  """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (arguments broadcast).

    KL = 1/2 [logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2) - 1]
  """
  mean1, logvar1, mean2, logvar2 = (jnp.asarray(a, jnp.float32)
                                    for a in (mean1, logvar1, mean2, logvar2))
  return 0.5 * (logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2) - 1.0)


def _log_normal_mass(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """log(Phi(hi) - Phi(lo)) for lo <= hi, accurate in both tails.

  An interval in the upper tail is reflected to the lower one (Phi(hi) - Phi(lo) =
  Phi(-lo) - Phi(-hi)), where log Phi(hi) + log(1 - e^(log Phi(lo) - log Phi(hi))) loses
  nothing to cancellation. Both branches stay finite, so gradients never see a NaN.
  """
  upper = (lo + hi) > 0
  lo, hi = jnp.where(upper, -hi, lo), jnp.where(upper, -lo, hi)
  log_hi, log_lo = jax.scipy.special.log_ndtr(hi), jax.scipy.special.log_ndtr(lo)
  return log_hi + jnp.log(-jnp.expm1(jnp.minimum(log_lo - log_hi, -1e-20)))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array
                                        ) -> jax.Array:
  """Elementwise log-probability (nats) of 8-bit data `x` in [-1, 1] under a discretised Gaussian.

  The 256 levels x_k = k / 127.5 - 1 own the bins [x_k - 1/255, x_k + 1/255] (width 2/255),
  except that the two edge bins are open-ended:

    log P(x) = log Phi((x + 1/255 - mean) / s)                  x = -1 (below -0.999)
             = log(1 - Phi((x - 1/255 - mean) / s))            x = +1 (above +0.999)
             = log(Phi((x + 1/255 - mean) / s) - Phi((x - 1/255 - mean) / s))   otherwise,

  with s = exp(log_scale) the standard deviation. Arguments broadcast.
  """
  x, mean, log_scale = (jnp.asarray(a, jnp.float32) for a in (x, mean, log_scale))
  inv_std = jnp.exp(-log_scale)
  half_bin = 1.0 / 255.0
  lo = (x - mean - half_bin) * inv_std
  hi = (x - mean + half_bin) * inv_std
  log_below = jax.scipy.special.log_ndtr(hi)   # Mass of (-inf, hi].
  log_above = jax.scipy.special.log_ndtr(-lo)  # Mass of [lo, +inf).
  return jnp.where(x < -0.999, log_below,
                   jnp.where(x > 0.999, log_above, _log_normal_mass(lo, hi)))


def fixed_log_variance(schedule: Schedule, t: jax.Array, ndim: int,
                       variance: str = 'fixed_small') -> jax.Array:
  """log sigma_t^2 of a fixed reverse variance, shaped to broadcast against rank-`ndim` arrays.

  fixed_small: beta~_t (the true posterior variance; beta~_1 at t = 0 where beta~_0 = 0);
  fixed_large: beta_t (with beta~_1 at t = 0, as improved-diffusion, so the decoder stays sharp).
  """
  if variance == 'fixed_small':
    return extract(schedule.posterior_log_variance_clipped, t, ndim)
  if variance == 'fixed_large':
    log_var = jnp.log(jnp.append(schedule.posterior_variance[1:2], schedule.betas[1:]))
    return extract(log_var, t, ndim)
  raise ValueError(f'variance={variance!r} is unknown; use one of {VARIANCE_TYPES}.')


def p_mean_variance(schedule: Schedule, output: jax.Array, x_t: jax.Array, t: jax.Array,
                    prediction_type: str, learn_sigma: bool, variance: str = 'fixed_small',
                    clip_denoised: bool = False) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The reverse step p(x_{t-1} | x_t) = N(mean, e^log_var) a network output implies.

  output: [B, ..., C] (or [B, ..., 2C] with `learn_sigma`: prediction, then the variance
  interpolation v in [-1, 1] of `learned_log_variance`); x_t: [B, ..., C]; t: [B] indices.
  x0 = x0_hat(output) (clipped to [-1, 1] with `clip_denoised`), mean = c1_t x0 + c2_t x_t, and
  log_var the learned interpolation or the fixed `variance` (fixed_small | fixed_large).
  Returns (mean, log_var, x0), all float32 [B, ..., C].
  """
  x_t = x_t.astype(jnp.float32)
  prediction, v = split_learned_sigma(output.astype(jnp.float32), learn_sigma)
  x0, _ = x0_eps_from_output(schedule, prediction, x_t, t, prediction_type)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, _, _ = q_posterior(schedule, x0, x_t, t)
  if learn_sigma:
    log_var = learned_log_variance(schedule, v, t)
  else:
    log_var = jnp.broadcast_to(fixed_log_variance(schedule, t, x_t.ndim, variance), x_t.shape)
  return mean, log_var, x0


def _mean_over_dims(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vlb_term(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array,
             model_mean: jax.Array, model_log_variance: jax.Array) -> jax.Array:
  """Per-example term [B] of the variational bound at step t, in bits/dim.

  t >= 1: L_t = KL(q(x_{t-1} | x_t, x_0) || N(model_mean, e^model_log_variance)) / (D ln 2);
  t == 0: L_0 = -log N_disc(x_0; model_mean, e^model_log_variance) / (D ln 2), the discretised
  decoder (`discretized_gaussian_log_likelihood`). x0, x_t, model_*: [B, ...]; t: [B].
  """
  x0, x_t = x0.astype(jnp.float32), x_t.astype(jnp.float32)
  true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, t)
  kl = _mean_over_dims(normal_kl(true_mean, true_log_var, model_mean, model_log_variance))
  nll = -_mean_over_dims(discretized_gaussian_log_likelihood(
      x0, model_mean, 0.5 * model_log_variance.astype(jnp.float32)))
  return jnp.where(jnp.asarray(t) == 0, nll, kl) / math.log(2.0)


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
  """L_T = KL(q(x_T | x_0) || N(0, I)) / (D ln 2) per example [B], x_T the last step T-1.

  q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I); no parameters, so it only measures how
  far the schedule is from destroying the data.
  """
  x0 = x0.astype(jnp.float32)
  t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
  mean, var = q_mean_variance(schedule, x0, t)
  return _mean_over_dims(normal_kl(mean, jnp.log(var), 0.0, 0.0)) / math.log(2.0)


def _fractional_index(schedule: Schedule, tau: jax.Array) -> jax.Array:
  return jnp.asarray(tau, jnp.float32) * (schedule.num_timesteps - 1)


def _log_alphas_cumprod(schedule: Schedule) -> jax.Array:
  """log abar_i = sum_{s<=i} log(1 - beta_s) [T], accurate where abar is close to 1 in float32."""
  return jnp.cumsum(jnp.log1p(-schedule.betas))


def continuous_log_alphas_cumprod(schedule: Schedule, tau: jax.Array) -> jax.Array:
  """log abar(tau): log abar_i interpolated linearly at i = tau (T - 1); same shape as tau."""
  steps = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
  return jnp.interp(_fractional_index(schedule, tau), steps, _log_alphas_cumprod(schedule))


def continuous_beta(schedule: Schedule, tau: jax.Array) -> jax.Array:
  """beta(tau) = -d log abar / d tau: -(T - 1) (log abar_{i+1} - log abar_i) on [i, i + 1]."""
  log_abar = _log_alphas_cumprod(schedule)
  i = jnp.clip(jnp.floor(_fractional_index(schedule, tau)).astype(jnp.int32), 0,
               schedule.num_timesteps - 2)
  return -(schedule.num_timesteps - 1) * (jnp.take(log_abar, i + 1) - jnp.take(log_abar, i))


def network_timestep(schedule: Schedule, tau: jax.Array) -> jax.Array:
  """The network's (float) timestep input at tau: `schedule.timesteps` interpolated at tau (T-1)."""
  steps = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
  return jnp.interp(_fractional_index(schedule, tau), steps,
                    schedule.timesteps.astype(jnp.float32))
