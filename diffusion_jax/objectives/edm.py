"""The EDM objective of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (`diffusion.objective='edm'`).

Data x0 are corrupted as x = x0 + sigma n, n ~ N(0, I), and the network F is wrapped into the
preconditioned denoiser (the paper's Table 1, "ours")

  D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),
  c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 +
  sigma_data^2),   c_in = 1 / sqrt(sigma^2 + sigma_data^2),   c_noise = ln(sigma) / 4,

so that the network's input and its training target both have unit variance at every sigma.
Training draws ln(sigma) ~ N(P_mean, P_std^2) per example and minimises
lambda(sigma) ||D(x; sigma) - x0||^2 with lambda = (sigma^2 + sigma_data^2) / (sigma
sigma_data)^2; since D - x0 = c_out (F - (x0 - c_skip x) / c_out), this is
lambda c_out^2 ||F - (x0 - c_skip x) / c_out||^2 and lambda c_out^2 = 1: an unweighted
regression of F onto the effective target. Sampling integrates the probability-flow ODE
dx/dsigma = (x - D(x; sigma)) / sigma from x = sigma_max n over Karras' rho schedule with the
Heun (Algorithm 1; with churn Algorithm 2) or Euler steps of `karras.karras_loop`.

The network sees 'x_t' = c_in x and 't' = c_noise (float [B]); the config fields are those
of `config.diffusion.edm`. The module implements the protocol of objectives/base.py.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.objectives import base
from diffusion_jax.sampling import guidance, karras

NAME = 'edm'
SAMPLERS = ('heun', 'euler')  # Algorithm 1 / 2 (with sample.s_churn > 0) and its Euler variant.
LIKELIHOOD_METRICS = ('ode_nll',)


def preconditioning(sigma, sigma_data: float):
  """(c_skip, c_out, c_in, c_noise) of noise level(s) `sigma` (Table 1 of Karras et al.).

  NumPy input (float64 stays float64, for reference computations) gives NumPy output; a JAX
  array (or tracer) gives JAX arrays of its dtype. Shapes follow `sigma`.
  """
  xp = jnp if isinstance(sigma, jax.Array) else np
  sigma = sigma if xp is jnp else np.asarray(sigma, np.float64)
  total = sigma**2 + sigma_data**2
  c_skip = sigma_data**2 / total
  c_out = sigma * sigma_data / xp.sqrt(total)
  c_in = 1.0 / xp.sqrt(total)
  c_noise = xp.log(sigma) / 4.0
  return c_skip, c_out, c_in, c_noise


def loss_weight(sigma, sigma_data: float):
  """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, the weight of
  ||D - x0||^2 that makes the effective weight of ||F - target||^2 one."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2


def _per_example(a: jax.Array, ndim: int) -> jax.Array:
  """[B] -> [B, 1, ..., 1] broadcasting against arrays of rank `ndim`."""
  return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def training_example(config, x0: jax.Array, noise: jax.Array,
                     key: jax.Array) -> Dict[str, jax.Array]:
  """One training batch: x0 [B,H,W,C] and `noise` like it -> the per-example arrays

  'x_t' = c_in x [B,H,W,C] (x = x0 + sigma noise) and 't' = c_noise [B], the network's inputs;
  'sigma' [B] with ln(sigma) ~ N(p_mean, p_std^2) drawn from `key`; 'target' =
  (x0 - c_skip x) / c_out [B,H,W,C] and 'weight' = lambda(sigma) c_out^2 [B] (= 1 up to
  rounding) for `per_example_loss`. All float32.
  """
  e = config.diffusion.edm
  x0 = x0.astype(jnp.float32)
  log_sigma = e.p_mean + e.p_std * jax.random.normal(key, (x0.shape[0],), jnp.float32)
  sigma = jnp.exp(log_sigma)
  sigma_data = float(e.sigma_data)
  c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
  x = x0 + _per_example(sigma, x0.ndim) * noise.astype(jnp.float32)
  target = (x0 - _per_example(c_skip, x0.ndim) * x) / _per_example(c_out, x0.ndim)
  return {'x_t': _per_example(c_in, x0.ndim) * x, 't': c_noise, 'sigma': sigma,
          'target': target, 'weight': loss_weight(sigma, sigma_data) * c_out**2}


