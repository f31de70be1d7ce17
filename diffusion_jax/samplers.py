"""Samplers: from noise x_T to images, each one pure function compiled as a single loop.

Every sampler has the signature

  sampler(denoise, schedule, noise, rng, **options) -> x_0

where `denoise(x_t, t) -> Prediction` wraps the network (see `make_denoiser`), `t` is an int32
timestep index shared by the batch, `noise` is x_T [B, H, W, C] and `rng` drives any fresh noise.
A new sampler is one such function added to `SAMPLERS`. The loops are `lax.fori_loop`s, so a
whole sampling run is one XLA program; jit the call (with a batch sharding) from outside.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.diffusion import Schedule


class Prediction(NamedTuple):
  """What the network says about x_0 and the noise at (x_t, t)."""
  x0: jax.Array
  eps: jax.Array


Denoiser = Callable[[jax.Array, jax.Array], Prediction]


def make_denoiser(apply_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule,
                  prediction_type: str, clip_denoised: bool = True) -> Denoiser:
  """Turns `apply_fn(x_t, timestep [B]) -> network output` into a `Denoiser`.

  The denoiser takes a schedule index t; the network sees `schedule.timesteps[t]`.

  With `clip_denoised` the x0 prediction is clipped to [-1, 1] and eps is recomputed from it,
  so both stay consistent with x_t (as guided-diffusion does).
  """
  def denoise(x_t: jax.Array, t: jax.Array) -> Prediction:
    t_batch = jnp.full((x_t.shape[0],), t, jnp.int32)
    output = apply_fn(x_t, jnp.take(schedule.timesteps, t_batch))
    x0, eps = diffusion.x0_eps_from_output(schedule, output, x_t, t_batch, prediction_type)
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = diffusion.eps_from_x0(schedule, x_t, t_batch, x0)
    return Prediction(x0, eps)
  return denoise


def ddpm_sample(denoise: Denoiser, schedule: Schedule, noise: jax.Array, rng: jax.Array, *,
                variance: str = 'fixed_small', **unused) -> jax.Array:
  """Ancestral sampling of Ho et al.: x_{t-1} ~ N(posterior mean(x0_hat, x_t), sigma_t^2) for all T steps.

  variance: 'fixed_small' uses sigma_t^2 = beta~_t (the posterior variance), 'fixed_large' uses
  beta_t (with beta~_1 at t = 1, as guided-diffusion). No noise is added at the last step.
  """
  del unused
  if variance == 'fixed_small':
    log_var = schedule.posterior_log_variance_clipped
  elif variance == 'fixed_large':
    log_var = jnp.log(jnp.append(schedule.posterior_variance[1], schedule.betas[1:]))
  else:
    raise ValueError(f'sample.variance={variance!r} is unknown; use fixed_small or fixed_large.')
  num_steps = schedule.num_timesteps

  def body(i, x):
    t = num_steps - 1 - i
    pred = denoise(x, t)
    mean, _, _ = diffusion.q_posterior(schedule, pred.x0, x, jnp.full((x.shape[0],), t))
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
    return mean + jnp.where(t > 0, jnp.exp(0.5 * log_var[t]), 0.0) * z

  return jax.lax.fori_loop(0, num_steps, body, noise.astype(jnp.float32))


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """The DDIM paper's 'uniform' subsequence 0, k, 2k, ... with k = T // steps (ascending)."""
  if not 0 < steps <= num_timesteps:
    raise ValueError(f'sample.steps={steps} must be in [1, {num_timesteps}] '
                     '(diffusion.num_timesteps).')
  return np.arange(0, num_timesteps, num_timesteps // steps)[:steps].astype(np.int32)


def ddim_sample(denoise: Denoiser, schedule: Schedule, noise: jax.Array, rng: jax.Array, *,
                steps: int = 50, eta: float = 0.0, **unused) -> jax.Array:
  """DDIM (Song et al. 2021) on `steps` timesteps; eta = 0 is deterministic, eta = 1 DDPM-like.

  x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
  sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev).
  """
  del unused
  seq = ddim_timesteps(schedule.num_timesteps, steps)
  t_seq = jnp.asarray(seq[::-1])
  abar = schedule.alphas_cumprod
  # abar of the next (smaller) kept step, 1 after the last: aligned with t_seq.
  abar_prev_seq = jnp.asarray(np.append(1.0, np.asarray(abar)[seq[:-1]])[::-1], jnp.float32)

  def body(i, x):
    t = t_seq[i]
    a_t, a_prev = abar[t], abar_prev_seq[i]
    pred = denoise(x, t)
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
    return (jnp.sqrt(a_prev) * pred.x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0)) *
            pred.eps + sigma * z)

  return jax.lax.fori_loop(0, len(seq), body, noise.astype(jnp.float32))


SAMPLERS = {
    'ddpm': ddpm_sample,
    'ddim': ddim_sample,
}


def get_sampler(name: str) -> Callable[..., jax.Array]:
  """The sampler registered as `name`, or a ValueError naming `sample.sampler`."""
  if name not in SAMPLERS:
    raise ValueError(f'sample.sampler={name!r} is unknown; use one of {sorted(SAMPLERS)}.')
  return SAMPLERS[name]
