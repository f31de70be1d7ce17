"""Exact log-likelihood of a diffusion model through its probability-flow ODE (Song et al. 2021).

A discrete schedule abar_0 .. abar_{T-1} is read as a continuous variance-preserving process on
tau in [0, 1]: log abar(tau) interpolates log abar_i linearly in i = tau (T - 1), so tau = 0 is
step 0 and tau = 1 the last step, and

  beta(tau) = -d log abar / d tau,    sigma(tau)^2 = 1 - abar(tau),
  dx = -1/2 beta x dtau + sqrt(beta) dW           (marginals N(sqrt(abar) x_0, sigma^2 I)).

Its probability-flow ODE, with the score -eps_hat / sigma from the network evaluated at the
fractional timestep tau (T - 1) (the U-Net's sinusoidal embedding accepts float t), is

  dx/dtau = f(x, tau) = -1/2 beta(tau) (x - eps_hat(x, tau) / sigma(tau)),

and the instantaneous change of variables gives the log-density at tau = 0 from the prior at 1:

  log p_0(x(0)) = log N(x(1); 0, I) + int_0^1 div f(x(tau), tau) dtau.

x and the running divergence integral are solved together in one `diffrax.diffeqsolve`
(Tsit5 or Dopri5 with a PID step-size controller) from tau = 0 to 1. div f is either Hutchinson's
estimate E_z[z^T (df/dx) z] with Rademacher or Gaussian probes drawn once per solve (jax.linearize
gives the Jacobian-vector products), or the exact trace from D basis vectors (small D only).

The model density is that of step 0 (x_0 here is the data as noised to abar_0 = 1 - beta_0, not
abar = 1), as the network was never trained below step 0.

Bits per dimension of 8-bit data (`ode_nll_bpd`): levels k in {0..255} are dequantised to
u = (k + U[0, 1)) / 256 in [0, 1)^D and mapped to y = 2u - 1 in [-1, 1)^D. For the density p_Y of
y, the density of k + U on [0, 256)^D is p_Y(y) (2/256)^D, and Jensen gives

  -log2 P(k) <= E_U[-log2 p_Y(y)] + D log2(128),  i.e.  bpd = -log p_Y(y) / (D ln 2) + 7.

All functions are pure and traceable; jit the call (evaluation.py shards the batch over a mesh).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.diffusion import Schedule

SOLVERS = ('tsit5', 'dopri5')
PROBES = ('rademacher', 'gaussian', 'exact')

# apply_fn(x [B, H, W, C], t [B] float network timesteps) -> network output [B, H, W, C or 2C].
ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------- the continuous-time process


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


def probability_flow_drift(apply_fn: ApplyFn, schedule: Schedule, prediction_type: str,
                           learn_sigma: bool = False
                           ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns f(tau, x) = -1/2 beta(tau) (x - eps_hat(x, tau) / sigma(tau)), x [B, ...] -> [B, ...].

  With `learn_sigma` the variance half of the output is dropped: the ODE only needs the mean.
  """
  def drift(tau: jax.Array, x: jax.Array) -> jax.Array:
    t_net = jnp.full((x.shape[0],), network_timestep(schedule, tau), jnp.float32)
    output, _ = diffusion.split_learned_sigma(apply_fn(x, t_net), learn_sigma)
    log_abar = continuous_log_alphas_cumprod(schedule, tau)
    sigma = jnp.sqrt(-jnp.expm1(log_abar))
    _, eps = diffusion.x0_eps_from_scaled(output, x, jnp.exp(0.5 * log_abar), sigma,
                                          prediction_type)
    return -0.5 * continuous_beta(schedule, tau) * (x.astype(jnp.float32) - eps / sigma)
  return drift


# ---------------------------------------------------------------- data <-> bits per dimension


def dequantize(x: jax.Array, rng: jax.Array) -> jax.Array:
  """Uniformly dequantised 8-bit data y = 2 (k + U[0, 1)) / 256 - 1 in [-1, 1), float32.

  x: integer levels k in {0..255} (any integer dtype, e.g. uint8), or float images in [-1, 1] on
  the pipeline's grid k / 127.5 - 1, from which k is recovered by rounding.
  """
  if jnp.issubdtype(x.dtype, jnp.integer):
    levels = x.astype(jnp.float32)
  else:
    levels = jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0.0, 255.0)
  return (levels + jax.random.uniform(rng, x.shape, jnp.float32)) / 128.0 - 1.0


def bpd_from_log_prob(log_prob: jax.Array, num_dims: int, dequantized: bool) -> jax.Array:
  """Bits/dim from the log-density (nats) of y in [-1, 1]^D.

  dequantized: -log p_Y(y) / (D ln 2) + 7, the bound on the discrete 8-bit NLL (module docstring);
  otherwise the continuous -log p_Y(y) / (D ln 2).
  """
  bpd = -log_prob / (num_dims * math.log(2.0))
  return bpd + 7.0 if dequantized else bpd


# ---------------------------------------------------------------- the ODE solve


