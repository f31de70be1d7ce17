"""Flow matching (Lipman et al. 2023) on the linear path of rectified flow (Liu et al. 2023),
with SD3's logit-normal times and time shift (Esser et al. 2024) and JiT's x-prediction trained
with the velocity loss (Li & He 2025): the objective 'flow_matching', with the fields of
`config.diffusion.flow_matching` (written `flow.` below). It implements objectives/base.py.

The path, t in [0, 1] (t = 0 data, t = 1 pure noise):

  x_t = (1 - t) x0 + t eps,     eps ~ N(0, I),     v = dx_t/dt = eps - x0.

Training regresses the network on v at t drawn from `flow.time_dist`; the minimiser
of E||v_hat(x_t, t) - v||^2 is the marginal velocity v(x, t) = E[eps - x0 | x_t = x], whose ODE
dx/dt = v(x, t) carries N(0, I) at t = 1 to the data at t = 0 (flow matching's marginalisation).
Given v, the conditional means are x0_hat = x - t v and eps_hat = x + (1 - t) v, and the score
is grad log p_t(x) = -eps_hat / t = -(x - (1 - t) x0_hat) / t^2.

Times (`sample_times`): t ~ U(0, 1) or t = sigmoid(m + s n), n ~ N(0, 1) (logit-normal), then
the time shift t -> shift(t) = a t / (1 + (a - 1) t) (`time_shift`), which multiplies the
noise-to-signal ratio t / (1 - t) by a. The sampling grid is uniform in t and shifted the same
way (`sample_time_grid`).

Network (flow.prediction): 'velocity' (output v_hat, loss ||v_hat - v||^2) or 'x0'
(output x0_hat; v_hat = (x_t - x0_hat) / t, and since x_t - x0 = t v the velocity loss is
||x0_hat - x0||^2 / t^2, with t clamped below at flow.x0_min_t as JiT does so the
weight stays finite). The network's time input is flow.time_scale * t.

Samplers (sample.sampler, `steps` steps on the grid t_0 = 1 > t_1 > ... > t_N = 0):
  euler           x_{i+1} = x_i + h_i v(x_i, t_i)                          (h_i = t_{i+1} - t_i < 0)
  heun            Euler, then x_{i+1} = x_i + h_i (v(x_i, t_i) + v(x_e, t_{i+1})) / 2, except
                  into t = 0 (Euler there, as EDM; 2N - 1 network calls)
  midpoint        x_{i+1} = x_i + h_i v(x_i + h_i/2 v(x_i, t_i), t_i + h_i/2)      (2N calls)
  euler_maruyama  the reverse-time SDE with the ODE's marginals,
                    dx = [v - g^2/2 score] dt + g dW,  g(t)^2 = 2 c t,
                  c = sample.flow_noise_scale,
                  i.e. drift v + c eps_hat; Euler-Maruyama steps
                    x_{i+1} = x_i + h_i (v + c eps_hat) + sqrt(2 c t_i |h_i|) z,
                  and a noise-free last step into t = 0 (which lands on x0_hat).
Samplers never evaluate the network at t = 0, so x-prediction needs no clamp there.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.config.errors import check_choice
from diffusion_jax.objectives import base
from diffusion_jax.sampling import guidance, loop

NAME = 'flow_matching'
LIKELIHOOD_METRICS = ('ode_nll',)
TIME_DISTS = ('uniform', 'logit_normal')
PREDICTIONS = ('velocity', 'x0')
SAMPLERS = ('euler', 'heun', 'midpoint', 'euler_maruyama')

# v(x [B,H,W,C], t scalar float) -> velocity [B,H,W,C] (float32).
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]



# ---------------------------------------------------------------- times


def time_shift(t, shift: float):
  """SD3's time shift a t / (1 + (a - 1) t) with a = `shift` (numpy or jax, any shape).

  It maps [0, 1] onto itself monotonically with t = 0 and 1 fixed, and multiplies the
  noise-to-signal ratio: shifted / (1 - shifted) = a t / (1 - t). a = 1 is the identity.
  """
  return shift * t / (1.0 + (shift - 1.0) * t)


def time_shift_for_resolution(height: int, width: int, base_height: int,
                              base_width: int) -> float:
  """SD3's resolution-dependent shift a = sqrt(m / n), m = height * width, n = base pixels.

  Why: averaging an image over blocks of m / n pixels (its n-pixel version) divides the noise
  standard deviation by sqrt(m / n) while the signal stays, so at the same t a larger image is
  less noisy at the scale of its content. Shifting by a = sqrt(m / n) multiplies t / (1 - t) by a
  and restores, at resolution m, the signal-to-noise ratios the base resolution was tuned at.
  Pick the base as the resolution whose t-distribution you trust (SD3 tuned at 256^2 and, from
  this rule's a = 4 at 1024^2, chose a = 3 by preference; for our CIFAR-10 32^2 configs the base
  is 32^2, so a = 1 there and a = 2 at 64^2).
  """
  if min(height, width, base_height, base_width) < 1:
    raise ValueError('image and base sizes must be positive.')
  return math.sqrt(height * width / (base_height * base_width))


def sample_times(flow, key: jax.Array, batch: int) -> jax.Array:
  """Training times t [B] in (0, 1): uniform or logit-normal, then `time_shift`ed."""
  if flow.time_dist == 'uniform':
    t = jax.random.uniform(key, (batch,), jnp.float32)
  elif flow.time_dist == 'logit_normal':
    n = jax.random.normal(key, (batch,), jnp.float32)
    t = jax.nn.sigmoid(flow.logit_mean + flow.logit_std * n)
  else:
    raise ValueError(f'diffusion.flow_matching.time_dist={flow.time_dist!r} is unknown; '
                     f'use one of {TIME_DISTS}.')
  return time_shift(t, float(flow.time_shift))


def sampling_shift(config) -> float:
  """sample.flow_shift, or diffusion.flow_matching.time_shift where it is 0."""
  shift = float(config.sample.flow_shift)
  return shift if shift > 0 else float(config.diffusion.flow_matching.time_shift)


def sample_time_grid(steps: int, shift: float) -> np.ndarray:
  """t_i = time_shift(1 - i / steps, shift), i = 0..steps: [steps + 1] float64 from 1 to 0."""
  return time_shift(1.0 - np.arange(steps + 1, dtype=np.float64) / steps, shift)


# ---------------------------------------------------------------- training


def _bcast(a: jax.Array, like: jax.Array) -> jax.Array:
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def training_example(config, x0: jax.Array, noise: jax.Array,
                     key: jax.Array) -> Dict[str, jax.Array]:
  """One batch's arrays: network input 'x_t' [B,H,W,C], network time 't' [B] (flow.time_scale
  times the path time), 'time' [B] (the path time t), 'x0' and 'velocity' v = noise - x0."""
  flow = config.diffusion.flow_matching
  t = sample_times(flow, key, x0.shape[0])
  tb = _bcast(t, x0)
  return {'x_t': (1.0 - tb) * x0 + tb * noise,
          't': t * jnp.float32(flow.time_scale),
          'time': t, 'x0': x0, 'velocity': noise - x0}


def per_example_loss(config, output: jax.Array, example: Dict[str, jax.Array]) -> jax.Array:
  """The velocity loss [B]: mean_dims (v_hat - v)^2, for x-prediction written as
  (x0_hat - x0)^2 / max(t, flow.x0_min_t)^2 (equal to it where t >= the clamp)."""
  flow = config.diffusion.flow_matching
  if flow.prediction == 'velocity':
    return base.weighted_mse(output, example['velocity'], jnp.ones_like(example['time']))
  t = jnp.maximum(example['time'], jnp.float32(flow.x0_min_t))
  return base.weighted_mse(output, example['x0'], 1.0 / jnp.square(t))


# ---------------------------------------------------------------- the velocity field


def velocity_from_output(flow, output: jax.Array, x: jax.Array,
                         t: jax.Array) -> jax.Array:
  """v(x, t) from the network's output: itself ('velocity') or (x - x0_hat) / t ('x0')."""
  output = output.astype(jnp.float32)
  if flow.prediction == 'velocity':
    return output
  return (x.astype(jnp.float32) - output) / t