def per_example_loss(config, output: jax.Array, example: Dict[str, jax.Array]) -> jax.Array:
  """weight * mean over pixels of (F - target)^2 [B]: the EDM loss lambda ||D - x0||^2 per
  pixel (the paper sums over pixels; the mean differs by the constant H W C)."""
  del config
  return base.weighted_mse(output, example['target'], example['weight'])


def _denoise_with(net: Callable[[jax.Array, jax.Array], Tuple[jax.Array, Optional[jax.Array]]],
                  x: jax.Array, sigma, sigma_data: float) -> jax.Array:
  """D(x; sigma) with `net(x_in, t [B]) -> (F, _)` (`guidance.make_network_fn`); sigma a
  scalar or [B]."""
  x = x.astype(jnp.float32)
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
  c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
  out, _ = net(_per_example(c_in, x.ndim) * x, c_noise)
  return _per_example(c_skip, x.ndim) * x + _per_example(c_out, x.ndim) * out


def denoise(apply_fn: Callable[..., jax.Array], x: jax.Array, sigma,
            labels: Optional[jax.Array], config) -> jax.Array:
  """The preconditioned denoiser D(x; sigma) [B,H,W,C] (float32) of the network
  apply_fn(x_in, t [B], labels) (or apply_fn(x_in, t) without labels) at x = x0 + sigma n;
  sigma a scalar or [B]. The probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma.
  """
  net = guidance.make_network_fn(apply_fn, labels=labels)
  return _denoise_with(net, x, sigma, float(config.diffusion.edm.sigma_data))


def sampling_sigmas(config, steps: int, rho: float) -> np.ndarray:
  """Karras' schedule of `steps` noise levels from edm.sigma_max to edm.sigma_min, then 0
  (float64 [steps + 1])."""
  e = config.diffusion.edm
  return karras.karras_sigmas(float(e.sigma_min), float(e.sigma_max), int(steps), float(rho))


def sample(apply_fn: Callable[..., jax.Array], config, noise: jax.Array, rng: jax.Array, *,
           labels: Optional[jax.Array] = None, null_label: Optional[int] = None,
           trajectory_every: int = 0, trajectory_images: Optional[int] = None):
  """EDM sampling from `noise` (standard normal [B,H,W,C]): x = edm.sigma_max noise, then
  `karras.karras_loop` with sample.sampler 'heun' (2 steps - 1 network calls; 18 steps = 35
  calls is the paper's CIFAR-10 setting) or 'euler' (steps calls) over `sampling_sigmas`
  (sample.steps, sample.rho) with the churn sample.s_churn / s_tmin / s_tmax / s_noise
  (s_churn = 0: deterministic). Classifier-free guidance with `labels` / `null_label` and
  sample.guidance_scale as `guidance.make_network_fn` (on F, which is guidance on D). Returns
  x_0 [B,H,W,C], or (x_0, loop.Trajectory) with trajectory_every > 0.
  """
  scfg = config.sample
  name = scfg.sampler
  if name not in SAMPLERS:
    raise ValueError(f"sample.sampler={name!r} is not a sampler of diffusion.objective='edm'; "
                     f'use one of {SAMPLERS}.')
  sigmas = sampling_sigmas(config, scfg.steps, scfg.rho)
  net = guidance.make_network_fn(apply_fn, labels=labels, null_label=null_label,
                                 guidance_scale=scfg.guidance_scale)
  sigma_data = float(config.diffusion.edm.sigma_data)

  def x0_of(x, sigma, timestep):
    del timestep  # c_noise is computed from sigma by the preconditioning.
    return _denoise_with(net, x, sigma, sigma_data)

  x = noise.astype(jnp.float32) * float(sigmas[0])
  return karras.karras_loop(
      x0_of, sigmas, x, rng, heun=name == 'heun', s_churn=float(scfg.s_churn),
      s_tmin=float(scfg.s_tmin), s_tmax=float(scfg.s_tmax), s_noise=float(scfg.s_noise),
      trajectory_every=trajectory_every, trajectory_images=trajectory_images)


