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

The other objectives (`objective_log_likelihood` dispatches on diffusion.objective) use the same
solver (`solve_log_likelihood`: a drift f(s, x), an interval [s0, s1] and a prior N(0,
prior_std^2 I) at s1):

* 'flow_matching' (`flow_log_likelihood`): dx/dt = v(x, t) on t in [t0, 1] with the prior
  N(0, I) at t = 1, which is exactly the path's end x_1 = eps. t0 = 0 for velocity models; an
  x-prediction model's v = (x - x0_hat) / t is 0/0 at t = 0, so its density is that of
  x_{t0} with t0 = FLOW_X0_T0 (the data plus 1e-5 N(0, I), far below the 1/128 dequantisation
  bins).
* 'edm' (`edm_log_likelihood`): dx/dsigma = (x - D(x; sigma)) / sigma from edm_sigma_min to
  edm_sigma_max, prior N(0, sigma_max^2 I) (x = x0 + sigma_max eps with sigma_max >> the data).
  It is integrated in s = ln(sigma), dx/ds = x - D(x; e^s), which spreads the steps evenly over
  the noise levels; the divergence integral is the same in either variable. The density is that
  of the data plus sigma_min noise, as the model never saw less.

All functions are pure and traceable; jit the call (evaluation.py shards the batch over a mesh).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from diffusion_jax.processes import discrete
from diffusion_jax.processes.discrete import Schedule

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
    output, _ = discrete.split_learned_sigma(apply_fn(x, t_net), learn_sigma)
    log_abar = continuous_log_alphas_cumprod(schedule, tau)
    sigma = jnp.sqrt(-jnp.expm1(log_abar))
    _, eps = discrete.x0_eps_from_scaled(output, x, jnp.exp(0.5 * log_abar), sigma,
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


# f(s, x [B, ...]) -> dx/ds [B, ...]: the ODE that carries the data at s0 to the prior at s1.
Drift = Callable[[jax.Array, jax.Array], jax.Array]


def solve_log_likelihood(drift: Drift, y: jax.Array, rng: jax.Array, *, t0: float, t1: float,
                         prior_std: float = 1.0, probe: str = 'rademacher', num_probes: int = 1,
                         solver: str = 'tsit5', rtol: float = 1e-5, atol: float = 1e-5,
                         max_steps: int = 4096) -> ODELikelihood:
  """log p(y) [B] (nats) of y [B, H, W, C] at s = t0 under dx/ds = drift(s, x) and the prior
  N(0, prior_std^2 I) at s = t1: log N(x(t1)) + int_{t0}^{t1} div drift ds.

  The state (x [B, ...], int div f [B]) is integrated jointly, the step size controlled on the
  whole batch. probe: 'rademacher' | 'gaussian' (Hutchinson, `num_probes` fixed probes per
  example averaged inside the drift) | 'exact' (D Jacobian-vector products per evaluation).
  """
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
      diffrax.ODETerm(vector_field), _solver(solver), t0=t0, t1=t1, dt0=None,
      y0=(y, jnp.zeros((y.shape[0],), jnp.float32)), args=probes,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      max_steps=max_steps, throw=False)
  x1, delta = jax.tree.map(lambda a: a[-1], solution.ys)
  dims = math.prod(y.shape[1:])
  if prior_std != 1.0:  # log N(x; 0, s^2 I) = log N(x / s; 0, I) - D log s.
    x1 = x1 / jnp.float32(prior_std)
  prior = (-0.5 * jnp.sum(jnp.square(x1), axis=tuple(range(1, x1.ndim)))
           - 0.5 * dims * math.log(2.0 * math.pi))
  if prior_std != 1.0:
    prior = prior - dims * math.log(prior_std)
  successful = solution.result == diffrax.RESULTS.successful
  return ODELikelihood(log_prob=prior + delta, prior_log_prob=prior, delta_log_prob=delta,
                       num_steps=solution.stats['num_steps'], successful=successful)