def make_velocity_fn(apply_fn: Callable[..., jax.Array], flow, *,
                     labels: Optional[jax.Array] = None, null_label: Optional[int] = None,
                     guidance_scale: float = 1.0) -> VelocityFn:
  """`v(x [B,H,W,C], t scalar) -> [B,H,W,C]` from apply_fn(x, t_net [B][, labels]).

  Classifier-free guidance (`guidance.make_network_fn`) mixes the network outputs; at a fixed
  (x, t) the output -> velocity map is affine, so this equals guiding v itself.
  """
  net = guidance.make_network_fn(apply_fn, labels=labels, null_label=null_label,
                                 guidance_scale=guidance_scale)
  scale = jnp.float32(flow.time_scale)

  def velocity(x, t):
    t = jnp.asarray(t, jnp.float32)
    out, _ = net(x.astype(jnp.float32), jnp.full((x.shape[0],), t * scale, jnp.float32))
    return velocity_from_output(flow, out, x, t)
  return velocity


# ---------------------------------------------------------------- samplers


def flow_sample(velocity: VelocityFn, noise: jax.Array, rng: jax.Array, *, sampler: str,
                steps: int, shift: float = 1.0, noise_scale: float = 1.0,
                trajectory_every: int = 0, trajectory_images: Optional[int] = None):
  """x_0 [B,H,W,C] from x_1 = `noise` with `sampler` (module docstring) on `steps` steps of
  `sample_time_grid(steps, shift)`; one fori_loop. With trajectory_every > 0 also returns
  `loop.Trajectory` (x_t after each recorded step and the x0_hat = x - t v it used)."""
  if sampler not in SAMPLERS:
    raise ValueError(f'sample.sampler={sampler!r} is not a flow_matching sampler; use one of '
                     f'{SAMPLERS}.')
  steps = int(steps)
  if steps < 1:
    raise ValueError(f'sample.steps={steps} must be >= 1.')
  if noise_scale < 0:
    raise ValueError(f'sample.flow_noise_scale={noise_scale} must be >= 0.')
  grid = sample_time_grid(steps, shift)
  t_cur, t_next = jnp.asarray(grid[:-1], jnp.float32), jnp.asarray(grid[1:], jnp.float32)
  h = jnp.asarray(grid[1:] - grid[:-1], jnp.float32)                     # < 0
  noise_std = jnp.asarray(np.sqrt(2.0 * noise_scale * grid[:-1] * (grid[:-1] - grid[1:])),
                          jnp.float32)

  def step(i, carry):
    (x,) = carry
    t, dt = t_cur[i], h[i]
    v = velocity(x, t)
    x0_hat = x - t * v
    if sampler == 'euler':
      x_next = x + dt * v
    elif sampler == 'heun':
      def correct(x_e):
        return x + dt * 0.5 * (v + velocity(x_e, t_next[i]))
      x_e = x + dt * v
      x_next = jax.lax.cond(t_next[i] > 0, correct, lambda x_e: x_e, x_e)
    elif sampler == 'midpoint':
      x_next = x + dt * velocity(x + 0.5 * dt * v, t + 0.5 * dt)
    else:  # euler_maruyama
      eps_hat = x + (1.0 - t) * v
      z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
      last = i == steps - 1
      x_sde = x + dt * (v + noise_scale * eps_hat) + noise_std[i] * z
      x_next = jnp.where(last, x + dt * v, x_sde)
    return (x_next,), x_next, x0_hat

  return loop.run_loop(step, (noise.astype(jnp.float32),), steps, trajectory_every, trajectory_images)