class ODELikelihood(NamedTuple):
  """Result of `ode_log_likelihood`: per example [B] unless noted."""
  log_prob: jax.Array        # log p_0(y), nats: prior_log_prob + delta_log_prob.
  prior_log_prob: jax.Array  # log N(x(1); 0, I).
  delta_log_prob: jax.Array  # int_0^1 div f dtau.
  num_steps: jax.Array       # Solver steps (accepted and rejected), scalar int.
  successful: jax.Array      # False when the solver stopped early (e.g. max_steps), scalar bool.


def _probes(rng: jax.Array, x: jax.Array, probe: str, num_probes: int) -> jax.Array:
  """Probe vectors [K, B, ...] with E[z z^T] = I, or the D basis vectors for 'exact'."""
  shape = (num_probes,) + x.shape
  if probe == 'rademacher':
    return jax.random.rademacher(rng, shape, jnp.float32)
  if probe == 'gaussian':
    return jax.random.normal(rng, shape, jnp.float32)
  if probe == 'exact':
    dims = math.prod(x.shape[1:])
    basis = jnp.eye(dims, dtype=jnp.float32).reshape((dims, 1) + x.shape[1:])
    return jnp.broadcast_to(basis, (dims,) + x.shape)
  raise ValueError(f'probe={probe!r} is unknown; use one of {PROBES}.')


def _solver(name: str) -> diffrax.AbstractSolver:
  if name == 'tsit5':
    return diffrax.Tsit5()
  if name == 'dopri5':
    return diffrax.Dopri5()
  raise ValueError(f'solver={name!r} is unknown; use one of {SOLVERS}.')


def ode_log_likelihood(apply_fn: ApplyFn, schedule: Schedule, y: jax.Array, rng: jax.Array, *,
                       prediction_type: str, learn_sigma: bool = False,
                       probe: str = 'rademacher', num_probes: int = 1, solver: str = 'tsit5',
                       rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096
                       ) -> ODELikelihood:
  """log p_0(y) [B] of continuous data y [B, H, W, C] (nats) by solving the PF-ODE to tau = 1.

  The state (x [B, ...], int div f [B]) is integrated jointly, the step size controlled on the
  whole batch. probe: 'rademacher' | 'gaussian' (Hutchinson, `num_probes` fixed probes per
  example averaged inside the drift) | 'exact' (D Jacobian-vector products per evaluation).
  """
  drift = probability_flow_drift(apply_fn, schedule, prediction_type, learn_sigma)
  y = y.astype(jnp.float32)
  probes = _probes(rng, y, probe, num_probes)
  reduce_dims = tuple(range(2, probes.ndim))

  def vector_field(tau, state, probes):
    x, _ = state
    f, jvp = jax.linearize(lambda x_: drift(tau, x_), x)
    jz = jax.vmap(jvp)(probes)                     # [K, B, ...]
    quad = jnp.sum(probes * jz, axis=reduce_dims)  # z^T J z per probe and example, [K, B].
    div = jnp.sum(quad, 0) if probe == 'exact' else jnp.mean(quad, 0)
    return f, div

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), _solver(solver), t0=0.0, t1=1.0, dt0=None,
      y0=(y, jnp.zeros((y.shape[0],), jnp.float32)), args=probes,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      max_steps=max_steps, throw=False)
  x1, delta = jax.tree.map(lambda a: a[-1], solution.ys)
  dims = math.prod(y.shape[1:])
  prior = (-0.5 * jnp.sum(jnp.square(x1), axis=tuple(range(1, x1.ndim)))
           - 0.5 * dims * math.log(2.0 * math.pi))
  successful = solution.result == diffrax.RESULTS.successful
  return ODELikelihood(log_prob=prior + delta, prior_log_prob=prior, delta_log_prob=delta,
                       num_steps=solution.stats['num_steps'], successful=successful)


def ode_nll_bpd(apply_fn: ApplyFn, schedule: Schedule, x: jax.Array, rng: jax.Array, *,
                prediction_type: str, learn_sigma: bool = False, dequantize_data: bool = True,
                probe: str = 'rademacher', num_probes: int = 1, solver: str = 'tsit5',
                rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096) -> jax.Array:
  """Negative log-likelihood in bits/dim [B] through the probability-flow ODE.

  x [B, H, W, C]: uint8 levels or float images in [-1, 1]. With `dequantize_data` (default) the
  8-bit levels are uniformly dequantised (one draw per call) and the result is the bound
  -log p_Y(y) / (D ln 2) + 7 on the discrete NLL that score_sde reports; otherwise float x is
  taken as continuous points and the result is -log p_0(x) / (D ln 2). NaN where the solver
  failed. Jit the call.
  """
  deq_key, probe_key = jax.random.split(rng)
  if dequantize_data:
    y = dequantize(x, deq_key)
  elif jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError('integer images need dequantize_data=True.')
  else:
    y = x.astype(jnp.float32)
  result = ode_log_likelihood(apply_fn, schedule, y, probe_key, prediction_type=prediction_type,
                              learn_sigma=learn_sigma, probe=probe, num_probes=num_probes,
                              solver=solver, rtol=rtol, atol=atol, max_steps=max_steps)
  bpd = bpd_from_log_prob(result.log_prob, math.prod(x.shape[1:]), dequantize_data)
  return jnp.where(result.successful, bpd, jnp.nan)