def sampling_steps(config) -> int:
  """sample.steps noise levels (then 0)."""
  return int(config.sample.steps)


def network_evaluations(config) -> int:
  """heun: 2 steps - 1 (no correction into sigma = 0); euler: steps."""
  steps = sampling_steps(config)
  return 2 * steps - 1 if config.sample.sampler == 'heun' else steps


def probability_flow(apply_fn: Callable[[jax.Array, jax.Array], jax.Array],
                     config) -> base.ProbabilityFlow:
  """dx/dsigma = (x - D(x; sigma)) / sigma written in s = ln sigma (dx/ds = x - D, which spreads
  the solver's steps over the noise levels) from ln sigma_min to ln sigma_max, with the prior
  N(0, sigma_max^2 I): the density of the data plus sigma_min noise, as the model never saw
  less. apply_fn(x, t [B]) is the network with its labels closed over."""
  e = config.diffusion.edm

  def drift(s, x):
    return x.astype(jnp.float32) - denoise(apply_fn, x, jnp.exp(s), None, config)
  return base.ProbabilityFlow(drift, t0=math.log(e.sigma_min), t1=math.log(e.sigma_max),
                              prior_std=float(e.sigma_max))


def check_config(config) -> List[str]:
  """Problems of an objective='edm' config (empty list = fine): the diffusion.edm fields, the
  model output it needs, and config.sample's EDM sampler."""
  errors: List[str] = []
  e, scfg = config.diffusion.edm, config.sample
  if not e.sigma_data > 0:
    errors.append(f'diffusion.edm.sigma_data={e.sigma_data} must be > 0 (the data std; 0.5 for '
                  'images in [-1, 1]).')
  if not 0 < e.sigma_min < e.sigma_max:
    errors.append(f'diffusion.edm.sigma_min={e.sigma_min} and sigma_max={e.sigma_max} must '
                  'satisfy 0 < sigma_min < sigma_max (0.002 and 80 in Karras et al.).')
  if not e.p_std > 0:
    errors.append(f'diffusion.edm.p_std={e.p_std} must be > 0 (1.2 in Karras et al.).')
  if not math.isfinite(e.p_mean):
    errors.append(f'diffusion.edm.p_mean={e.p_mean} must be finite (-1.2 in Karras et al.).')
  if config.model.learn_sigma:
    errors.append("model.learn_sigma=True learns the reverse variance of objective 'ddpm'; "
                  "diffusion.objective='edm' has no variance output: set model.learn_sigma=False.")
  if scfg.sampler not in SAMPLERS:
    errors.append(f"sample.sampler={scfg.sampler!r} is not a sampler of diffusion.objective="
                  f"'edm'; use one of {SAMPLERS} ('heun' with 18 steps is the paper's CIFAR-10 "
                  'setting; sample.s_churn > 0 makes it stochastic).')
  if scfg.steps < 1:
    errors.append(f'sample.steps={scfg.steps} must be >= 1 for the EDM samplers (18 in '
                  'Karras et al. for CIFAR-10: 35 network evaluations with heun).')
  if scfg.thresholding not in ('auto', 'none'):
    errors.append(f'sample.thresholding={scfg.thresholding!r} is not applied by the EDM '
                  "samplers (they never threshold D); set 'auto' or 'none'.")
  errors.extend(karras.check_karras_config(scfg))
  errors.extend(guidance.check_guidance_and_labels(scfg, config.model))
  return errors