def sample(apply_fn: Callable[..., jax.Array], config, noise: jax.Array, rng: jax.Array, *,
           labels: Optional[jax.Array] = None, null_label: Optional[int] = None,
           trajectory_every: int = 0, trajectory_images: Optional[int] = None):
  """Runs config.sample's flow sampler (sampler, steps, flow_shift, flow_noise_scale,
  guidance_scale) from x_1 = `noise` [B,H,W,C]; the protocol of objectives/base.py."""
  scfg = config.sample
  velocity = make_velocity_fn(apply_fn, config.diffusion.flow_matching, labels=labels,
                              null_label=null_label, guidance_scale=scfg.guidance_scale)
  return flow_sample(
      velocity, noise, rng, sampler=scfg.sampler, steps=int(scfg.steps),
      shift=sampling_shift(config), noise_scale=float(scfg.flow_noise_scale),
      trajectory_every=trajectory_every, trajectory_images=trajectory_images)


def sampling_steps(config) -> int:
  """sample.steps steps on the time grid."""
  return int(config.sample.steps)


def network_evaluations(config) -> int:
  """euler / euler_maruyama: steps; heun: 2 steps - 1 (Euler into t = 0); midpoint: 2 steps."""
  steps, name = sampling_steps(config), config.sample.sampler
  return {'heun': 2 * steps - 1, 'midpoint': 2 * steps}.get(name, steps)