def ode_log_likelihood(apply_fn: ApplyFn, schedule: Schedule, y: jax.Array, rng: jax.Array, *,
                       prediction_type: str, learn_sigma: bool = False,
                       probe: str = 'rademacher', num_probes: int = 1, solver: str = 'tsit5',
                       rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096
                       ) -> ODELikelihood:
  """log p_0(y) [B] of continuous data y [B, H, W, C] (nats) under a 'ddpm' model: the PF-ODE
  (`probability_flow_drift`) from tau = 0 to 1 with the prior N(0, I); see
  `solve_log_likelihood` for the solver options."""
  drift = probability_flow_drift(apply_fn, schedule, prediction_type, learn_sigma)
  return solve_log_likelihood(drift, y, rng, t0=0.0, t1=1.0, probe=probe,
                              num_probes=num_probes, solver=solver, rtol=rtol, atol=atol,
                              max_steps=max_steps)


# An x-prediction flow model's velocity (x - x0_hat) / t is 0/0 at t = 0: its density is taken
# at t = FLOW_X0_T0 (the data plus 1e-5 N(0, I)), as Song et al. start VP likelihoods at 1e-5.
FLOW_X0_T0 = 1e-5


def flow_log_likelihood(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], y: jax.Array,
                        rng: jax.Array, *, t0: float = 0.0, **solver_options) -> ODELikelihood:
  """log p_{t0}(y) [B] of a flow-matching model: dx/dt = velocity_fn(x, t) (x [B, ...], t a
  scalar) from t0 to 1 with the prior N(0, I) at t = 1; `solve_log_likelihood`'s options."""
  return solve_log_likelihood(lambda t, x: velocity_fn(x, t), y, rng, t0=t0, t1=1.0,
                              **solver_options)


def edm_log_likelihood(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], y: jax.Array,
                       rng: jax.Array, *, sigma_min: float, sigma_max: float,
                       **solver_options) -> ODELikelihood:
  """log p_{sigma_min}(y) [B] of an EDM model D = denoise_fn(x, sigma scalar): the ODE
  dx/dsigma = (x - D) / sigma written in s = ln sigma (dx/ds = x - D) from ln sigma_min to
  ln sigma_max, prior N(0, sigma_max^2 I); `solve_log_likelihood`'s options."""
  def drift(s, x):
    return x.astype(jnp.float32) - denoise_fn(x, jnp.exp(s))
  return solve_log_likelihood(drift, y, rng, t0=math.log(sigma_min), t1=math.log(sigma_max),
                              prior_std=sigma_max, **solver_options)


def objective_log_likelihood(apply_fn: ApplyFn, schedule: Schedule, diffusion_config,
                             y: jax.Array, rng: jax.Array, *, learn_sigma: bool = False,
                             **solver_options) -> ODELikelihood:
  """log p(y) [B] of the model of `diffusion_config.objective` through its probability-flow
  ODE: `ode_log_likelihood` ('ddpm'), `flow_log_likelihood` ('flow_matching') or
  `edm_log_likelihood` ('edm'). apply_fn(x, t [B]) is the network (labels closed over)."""
  objective = diffusion_config.objective
  if objective == 'ddpm':
    return ode_log_likelihood(apply_fn, schedule, y, rng,
                              prediction_type=diffusion_config.prediction_type,
                              learn_sigma=learn_sigma, **solver_options)
  if objective == 'flow_matching':
    from diffusion_jax.objectives import flow_matching  # pylint: disable=g-import-not-at-top
    t0 = 0.0 if diffusion_config.flow_prediction == 'velocity' else FLOW_X0_T0
    return flow_log_likelihood(flow_matching.make_velocity_fn(apply_fn, diffusion_config), y, rng,
                               t0=t0, **solver_options)
  if objective == 'edm':
    from diffusion_jax.objectives import edm  # pylint: disable=g-import-not-at-top
    return edm_log_likelihood(
        lambda x, sigma: edm.denoise(apply_fn, x, sigma, None, diffusion_config), y, rng,
        sigma_min=float(diffusion_config.edm_sigma_min),
        sigma_max=float(diffusion_config.edm_sigma_max), **solver_options)
  raise ValueError(f'diffusion.objective={objective!r} has no ODE likelihood here.')


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
