"""Exact log-likelihood of a diffusion model through its probability-flow ODE (Song et al. 2021).

Every objective describes its ODE (`probability_flow` of objectives/base.py): a drift
f(s, x) that carries the data at s = t0 to the prior N(0, prior_std^2 I) at s = t1 (for 'ddpm'
the discrete schedule read as a continuous VP process, for 'flow_matching' the velocity field,
for 'edm' the denoiser's ODE in ln sigma). The instantaneous change of variables gives

  log p_{t0}(x(t0)) = log N(x(t1); 0, prior_std^2 I) + int_{t0}^{t1} div f(x(s), s) ds.

x and the running divergence integral are solved together in one `diffrax.diffeqsolve` (Tsit5
or Dopri5 with a PID step-size controller). div f is either Hutchinson's estimate
E_z[z^T (df/dx) z] with Rademacher or Gaussian probes drawn once per solve (jax.linearize gives
the Jacobian-vector products), or the exact trace from D basis vectors (small D only).

Bits per dimension of 8-bit data: levels k in {0..255} are dequantised to u = (k + U[0, 1)) / 256
in [0, 1)^D and mapped to y = 2u - 1 in [-1, 1)^D. For the density p_Y of y, the density of
k + U on [0, 256)^D is p_Y(y) (2/256)^D, and Jensen gives

  -log2 P(k) <= E_U[-log2 p_Y(y)] + D log2(128),  i.e.  bpd = -log p_Y(y) / (D ln 2) + 7.

All functions are pure and traceable; jit the call (likelihood_metrics.py shards the batch).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Tuple

import diffrax
import jax
import jax.numpy as jnp

from diffusion_jax import objectives
from diffusion_jax.objectives.base import Drift

SOLVERS = ('tsit5', 'dopri5')
PROBES = ('rademacher', 'gaussian', 'exact')

# apply_fn(x [B, H, W, C], t [B] float network timesteps) -> network output [B, H, W, C or 2C].
ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]


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
  """Result of `log_likelihood`: per example [B] unless noted."""
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


def log_likelihood(apply_fn: ApplyFn, config, y: jax.Array, rng: jax.Array,
                   **solver_options) -> ODELikelihood:
  """log p(y) [B] (nats) of continuous data y [B, H, W, C] under the model of `config`
  (diffusion.objective's `probability_flow`); apply_fn(x, t [B]) is the network with its labels
  closed over. solver_options: those of `solve_log_likelihood`."""
  flow = objectives.get(config.diffusion.objective).probability_flow(apply_fn, config)
  return solve_log_likelihood(flow.drift, y, rng, t0=flow.t0, t1=flow.t1,
                              prior_std=flow.prior_std, **solver_options)


def nll_bpd(apply_fn: ApplyFn, config, x: jax.Array, rng: jax.Array, *,
            dequantize_data: bool = True, **solver_options) -> jax.Array:
  """Negative log-likelihood in bits/dim [B] through the probability-flow ODE.

  x [B, H, W, C]: uint8 levels or float images in [-1, 1]. With `dequantize_data` (default) the
  8-bit levels are uniformly dequantised (one draw per call) and the result is the bound
  -log p_Y(y) / (D ln 2) + 7 on the discrete NLL that score_sde reports; otherwise float x is
  taken as continuous points and the result is -log p(x) / (D ln 2). NaN where the solver
  failed. Jit the call.
  """
  return nll_bpd_and_solve(apply_fn, config, x, rng, dequantize_data=dequantize_data,
                           **solver_options)[0]


def nll_bpd_and_solve(apply_fn: ApplyFn, config, x: jax.Array, rng: jax.Array, *,
                      dequantize_data: bool = True, **solver_options
                      ) -> Tuple[jax.Array, ODELikelihood]:
  """(`nll_bpd`'s bits/dim [B], the solve it came from: its step count and success)."""
  deq_key, probe_key = jax.random.split(rng)
  if dequantize_data:
    y = dequantize(x, deq_key)
  elif jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError('integer images need dequantize_data=True.')
  else:
    y = x.astype(jnp.float32)
  result = log_likelihood(apply_fn, config, y, probe_key, **solver_options)
  bpd = bpd_from_log_prob(result.log_prob, math.prod(x.shape[1:]), dequantize_data)
  return jnp.where(result.successful, bpd, jnp.nan), result