# An x-prediction model's velocity (x - x0_hat) / t is 0/0 at t = 0: its density is taken at
# t = X0_LIKELIHOOD_T0 (the data plus 1e-5 N(0, I)), as Song et al. start VP likelihoods at 1e-5.
X0_LIKELIHOOD_T0 = 1e-5


def probability_flow(apply_fn: Callable[[jax.Array, jax.Array], jax.Array],
                     config) -> base.ProbabilityFlow:
  """dx/dt = v(x, t) from t0 to 1 with the prior N(0, I) at t = 1, exactly the path's end
  x_1 = eps. t0 = 0 for velocity models, X0_LIKELIHOOD_T0 for x-prediction (far below the
  1/128 dequantisation bins). apply_fn(x, t [B]) is the network with its labels closed over."""
  flow = config.diffusion.flow_matching
  velocity = make_velocity_fn(apply_fn, flow)
  t0 = 0.0 if flow.prediction == 'velocity' else X0_LIKELIHOOD_T0
  return base.ProbabilityFlow(lambda t, x: velocity(x, t), t0=t0, t1=1.0, prior_std=1.0)


# ---------------------------------------------------------------- config checks


def check_config(config) -> List[str]:
  """Problems with diffusion.flow_matching, the model and config.sample for objective
  'flow_matching' (empty list = fine); each message names the field and the fix."""
  errors: List[str] = []
  flow, scfg = config.diffusion.flow_matching, config.sample
  field = 'diffusion.flow_matching.'
  check_choice(errors, field + 'time_dist', flow.time_dist, TIME_DISTS)
  check_choice(errors, field + 'prediction', flow.prediction, PREDICTIONS)
  if not flow.logit_std > 0:
    errors.append(f'{field}logit_std={flow.logit_std} must be > 0 (SD3: 1.0).')
  if not math.isfinite(flow.logit_mean):
    errors.append(f'{field}logit_mean={flow.logit_mean} must be finite (SD3: 0).')
  if not flow.time_shift > 0:
    errors.append(f'{field}time_shift={flow.time_shift} must be > 0 (1 = no shift; see '
                  'flow_matching.time_shift_for_resolution).')
  if not 0 < flow.x0_min_t < 1:
    errors.append(f'{field}x0_min_t={flow.x0_min_t} must be in (0, 1) (JiT: 0.05).')
  if not flow.time_scale > 0:
    errors.append(f'{field}time_scale={flow.time_scale} must be > 0 (1000 suits the '
                  'sinusoidal time embedding).')
  if config.model.learn_sigma:
    errors.append("model.learn_sigma=True has no meaning for diffusion.objective="
                  "'flow_matching' (the velocity has no variance to learn); set it to False.")
  if scfg.sampler not in SAMPLERS:
    errors.append(f'sample.sampler={scfg.sampler!r} is not a flow_matching sampler; use one of '
                  f'{SAMPLERS} (ddpm, ddim and dpm_solver_pp need diffusion.objective=ddpm).')
  if scfg.steps < 1:
    errors.append(f'sample.steps={scfg.steps} must be >= 1 for diffusion.objective='
                  "'flow_matching'.")
  if scfg.flow_noise_scale < 0:
    errors.append(f'sample.flow_noise_scale={scfg.flow_noise_scale} must be >= 0.')
  if scfg.flow_shift < 0:
    errors.append(f'sample.flow_shift={scfg.flow_shift} must be >= 0 (0 = '
                  'diffusion.flow_matching.time_shift).')
  errors.extend(guidance.check_guidance_and_labels(scfg, config.model))
  return errors
