"""Karras et al. (2022)'s noise levels and sampler loop (EDM's Algorithm 2, Heun or Euler, with
stochastic churn), shared by the DDPM-family euler / heun samplers and by the EDM objective."""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sampling import loop

def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0
                  ) -> np.ndarray:
  """Karras et al. (2022): sigma_i = (smax^(1/rho) + i/(S-1) (smin^(1/rho) - smax^(1/rho)))^rho,

  i < S, followed by sigma_S = 0; float64 [S + 1].
  """
  if steps < 1:
    raise ValueError(f'sample.steps={steps} must be >= 1.')
  if rho <= 0:
    raise ValueError(f'sample.rho={rho} must be positive.')
  ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
  inv_max, inv_min = sigma_max**(1.0 / rho), sigma_min**(1.0 / rho)
  return np.append((inv_max + ramp * (inv_min - inv_max))**rho, 0.0)


def karras_loop(x0_of: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                sigmas: np.ndarray, x: jax.Array, rng: jax.Array, *, heun: bool,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float('inf'),
                s_noise: float = 1.0, sigma_floor: Optional[float] = None,
                timestep_of: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                trajectory_every: int = 0, trajectory_images: Optional[int] = None):
  """EDM's sampler loop (Karras et al. 2022): Algorithm 2, i.e. Algorithm 1 plus churn.

  Integrates dx/dsigma = (x - D(x; sigma)) / sigma over x = x0 + sigma eps from `x` at sigmas[0]
  down the float64 noise levels `sigmas` [N + 1] (decreasing, sigmas[N] = 0; `karras_sigmas`).
  `x0_of(x, sigma, timestep) -> D(x; sigma)` [B, ...] is the denoiser at a float32 scalar sigma;
  timestep = `timestep_of`(sigma) is computed in float64 at trace time (the caller's network
  time; sigma itself when None). Step i: with churn (s_tmin <= sigma_i <= s_tmax) sigma_hat =
  sigma_i (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1), x += s_noise sqrt(sigma_hat^2 -
  sigma_i^2) z; then an Euler step to sigma_{i+1}, and with `heun` (not into sigma = 0) the
  trapezoidal correction x + (sigma_{i+1} - sigma_hat) (d + d(x_euler)) / 2: N model calls
  (Euler) or 2N - 1 (Heun). The correction's branch is never taken at sigma = 0, and is traced at
  max(sigma_{i+1}, `sigma_floor`) (default: the smallest positive sigma). Trajectories record
  x / sqrt(1 + sigma^2) after each step (the variance-preserving scale, equal to the output at
  sigma = 0) and the D of the step (see `_loop`). Shared by the ddpm euler / heun samplers and
  by the EDM objective (edm.py).
  """
  sig = np.asarray(sigmas, np.float64)
  steps = len(sig) - 1
  if steps < 1 or sig[-1] != 0.0 or np.any(np.diff(sig) >= 0) or sig[-2] <= 0:
    raise ValueError(f'karras_loop needs decreasing positive noise levels followed by 0, got '
                     f'{sig}.')
  if s_churn < 0 or s_noise < 0:
    raise ValueError(f'sample.s_churn={s_churn} and sample.s_noise={s_noise} must be >= 0.')
  if sigma_floor is None:
    sigma_floor = sig[-2]
  if timestep_of is None:
    timestep_of = lambda s: s
  in_range = (sig[:-1] >= s_tmin) & (sig[:-1] <= s_tmax)
  gamma = np.where(in_range, min(s_churn / steps, math.sqrt(2.0) - 1.0), 0.0)
  sig_hat = sig[:-1] * (1.0 + gamma)
  churn_std = s_noise * np.sqrt(sig_hat**2 - sig[:-1]**2)
  churn = bool(np.any(churn_std > 0))
  sig_next = sig[1:]
  safe_next = np.maximum(sig_next, sigma_floor)  # Never evaluated at sigma = 0.
  t_hat, t_next = timestep_of(sig_hat), timestep_of(safe_next)
  vp_next = 1.0 / np.sqrt(1.0 + sig_next**2)      # x_t = x / sqrt(1 + sigma^2).
  (sig_hat, t_hat, t_next, sig_next, safe_next, vp_next, churn_std) = (
      jnp.asarray(a, jnp.float32) for a in (sig_hat, t_hat, t_next, sig_next, safe_next, vp_next, churn_std))

  def d_dsigma(x, sigma, timestep):
    """dx/dsigma = (x - D(x, sigma)) / sigma, and D."""
    x0 = x0_of(x, sigma, timestep)
    return (x - x0) / sigma, x0

  def step(i, carry):
    (x,) = carry
    if churn:
      x = x + churn_std[i] * loop.step_normal(rng, i, x.shape)
    d, x0 = d_dsigma(x, sig_hat[i], t_hat[i])
    dt = sig_next[i] - sig_hat[i]
    x_next = x + dt * d
    if heun:
      def correct(x_euler):
        d2, _ = d_dsigma(x_euler, safe_next[i], t_next[i])
        return x + dt * 0.5 * (d + d2)
      x_next = jax.lax.cond(sig_next[i] > 0, correct, lambda x_euler: x_euler, x_next)
    return (x_next,), x_next * vp_next[i], x0

  return loop.run_loop(step, (x.astype(jnp.float32),), steps, trajectory_every, trajectory_images)


def check_karras_config(sample_config) -> List[str]:
  """The Karras / EDM sampler fields sample.rho, s_churn, s_tmin, s_tmax, s_noise (any
  objective whose samplers run `karras_loop`)."""
  errors: List[str] = []
  if sample_config.rho <= 0:
    errors.append(f'sample.rho={sample_config.rho} must be positive (7 in Karras et al.).')
  for field in ('s_churn', 's_tmin', 's_noise'):
    if sample_config[field] < 0:
      errors.append(f'sample.{field}={sample_config[field]} must be >= 0.')
  if sample_config.s_tmax < sample_config.s_tmin:
    errors.append(f'sample.s_tmax={sample_config.s_tmax} must be >= sample.s_tmin='
                  f'{sample_config.s_tmin}.')
  return errors
