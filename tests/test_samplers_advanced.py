"""Respacing, DPM-Solver++, Euler / Heun, guidance, thresholding and trajectories.

Most checks use Gaussian data x0 ~ N(mu, diag(sd^2)), for which the Bayes-optimal denoiser is
known in closed form (a = abar at the input's noise level):

  E[x0 | x_t]  = mu + sqrt(a) sd^2 / (a sd^2 + 1 - a) (x_t - sqrt(a) mu),
  E[eps | x_t] = sqrt(1 - a) / (a sd^2 + 1 - a) (x_t - sqrt(a) mu),

and so is the probability-flow ODE: in x = x_t / sqrt(a) = x0 + sigma eps, sigma^2 = (1 - a) / a,
each dimension solves x(sigma) - mu ∝ sqrt(sd^2 + sigma^2). Every deterministic sampler here
starts at x_T = noise at the last training step and ends with x0_hat at the first one, so with
an exact solver it returns

  ref = D(x*(sigma_min), sigma_min),  x*(s) = mu + (noise sqrt(1 + smax^2) - mu)
                                              sqrt(sd^2 + s^2) / sqrt(sd^2 + smax^2),

which the tests compare against sample by sample. It matches the data up to a variance factor
sd^2 / (sd^2 + smin^2) >= 0.9975 (sd >= 0.2, smin = 0.01) and a mean offset of |mu| / smax
< 0.004 sd (smax = 157), both far below the sampling error of the tests.
"""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default as default_config
from diffusion_jax.processes import discrete
from diffusion_jax.processes import respacing
from diffusion_jax.sampling import solvers
from diffusion_jax.sampling import loop
from diffusion_jax.sampling import karras
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes.validation import validate_config
from diffusion_jax.objectives import ddpm
from diffusion_jax.config import run_config

T = 1000
SHAPE = (4, 4, 1)
D = int(np.prod(SHAPE))
N = 4096

BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS)
LOG_SIGMA = 0.5 * np.log((1.0 - ABAR) / ABAR)
SIGMA_MIN, SIGMA_MAX = np.exp(LOG_SIGMA[0]), np.exp(LOG_SIGMA[-1])

_rng = np.random.default_rng(7)
MU = _rng.permutation(np.linspace(-0.5, 0.5, D))
SD = _rng.permutation(np.linspace(0.2, 0.7, D))
VAR = SD**2

SCHEDULE = discrete.schedule_from_betas(BETAS)
Z_TOL = 5.0  # z-score bound for each of the 2 x 16 moment statistics of a run.


# ------------------------------------------------------------------ the exact model


def exact_apply_fn(prediction_type='epsilon'):
  """apply_fn(x_t, t [B]) of the optimal model; float t: log sigma linear between steps."""
  log_sigma = jnp.asarray(LOG_SIGMA, jnp.float32)
  grid = jnp.arange(T, dtype=jnp.float32)
  mu = jnp.asarray(MU.reshape(SHAPE), jnp.float32)
  var = jnp.asarray(VAR.reshape(SHAPE), jnp.float32)

  def apply_fn(x_t, t):
    if jnp.issubdtype(t.dtype, jnp.integer):
      s2 = jnp.exp(2.0 * log_sigma[t]).reshape(-1, 1, 1, 1)
    else:
      s2 = jnp.exp(2.0 * jnp.interp(t, grid, log_sigma)).reshape(-1, 1, 1, 1)
    a = 1.0 / (1.0 + s2)
    centred = x_t - jnp.sqrt(a) * mu
    denom = a * var + 1.0 - a
    eps = jnp.sqrt(1.0 - a) / denom * centred
    x0 = mu + jnp.sqrt(a) * var / denom * centred
    return {'epsilon': eps, 'x0': x0, 'v': jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0
           }[prediction_type]
  return apply_fn


def exact_ode_reference(noise_flat):
  """`ref` of the module docstring for x_T = noise [n, D] (float64)."""
  x_start = noise_flat * np.sqrt(1.0 + SIGMA_MAX**2)
  x_end = MU + (x_start - MU) * np.sqrt(VAR + SIGMA_MIN**2) / np.sqrt(VAR + SIGMA_MAX**2)
  return MU + VAR / (VAR + SIGMA_MIN**2) * (x_end - MU)


def ancestral_law(abar, sampler='ddpm'):
  """(G, H, S2): ddpm / ddim(eta=1) on the steps with cumulative alphas `abar` returns
  G x_T + H + N(0, S2) per dimension, propagated in float64 from the papers' update rules."""
  abar_prev = np.append(1.0, abar[:-1])
  g, h, s2 = np.ones(D), np.zeros(D), np.zeros(D)
  for i in reversed(range(len(abar))):
    a, ap = abar[i], abar_prev[i]
    beta = 1.0 - a / ap
    denom = a * VAR + 1.0 - a
    k, e = np.sqrt(a) * VAR / denom, np.sqrt(1.0 - a) / denom  # x0_hat = mu + k c, eps = e c
    if sampler == 'ddpm':
      c1, c2 = beta * np.sqrt(ap) / (1 - a), (1 - ap) * np.sqrt(1 - beta) / (1 - a)
      lin, var = c1 * k + c2, (beta * (1 - ap) / (1 - a) if i > 0 else 0.0)
      off = c1 * (MU - k * np.sqrt(a) * MU)
    else:
      var = (1 - ap) / (1 - a) * (1 - a / ap)
      lin = np.sqrt(ap) * k + np.sqrt(max(1 - ap - var, 0.0)) * e
      off = np.sqrt(ap) * MU - lin * np.sqrt(a) * MU
    g, h, s2 = lin * g, lin * h + off, lin**2 * s2 + var
  return g, h, s2


def concentrated_steps(steps):
  """Kept steps from T-1 down to 0, quadratically denser near 0 (for few-step ODE solvers)."""
  kept = np.round((T - 1) * np.linspace(0.0, 1.0, steps)**2)
  return (np.maximum.accumulate(kept - np.arange(steps)) + np.arange(steps)).astype(int)


# ------------------------------------------------------------------ running samplers


def _noise(seed=0, n=N):
  """x_T, drawn with NumPy (no RNG program to compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n,) + SHAPE), jnp.float32)


def _key(seed):
  """A sampler key. 'rbg' keys compile far faster on CPU than threefry ones."""
  return jax.random.key(seed, impl='rbg')


def _flat(x):
  return np.asarray(x, np.float64).reshape(x.shape[0], -1)


@functools.lru_cache(maxsize=None)
def run(sampler, kept=None, prediction_type='epsilon', seed=0, rng_seed=1, **opts):
  """x0 [N, D] float64 of `sampler` on SCHEDULE (respaced to the tuple `kept` if given)."""
  schedule = SCHEDULE if kept is None else respacing.respace(SCHEDULE, np.asarray(kept))
  denoise = solvers.make_denoiser(exact_apply_fn(prediction_type), schedule, prediction_type,
                                   thresholding='none')
  fn = jax.jit(functools.partial(solvers.get_sampler(sampler), denoise, schedule, **opts))
  out = fn(_noise(seed), _key(rng_seed))
  assert out.shape == (N,) + SHAPE and out.dtype == jnp.float32
  x0 = _flat(out)
  x0.flags.writeable = False
  return x0


def run_solver(name, steps, **opts):
  """A deterministic sampler with `steps` model evaluations (on `concentrated_steps`)."""
  if name in ('euler', 'heun'):
    return run(name, steps=steps, **opts)
  return run(name, kept=tuple(concentrated_steps(steps)), **opts)


def path_error(x0, seed=0):
  """|x0 - ref| / sd per sample and dimension."""
  return np.abs(x0 - exact_ode_reference(_flat(_noise(seed)))) / SD


def z_scores(x, mean, var):
  n = x.shape[0]
  return ((x.mean(0) - mean) / np.sqrt(var / n),
          (x.var(0, ddof=1) - var) / (var * np.sqrt(2.0 / (n - 1))))


# ------------------------------------------------------------------ ODE samplers


DETERMINISTIC = [
    # name, steps, options, bound on the mean and on the max of |x0 - ref| / sd.
    ('ddim', 200, dict(eta=0.0), 0.02, 0.1),
    ('dpm_solver_pp', 50, dict(), 0.01, 0.06),
    ('dpm_solver_pp', 50, dict(solver_order=3), 3e-3, 0.02),
    ('dpm_solver_pp', 50, dict(solver_type='singlestep'), 0.01, 0.06),
    ('euler', 200, dict(), 0.03, 0.15),
    ('heun', 50, dict(), 0.02, 0.1),
]


@pytest.mark.parametrize('name,steps,opts,mean_tol,max_tol', DETERMINISTIC)
def test_deterministic_sampler_solves_the_ode_and_matches_the_data(name, steps, opts, mean_tol,
                                                                   max_tol):
  x0 = run_solver(name, steps, **opts)
  err = path_error(x0)
  assert err.mean() < mean_tol and err.max() < max_tol, (err.mean(), err.max())
  z_mean, z_var = z_scores(x0, MU, VAR)
  assert np.max(np.abs(z_mean)) < Z_TOL, z_mean
  assert np.max(np.abs(z_var)) < Z_TOL, z_var


@pytest.mark.parametrize('name,opts,few,many,min_ratio', [
    ('heun', {}, 5, 50, 30.0),
    ('dpm_solver_pp', {}, 5, 50, 10.0),
    ('dpm_solver_pp', dict(solver_order=3), 10, 50, 30.0),
    ('dpm_solver_pp', dict(solver_type='singlestep'), 10, 50, 5.0),
    ('euler', {}, 10, 100, 5.0),
])
def test_more_steps_are_more_accurate(name, opts, few, many, min_ratio):
  """The mean path error (deterministic: no sampling noise) falls with the step count."""
  coarse, fine = (path_error(run_solver(name, s, **opts)).mean() for s in (few, many))
  assert coarse > min_ratio * fine, (coarse, fine)


def test_deterministic_samplers_agree_with_each_other():
  """Different solvers of the same ODE map the same noise to (nearly) the same x0."""
  outs = {
      'ddim_full': run('ddim', eta=0.0),  # All 1000 steps.
      'dpm2m': run_solver('dpm_solver_pp', 100),
      'dpm3m': run_solver('dpm_solver_pp', 100, solver_order=3),
      'dpm2s': run_solver('dpm_solver_pp', 100, solver_type='singlestep'),
      'heun': run_solver('heun', 100),
  }
  names = sorted(outs)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      diff = np.abs(outs[a] - outs[b]) / SD
      assert diff.mean() < 0.01 and diff.max() < 0.05, (a, b, diff.mean(), diff.max())


def test_dpm_solver_coefficients_have_their_order():
  """On a lambda-uniform grid the global error of order k falls like 2^-k per halving of h."""
  mu, sd, x_t = 0.3, 0.2, 1.3

  def solve(abar, order, kind):
    w = solvers.dpm_solver_coefficients(abar, order, kind)
    x, hist = x_t, [0.0, 0.0, 0.0]  # x_prev, D_prev, D_prev2
    for i, a in enumerate(abar):
      d = mu + np.sqrt(a) * sd**2 / (a * sd**2 + 1 - a) * (x - np.sqrt(a) * mu)
      x, hist = w[i] @ np.array([x, hist[0], d, hist[1], hist[2]]), [x, d, hist[1]]
    return x

  def exact(abar):
    sig = np.sqrt((1 - abar) / abar)
    x_end = mu + (x_t / np.sqrt(abar[0]) - mu) * np.sqrt(sd**2 + sig[-1]**2) / np.sqrt(
        sd**2 + sig[0]**2)
    return mu + sd**2 / (sd**2 + sig[-1]**2) * (x_end - mu)

  for order, kind in [(1, 'multistep'), (2, 'multistep'), (3, 'multistep'), (2, 'singlestep')]:
    errs = []
    for n in (21, 41, 81, 161):
      abar = 1.0 / (1.0 + np.exp(-2.0 * np.linspace(-3.0, 3.0, n)))
      errs.append(abs(solve(abar, order, kind) - exact(abar)))
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert abs(rates[-1] - order) < 0.35, (order, kind, errs, rates)
  with pytest.raises(ValueError, match=r'sample\.solver_order'):
    solvers.dpm_solver_coefficients(ABAR[::-1], 3, 'singlestep')
  with pytest.raises(ValueError, match=r'sample\.solver_type'):
    solvers.dpm_solver_coefficients(ABAR[::-1], 2, 'adaptive')


@pytest.mark.parametrize('prediction_type', ['x0', 'v'])
def test_prediction_types_agree_for_new_samplers(prediction_type):
  """The same optimal model as x0 / v output gives the epsilon results (incl. float timesteps)."""
  kept = tuple(concentrated_steps(20))
  for name, kw in (('heun', dict(steps=20)), ('dpm_solver_pp', dict(kept=kept))):
    ref = run(name, **kw)
    out = run(name, prediction_type=prediction_type, **kw)
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)


def test_heun_with_churn_is_stochastic_and_matches_the_data():
  a = run('heun', steps=100, s_churn=10.0)
  b = run('heun', steps=100, s_churn=10.0, rng_seed=2)
  assert np.abs(a - b).mean() > 0.05  # Fresh noise from the rng ...
  for x0 in (a, b):                    # ... and still the data distribution.
    z_mean, _ = z_scores(x0, MU, VAR)
    assert np.max(np.abs(z_mean)) < Z_TOL, z_mean
    rel_var = x0.var(0, ddof=1) / VAR - 1.0
    assert np.max(np.abs(rel_var)) < 0.05 + Z_TOL * np.sqrt(2.0 / N), rel_var


def test_karras_sigmas_and_timestep_interpolation():
  sig = karras.karras_sigmas(0.01, 80.0, 5, rho=7.0)
  ramp = np.linspace(0, 1, 5)
  np.testing.assert_allclose(sig[:-1], (80**(1 / 7) + ramp * (0.01**(1 / 7) - 80**(1 / 7)))**7)
  assert sig[0] == pytest.approx(80.0) and sig[-2] == pytest.approx(0.01) and sig[-1] == 0.0
  np.testing.assert_allclose(karras.karras_sigmas(0.01, 80.0, 1), [80.0, 0.0])
  np.testing.assert_allclose(solvers.schedule_sigmas(SCHEDULE), np.exp(LOG_SIGMA), rtol=1e-5)
  # At the schedule's own sigmas the interpolated timestep is the integer step; in between it
  # is linear in log sigma; outside the range it is clamped.
  sigmas = solvers.schedule_sigmas(SCHEDULE)
  np.testing.assert_allclose(solvers.sigma_to_timestep(SCHEDULE, sigmas), np.arange(T),
                             atol=1e-6)
  mid = np.exp(0.5 * (np.log(sigmas[10]) + np.log(sigmas[11])))
  assert solvers.sigma_to_timestep(SCHEDULE, np.array([mid]))[0] == pytest.approx(10.5)
  np.testing.assert_allclose(solvers.sigma_to_timestep(SCHEDULE, np.array([1e-5, 1e5])),
                             [0, T - 1])
  # A respaced schedule maps to its kept (original) timesteps.
  kept = np.array([0, 10, 500, 999])
  np.testing.assert_allclose(
      solvers.sigma_to_timestep(respacing.respace(SCHEDULE, kept), sigmas[kept]), kept,
      atol=0.01)


# ------------------------------------------------------------------ ancestral samplers


@pytest.mark.parametrize('name,kept,opts,var_budget', [
    ('ddpm', None, dict(variance='fixed_small'), 0.05),
    ('ddim', None, dict(eta=1.0), 0.05),
    ('ddpm', tuple(respacing.respaced_timesteps(T, 100, 'linspace')),
     dict(variance='fixed_small'), 0.30),
])
def test_ancestral_samplers_match_their_exact_law_and_the_data(name, kept, opts, var_budget):
  """Samples follow the float64 law of the chain; means match the data within sampling error.

  The variance bias is the method's own (float64 law): at most 3.7% with all 1000 steps, but
  24% (on the sd = 0.2 dimension) for fixed_small ancestral sampling on 100 respaced steps.
  """
  x0 = run(name, kept=kept, **opts)
  abar = ABAR if kept is None else ABAR[np.asarray(kept)]
  g, h, s2 = ancestral_law(abar, name)
  z_mean, z_var = z_scores(x0, h, g**2 + s2)
  assert np.max(np.abs(z_mean)) < Z_TOL and np.max(np.abs(z_var)) < Z_TOL, (z_mean, z_var)
  z_mean, _ = z_scores(x0, MU, VAR)
  assert np.max(np.abs(z_mean)) < Z_TOL, z_mean
  rel_var = x0.var(0, ddof=1) / VAR - 1.0
  assert np.max(np.abs(rel_var)) < var_budget + Z_TOL * np.sqrt(2.0 / N), rel_var
  assert np.max(np.abs((g**2 + s2) / VAR - 1.0)) < var_budget  # The budget is honest.


def test_ddim_steps_on_the_full_schedule_equals_the_respaced_schedule():
  noise, key = _noise(3, 64), _key(4)
  full = solvers.make_denoiser(exact_apply_fn(), SCHEDULE, 'epsilon')
  a = jax.jit(lambda n, k: solvers.ddim_sample(full, SCHEDULE, n, k, steps=20, eta=0.5))(
      noise, key)
  kept = respacing.respaced_timesteps(T, 20, 'leading')
  np.testing.assert_array_equal(kept, solvers.ddim_timesteps(T, 20))
  short = respacing.respace(SCHEDULE, kept)
  denoise = solvers.make_denoiser(exact_apply_fn(), short, 'epsilon')
  b = jax.jit(lambda n, k: solvers.ddim_sample(denoise, short, n, k, eta=0.5))(noise, key)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match=r'sample\.steps'):
    solvers.ddim_sample(full, SCHEDULE, noise, key, steps=T + 1)


# ------------------------------------------------------------------ respacing


def test_respaced_timesteps_known_cases():
  r = respacing.respaced_timesteps
  np.testing.assert_array_equal(r(10, 5, 'linspace'), [0, 2, 4, 7, 9])  # round half to even
  np.testing.assert_array_equal(r(10, 3, 'leading'), [0, 3, 6])
  np.testing.assert_array_equal(r(10, 3, 'uniform'), [0, 3, 6])
  np.testing.assert_array_equal(r(10, 3, 'trailing'), [2, 6, 9])
  np.testing.assert_array_equal(r(1000, 4, 'trailing'), [249, 499, 749, 999])
  np.testing.assert_array_equal(r(20, 5, 'quadratic'), [0, 1, 4, 9, 16])  # (0..4)^2, 4 = sqrt(16)
  # 8 (linspace(0, sqrt(8), 6))^2 = 0, .32, 1.28, 2.88, 5.12, 8 -> 0, 0, 1, 2, 5, 8: the
  # duplicate is pushed up one step at a time.
  np.testing.assert_array_equal(r(10, 6, 'quadratic'), [0, 1, 2, 3, 5, 8])
  np.testing.assert_array_equal(r(1000, 50, 'ddim50'), np.arange(0, 1000, 20))
  np.testing.assert_array_equal(r(10, None, 'ddim3'), [0, 4, 8])   # stride 3 gives 4 steps
  np.testing.assert_array_equal(r(1000, 7, 'ddim250'), np.arange(0, 1000, 4))  # steps ignored
  np.testing.assert_array_equal(r(30, None, '10,10,10'), np.arange(30))
  np.testing.assert_array_equal(
      r(300, None, '10,10,10'),
      np.concatenate([start + np.arange(0, 100, 11) for start in (0, 100, 200)]))
  np.testing.assert_array_equal(r(10, None, '2,3'), [0, 4, 5, 7, 9])
  np.testing.assert_array_equal(r(11, None, '2,3'), [0, 5, 6, 8, 10])  # 6 + 5 steps
  np.testing.assert_array_equal(r(10, None, '1'), [0])
  np.testing.assert_array_equal(r(1000, None, '250'), np.round(np.linspace(0, 999, 250)))
  for spacing in ('linspace', 'leading', 'trailing', 'quadratic'):
    for steps in (1, 2, 7, 50, 333, 999, 1000):
      kept = r(1000, steps, spacing)
      assert len(kept) == steps and kept.dtype == np.int32, (spacing, steps)
      assert kept[0] >= 0 and kept[-1] <= 999 and np.all(np.diff(kept) > 0), (spacing, steps)
    np.testing.assert_array_equal(r(1000, 1000, spacing), np.arange(1000))


@pytest.mark.parametrize('spacing,steps,field', [
    ('cosine', 10, r'sample\.spacing'),
    ('ddim', None, r'sample\.spacing'),
    ('ddimX', None, r'sample\.spacing'),
    ('ddim7', None, r'sample\.spacing'),   # T = 10: strides give 10, 5, 4, 3, 2 or 1 steps.
    ('10,x', None, r'sample\.spacing'),
    ('20,5', None, r'sample\.spacing'),    # Section 0 has 5 steps.
    ('3,0', None, r'sample\.spacing'),
    ('linspace', 0, r'sample\.steps'),
    ('leading', 11, r'sample\.steps'),
    ('trailing', None, r'sample\.steps'),
])
def test_respaced_timesteps_errors(spacing, steps, field):
  with pytest.raises(ValueError, match=field):
    respacing.respaced_timesteps(10, steps, spacing)


@pytest.mark.parametrize('spacing', ['linspace', 'leading', 'trailing', 'quadratic', 'ddim25',
                                     '5,10,10'])
def test_respace_keeps_alphas_cumprod(spacing):
  for schedule in (SCHEDULE, discrete.schedule_from_betas(discrete.cosine_betas(T))):
    kept = respacing.respaced_timesteps(T, 25, spacing)
    short = respacing.respace(schedule, kept)
    assert short.num_timesteps == len(kept) == 25
    np.testing.assert_allclose(short.alphas_cumprod, np.asarray(schedule.alphas_cumprod)[kept],
                               rtol=1e-6)
    np.testing.assert_array_equal(short.timesteps, kept)
    # Posterior variances are those of the kept chain:
    # beta~_i = beta'_i (1 - abar'_{i-1}) / (1 - abar'_i).
    abar = respacing.alphas_cumprod64(schedule)[kept]
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1.0 - abar / abar_prev
    np.testing.assert_allclose(short.posterior_variance, beta * (1 - abar_prev) / (1 - abar),
                               rtol=1e-5)
  # Respacing composes: the network timesteps stay the original ones.
  twice = respacing.respace(respacing.respace(SCHEDULE, np.arange(0, T, 2)), np.array([0, 5, 9]))
  np.testing.assert_array_equal(twice.timesteps, [0, 10, 18])
  np.testing.assert_allclose(twice.alphas_cumprod, ABAR[[0, 10, 18]], rtol=1e-6)
  # Keeping everything reproduces the schedule.
  same = respacing.respace(SCHEDULE, np.arange(T))
  np.testing.assert_allclose(same.betas, SCHEDULE.betas, rtol=1e-4)  # float32 abar ratios
  np.testing.assert_allclose(respacing.alphas_cumprod64(SCHEDULE), ABAR, rtol=1e-6)
  np.testing.assert_allclose(1 - respacing.alphas_cumprod64(SCHEDULE), 1 - ABAR, rtol=1e-6)
  for bad in ([3, 2], [0, 0], [-1, 4], [T], [0.5]):
    with pytest.raises(ValueError, match='strictly increasing'):
      respacing.respace(SCHEDULE, np.array(bad))


# ------------------------------------------------------------------ the denoiser


def _toy_labelled(calls=None, channels=1):
  """apply_fn(x, t, y) whose output depends on the labels (and records traced batch sizes)."""
  def apply_fn(x, t, y):
    if calls is not None:
      calls.append(x.shape[0])
    scale = (0.2 + 0.1 * y.astype(jnp.float32)).reshape(-1, 1, 1, 1)
    out = scale * x + 1e-3 * t.astype(jnp.float32).reshape(-1, 1, 1, 1)
    return jnp.concatenate([out, jnp.tanh(out)], axis=-1) if channels == 2 else out
  return apply_fn


def test_guidance_reduces_exactly_and_combines_linearly():
  x, t, null = _noise(1, 6), 500, 10
  labels = jnp.array([0, 1, 2, 3, 4, 5], jnp.int32)

  def pred(scale, y=labels, calls=None):
    denoise = solvers.make_denoiser(_toy_labelled(calls), SCHEDULE, 'epsilon',
                                     thresholding='none', labels=y, null_label=null,
                                     guidance_scale=scale)
    return jax.jit(denoise)(x, t)

  cond, uncond = pred(1.0), pred(1.0, y=jnp.full((6,), null, jnp.int32))
  np.testing.assert_array_equal(pred(0.0).eps, uncond.eps)
  np.testing.assert_array_equal(pred(0.0).x0, uncond.x0)
  np.testing.assert_array_equal(pred(1.0).eps, cond.eps)
  assert not np.allclose(cond.eps, uncond.eps)
  for scale in (0.5, 2.5, 7.5):
    calls = []
    guided = pred(scale, calls=calls)
    assert calls == [12]  # One doubled network call.
    np.testing.assert_allclose(guided.eps, uncond.eps + scale * (cond.eps - uncond.eps),
                               rtol=1e-5, atol=1e-5)
  # A traced scale takes the doubled path and agrees.
  traced = jax.jit(lambda s: solvers.make_denoiser(
      _toy_labelled(), SCHEDULE, 'epsilon', thresholding='none', labels=labels,
      null_label=null, guidance_scale=s)(x, t).eps)
  np.testing.assert_allclose(traced(2.5), pred(2.5).eps, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r'guidance_scale'):
    solvers.make_denoiser(exact_apply_fn(), SCHEDULE, 'epsilon', guidance_scale=3.0)
  with pytest.raises(ValueError, match='null_label'):
    solvers.make_denoiser(_toy_labelled(), SCHEDULE, 'epsilon', labels=labels,
                           guidance_scale=3.0)
  with pytest.raises(ValueError, match='labels'):
    solvers.make_denoiser(exact_apply_fn(), SCHEDULE, 'epsilon', labels=labels)


def test_guidance_with_learned_sigma_takes_the_variance_from_the_conditional_half():
  x, t, null = _noise(1, 4), 300, 10
  labels = jnp.array([0, 1, 2, 3], jnp.int32)
  apply_fn = _toy_labelled(channels=2)
  guided = jax.jit(solvers.make_denoiser(apply_fn, SCHEDULE, 'epsilon', thresholding='none',
                                          labels=labels, null_label=null, guidance_scale=3.0,
                                          learn_sigma=True))(x, t)
  t_batch = np.full((4,), t)
  out_c = np.asarray(jax.jit(apply_fn)(x, t_batch, labels), np.float64)
  out_u = np.asarray(jax.jit(apply_fn)(x, t_batch, np.full((4,), null)), np.float64)
  eps = out_u[..., :1] + 3.0 * (out_c[..., :1] - out_u[..., :1])
  np.testing.assert_allclose(guided.eps, eps, rtol=1e-5, atol=1e-6)
  frac = (out_c[..., 1:] + 1) / 2  # learned_range: the variance channels of the conditional half
  post_var = BETAS[t] * (1 - ABAR[t - 1]) / (1 - ABAR[t])
  np.testing.assert_allclose(guided.log_variance,
                             frac * np.log(BETAS[t]) + (1 - frac) * np.log(post_var), rtol=1e-5)


def test_learned_range_log_variance_matches_the_formula():
  v = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (5,) + SHAPE), jnp.float32)
  apply_fn = lambda x, t: jnp.concatenate([jnp.zeros_like(x), v], axis=-1)
  denoise = jax.jit(solvers.make_denoiser(apply_fn, SCHEDULE, 'epsilon', learn_sigma=True))
  post_var = BETAS[1:] * (1 - ABAR[:-1]) / (1 - ABAR[1:])
  log_small = np.log(np.append(post_var[0], post_var))  # beta~_1 at t = 0
  for t in (0, 1, 37, 999):
    frac = (np.asarray(v, np.float64) + 1) / 2
    expected = frac * np.log(BETAS[t]) + (1 - frac) * log_small[t]
    np.testing.assert_allclose(denoise(_noise(0, 5), t).log_variance, expected, rtol=1e-4,
                               atol=1e-5)
  # No learned variance at continuous noise levels or without learn_sigma.
  assert jax.eval_shape(denoise, _noise(0, 5), 10.5, sigma=0.3).log_variance is None
  assert jax.eval_shape(solvers.make_denoiser(exact_apply_fn(), SCHEDULE, 'epsilon'),
                        _noise(0, 5), 3).log_variance is None


def test_ddpm_learned_range_at_its_ends_is_fixed_small_and_fixed_large():
  """v = -1 gives sigma^2 = beta~_t and v = +1 gives beta_t: the fixed variances, same noise."""
  inner = exact_apply_fn()
  noise, key = _noise(2, 256), _key(5)

  def sample(variance, v=None):
    if v is None:
      apply_fn, learn = inner, False
    else:
      apply_fn = lambda x, t: jnp.concatenate([inner(x, t), jnp.full_like(x, v)], axis=-1)
      learn = True
    denoise = solvers.make_denoiser(apply_fn, SCHEDULE, 'epsilon', learn_sigma=learn)
    return jax.jit(lambda n, k: solvers.ddpm_sample(denoise, SCHEDULE, n, k,
                                                     variance=variance))(noise, key)

  np.testing.assert_allclose(sample('learned_range', -1.0), sample('fixed_small'), atol=1e-4)
  np.testing.assert_allclose(sample('learned_range', 1.0), sample('fixed_large'), atol=1e-4)
  denoise = solvers.make_denoiser(inner, SCHEDULE, 'epsilon')
  with pytest.raises(ValueError, match='learn_sigma'):
    solvers.ddpm_sample(denoise, SCHEDULE, noise, key, variance='learned_range')


def test_thresholding():
  rng = np.random.default_rng(3)
  x0_out = (rng.standard_normal((6,) + SHAPE) * np.array([0.3, 0.9, 1.5, 3.0, 6.0, 0.1])
            .reshape(-1, 1, 1, 1)).astype(np.float32)
  x_t = _noise(4, 6)
  t = 200
  a, s = np.sqrt(ABAR[t]), np.sqrt(1 - ABAR[t])
  apply_fn = lambda x, tt: jnp.asarray(x0_out)

  def pred(**kw):
    return jax.jit(solvers.make_denoiser(apply_fn, SCHEDULE, 'x0', **kw))(x_t, t)

  xt = np.asarray(x_t, np.float64)
  for p in (0.995, 0.9, 0.5):
    flat = np.abs(x0_out.astype(np.float64)).reshape(6, -1)
    scale = np.maximum(np.quantile(flat, p, axis=1), 1.0).reshape(-1, 1, 1, 1)
    expected = np.clip(x0_out, -scale, scale) / scale
    out = pred(thresholding='dynamic', dynamic_threshold_percentile=p)
    np.testing.assert_allclose(out.x0, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.eps, (xt - a * expected) / s, rtol=1e-4, atol=1e-4)
  # Examples already inside [-1, 1] are untouched.
  np.testing.assert_allclose(pred(thresholding='dynamic').x0[5], x0_out[5], rtol=1e-6)
  np.testing.assert_allclose(pred(thresholding='static').x0, np.clip(x0_out, -1, 1))
  np.testing.assert_allclose(pred(clip_denoised=True).x0, np.clip(x0_out, -1, 1))
  np.testing.assert_allclose(pred(thresholding='none').x0, x0_out)
  np.testing.assert_allclose(pred(clip_denoised=False).x0, x0_out)
  np.testing.assert_allclose(pred(clip_denoised=False, thresholding='static').x0,
                             np.clip(x0_out, -1, 1))
  with pytest.raises(ValueError, match=r'sample\.thresholding'):
    pred(thresholding='soft')


def test_denoiser_at_a_continuous_noise_level():
  """denoise(x_t, timestep, sigma=s) equals the model at that timestep, converted with abar(s)."""
  x = _noise(6, 4)
  for pt in ('epsilon', 'x0', 'v'):
    denoise = solvers.make_denoiser(exact_apply_fn(pt), SCHEDULE, pt, thresholding='none')
    both = jax.jit(lambda t, sigma: (denoise(x, t), denoise(x, t.astype(jnp.float32),
                                                            sigma=sigma)))
    for t in (0, 17, 999):  # At schedule steps both paths agree.
      a, b = both(jnp.int32(t), jnp.float32(np.exp(LOG_SIGMA[t])))
      np.testing.assert_allclose(a.x0, b.x0, rtol=2e-4, atol=2e-4)
      np.testing.assert_allclose(a.eps, b.eps, rtol=2e-4, atol=2e-4)
  seen = []
  apply_fn = lambda x, t: (seen.append(t.dtype), jnp.zeros_like(x))[1]
  jax.eval_shape(solvers.make_denoiser(apply_fn, SCHEDULE, 'epsilon'), x, 12.25, sigma=0.1)
  jax.eval_shape(solvers.make_denoiser(apply_fn, SCHEDULE, 'epsilon'), x, 12)
  assert seen == [jnp.float32, jnp.int32]


# ------------------------------------------------------------------ trajectories and tracing


ALL_SAMPLERS = [
    ('ddpm', dict(variance='fixed_large'), 40),
    ('ddim', dict(eta=0.3), 40),
    ('dpm_solver_pp', dict(solver_order=3), 40),
    ('dpm_solver_pp', dict(solver_type='singlestep'), 40),
    ('euler', dict(steps=40, s_churn=5.0), 40),
    ('heun', dict(steps=40), 40),
]
SHORT = respacing.respace(SCHEDULE, respacing.respaced_timesteps(T, 40, 'trailing'))


def _short_setup(name, apply_fn=None):
  schedule = SCHEDULE if name in solvers.CONTINUOUS_SAMPLERS else SHORT
  denoise = solvers.make_denoiser(apply_fn or exact_apply_fn(), schedule, 'epsilon')
  return denoise, schedule


@pytest.mark.parametrize('name,opts,steps', ALL_SAMPLERS)
def test_trajectory(name, opts, steps):
  denoise, schedule = _short_setup(name)
  noise, key = _noise(8, 16), _key(9)
  fn = jax.jit(functools.partial(solvers.get_sampler(name), denoise, schedule, **opts),
               static_argnames='trajectory_every')
  out = fn(noise, key)
  trajs = {}
  for every in (1, 7, 40):
    out2, traj = fn(noise, key, trajectory_every=every)
    assert isinstance(traj, loop.Trajectory)
    assert traj.x_t.shape == traj.x0.shape == (math.ceil(steps / every), 16) + SHAPE
    np.testing.assert_allclose(out2, out, atol=1e-5)
    np.testing.assert_array_equal(traj.x_t[-1], out2)
    # The last step goes to the clean sample: the output is the last x0 prediction.
    np.testing.assert_allclose(traj.x0[-1], out2, atol=1e-4)
    assert np.all(np.isfinite(traj.x_t)) and np.all(np.isfinite(traj.x0))
    trajs[every] = traj
  # Slot j of every 7 holds step min(7 (j + 1), steps) - 1, the end of its chunk.
  rows = np.minimum(7 * np.arange(1, math.ceil(steps / 7) + 1), steps) - 1
  for field in ('x_t', 'x0'):
    np.testing.assert_allclose(getattr(trajs[7], field), getattr(trajs[1], field)[rows],
                               atol=1e-5)
  # x_t loses its noise along the way: its distance to the final sample shrinks.
  dist = np.abs(np.asarray(trajs[1].x_t) - np.asarray(out)).mean(axis=(1, 2, 3, 4))
  assert dist[0] > dist[steps // 2] > dist[-1]


@pytest.mark.parametrize('name,opts,steps', ALL_SAMPLERS)
@pytest.mark.parametrize('guided', [False, True])
def test_each_sampler_is_one_loop_with_few_model_traces(name, opts, steps, guided):
  calls = []
  inner = exact_apply_fn()

  def apply_fn(x, t, y):
    assert y.shape == t.shape == x.shape[:1]
    calls.append(x.shape[0])  # Once per trace of the model.
    return inner(x, t)

  schedule = SCHEDULE if name in solvers.CONTINUOUS_SAMPLERS else SHORT
  labels = jnp.zeros((2,), jnp.int32)
  denoise = solvers.make_denoiser(apply_fn, schedule, 'epsilon', labels=labels, null_label=3,
                                   guidance_scale=4.0 if guided else 1.0)
  for every in (0, 8):
    calls.clear()
    fn = jax.jit(functools.partial(solvers.get_sampler(name), denoise, schedule,
                                   trajectory_every=every, **opts))
    closed = jax.make_jaxpr(fn)(_noise(0, 2), _key(0))
    assert 1 <= len(calls) <= (2 if name == 'heun' else 1), calls
    assert set(calls) == {4 if guided else 2}
    (jit_eqn,) = closed.jaxpr.eqns
    body = jit_eqn.params['jaxpr'].jaxpr
    loops = [e for e in body.eqns if e.primitive.name in ('while', 'scan')]
    assert len(loops) == 1, [e.primitive.name for e in body.eqns]
    if loops[0].primitive.name == 'scan':
      assert loops[0].params['length'] == steps
    assert len(body.eqns) < 25, [e.primitive.name for e in body.eqns]


# ------------------------------------------------------------------ config entry point


def _sample_config(**overrides):
  """The default config (objective ddpm, the linear schedule of SCHEDULE) with sample.* set."""
  cfg = default_config.get_config()
  for k, v in overrides.items():
    cfg.sample[k] = v
  return cfg


def test_sample_from_config_dispatches(monkeypatch):
  """Which schedule, options and denoiser each config reaches the sampler with."""
  seen = {}

  def recorder(denoise, schedule, noise, rng, **options):
    seen.update(denoise=denoise, schedule=schedule, options=options)
    return noise

  for name in solvers.SAMPLERS:
    monkeypatch.setitem(solvers.SAMPLERS, name, recorder)
  noise = _noise(10, 4)
  big = 3.0 * np.random.default_rng(0).standard_normal((4,) + SHAPE).astype(np.float32)
  x0_model = lambda x, t: jnp.asarray(big)  # An 'x0' model with values outside [-1, 1].

  def dispatch(config, apply_fn=exact_apply_fn(), prediction_type='epsilon', learn_sigma=False,
               **kw):
    config.diffusion.ddpm.prediction_type = prediction_type
    config.model.learn_sigma = learn_sigma
    ddpm.sample(apply_fn, config, noise, _key(0), **kw)
    return seen['schedule'], seen['options']

  def assert_full(schedule):  # The training schedule itself, not respaced.
    np.testing.assert_array_equal(schedule.timesteps, SCHEDULE.timesteps)
    np.testing.assert_array_equal(schedule.betas, SCHEDULE.betas)

  schedule, options = dispatch(_sample_config(sampler='ddim', steps=20, eta=0.5))
  np.testing.assert_array_equal(schedule.timesteps, np.arange(0, T, 50))  # leading
  assert options == dict(eta=0.5, set_alpha_to_one=True, trajectory_every=0)
  schedule, options = dispatch(_sample_config(sampler='dpm_solver_pp', steps=10,
                                              spacing='trailing', solver_order=3))
  np.testing.assert_array_equal(schedule.timesteps, np.arange(99, T, 100))
  assert options == dict(solver_order=3, solver_type='multistep', trajectory_every=0)
  schedule, options = dispatch(_sample_config(sampler='ddpm', steps=0,
                                              variance='learned_range'), learn_sigma=True,
                               trajectory_every=5)
  assert_full(schedule)
  assert options == dict(variance='learned_range', trajectory_every=5)
  schedule, _ = dispatch(_sample_config(sampler='ddpm', steps=0, spacing='ddim25'))
  np.testing.assert_array_equal(schedule.timesteps, np.arange(0, T, 40))
  schedule, _ = dispatch(_sample_config(sampler='ddpm', steps=100, spacing='linspace'))
  np.testing.assert_array_equal(schedule.timesteps, np.round(np.linspace(0, T - 1, 100)))
  schedule, options = dispatch(_sample_config(sampler='heun', steps=12, rho=5.0, s_churn=1.0))
  assert_full(schedule)
  assert options == dict(steps=12, rho=5.0, s_churn=1.0, s_tmin=0.0, s_tmax=float('inf'),
                         s_noise=1.0, trajectory_every=0)
  # The denoiser is built on the respaced schedule ...
  _, options = dispatch(_sample_config(sampler='ddim', steps=4, spacing='trailing'))
  short = respacing.respace(SCHEDULE, respacing.respaced_timesteps(T, 4, 'trailing'))
  expected = solvers.make_denoiser(exact_apply_fn(), short, 'epsilon')
  np.testing.assert_allclose(jax.jit(seen['denoise'])(noise, 1).eps,
                             jax.jit(expected)(noise, 1).eps, rtol=1e-6)
  # ... with the configured thresholding; clip_denoised=False turns it off; 'auto' (the default)
  # clips for ddpm / ddim only, as diffusers' schedulers do.
  for overrides, expected in [
      (dict(), np.clip(big, -1, 1)),
      (dict(sampler='ddpm'), np.clip(big, -1, 1)),
      (dict(sampler='dpm_solver_pp'), big),
      (dict(sampler='heun', steps=3), big),
      (dict(sampler='dpm_solver_pp', thresholding='static'), np.clip(big, -1, 1)),
      (dict(thresholding='none'), big),
      (dict(clip_denoised=False), big),
      (dict(thresholding='dynamic', dynamic_threshold_percentile=0.5),
       np.asarray(solvers.dynamic_threshold(jnp.asarray(big), 0.5)))]:
    dispatch(_sample_config(**overrides), apply_fn=x0_model, prediction_type='x0')
    np.testing.assert_allclose(jax.jit(seen['denoise'])(noise, 3).x0, expected, rtol=1e-6,
                               err_msg=str(overrides))
  # eps: the one of the clipped x0 by default (use_clipped_model_output=True), or the model's
  # own with diffusers' default use_clipped_model_output=False; x_t = a x0 + s eps at index 3.
  a, s = SCHEDULE.sqrt_alphas_cumprod[3], SCHEDULE.sqrt_one_minus_alphas_cumprod[3]
  for use_clipped, x0 in [(False, big), (True, np.clip(big, -1, 1))]:
    dispatch(_sample_config(steps=1000, use_clipped_model_output=use_clipped),
             apply_fn=x0_model, prediction_type='x0')
    np.testing.assert_allclose(jax.jit(seen['denoise'])(noise, 3).eps,
                               (np.asarray(noise) - a * x0) / s, rtol=1e-5, atol=1e-5)
  # ... and guidance.
  labels = jnp.arange(4, dtype=jnp.int32)
  schedule, _ = dispatch(_sample_config(guidance_scale=2.0), apply_fn=_toy_labelled(),
                         labels=labels, null_label=10)
  guided = solvers.make_denoiser(_toy_labelled(), schedule, 'epsilon', labels=labels,
                                  null_label=10, guidance_scale=2.0)
  np.testing.assert_allclose(jax.jit(seen['denoise'])(noise, 3).eps,
                             jax.jit(guided)(noise, 3).eps, rtol=1e-6)
  # Configs saved without the newer sample fields (an older version) read back with the defaults.
  old = run_config.config_from_json(json.dumps({'sample': dict(
      sampler='dpm_solver_pp', steps=20, eta=0.5, variance='fixed_small', clip_denoised=True)}))
  schedule, options = dispatch(old)  # 'leading' as DPMSolverMultistepScheduler reads it.
  np.testing.assert_array_equal(schedule.timesteps, np.arange(1, 21) * (T // 21))
  assert options == dict(solver_order=2, solver_type='multistep', trajectory_every=0)


def test_sample_from_config_end_to_end():
  noise, key = _noise(10, 32), _key(11)
  labels = jnp.zeros((32,), jnp.int32)
  config = _sample_config(sampler='dpm_solver_pp', steps=6, guidance_scale=2.0,
                          spacing='linspace')
  out, traj = jax.jit(lambda n, k, y: ddpm.sample(
      _toy_labelled(), config, n, k, labels=y, null_label=10, trajectory_every=4))(
          noise, key, labels)
  assert out.shape == noise.shape and traj.x_t.shape == (2, 32) + SHAPE
  np.testing.assert_array_equal(traj.x_t[-1], out)
  out_5, traj_5 = jax.jit(lambda n, k, y: ddpm.sample(
      _toy_labelled(), config, n, k, labels=y, null_label=10, trajectory_every=4,
      trajectory_images=5))(noise, key, labels)
  assert traj_5.x_t.shape == traj_5.x0.shape == (2, 5) + SHAPE
  np.testing.assert_array_equal(out_5, out)
  np.testing.assert_allclose(traj_5.x0, traj.x0[:, :5], atol=1e-6)


def test_config_validation_of_sampling_fields():
  def errors(**overrides):
    config = default_config.get_config()
    config.data.dataset = 'digits'
    for k, v in overrides.items():
      section, field = k.split('__')
      config[section][field] = v
    try:
      validate_config(config, mode='sample', num_devices=1, num_processes=1)
    except ConfigError as e:
      return str(e)
    return ''

  assert errors() == ''
  for sampler in solvers.SAMPLERS:
    assert errors(sample__sampler=sampler) == '', sampler
  assert errors(sample__sampler='ddpm', sample__steps=0) == ''
  assert errors(sample__spacing='ddim50', sample__steps=0) == ''
  assert errors(sample__thresholding='dynamic') == ''
  assert errors(sample__guidance_scale=3.0, model__num_classes=10) == ''
  assert errors(sample__variance='learned_range', model__learn_sigma=True,
                sample__sampler='ddpm') == ''
  for overrides, field in [
      (dict(sample__spacing='cosine'), 'sample.spacing'),
      (dict(sample__spacing='ddim999'), 'sample.spacing'),
      (dict(sample__steps=0), 'sample.steps'),
      (dict(sample__steps=2000), 'sample.steps'),
      (dict(sample__sampler='heun', sample__steps=0), 'sample.steps'),
      (dict(sample__guidance_scale=3.0), 'sample.guidance_scale'),
      (dict(sample__guidance_scale=-1.0, model__num_classes=10), 'sample.guidance_scale'),
      (dict(sample__thresholding='soft'), 'sample.thresholding'),
      (dict(sample__thresholding='dynamic', sample__clip_denoised=False), 'sample.clip_denoised'),
      (dict(sample__dynamic_threshold_percentile=1.5), 'sample.dynamic_threshold_percentile'),
      (dict(sample__variance='learned_range', sample__sampler='ddpm'), 'sample.variance'),
      (dict(sample__variance='learned'), 'sample.variance'),
      (dict(sample__solver_order=4), 'sample.solver_order'),
      (dict(sample__solver_type='adaptive'), 'sample.solver_type'),
      (dict(sample__solver_type='singlestep', sample__solver_order=3), 'sample.solver_order'),
      (dict(sample__rho=0.0), 'sample.rho'),
      (dict(sample__s_churn=-1.0), 'sample.s_churn'),
      (dict(sample__s_tmin=2.0, sample__s_tmax=1.0), 'sample.s_tmax'),
      (dict(sample__s_noise=-0.5), 'sample.s_noise'),
  ]:
    assert field in errors(**overrides), (overrides, errors(**overrides))


@pytest.mark.parametrize('eta_is_traced', [False, True])
def test_ddim_eta_coefficients_are_float64_exact(eta_is_traced):
  """With x0 = 0 and eps = 1 every DDIM step gives x = c_t + sigma_t z_i (z_i the step's noise,
  reproducible from the key), so (c_t, sigma_t) of each step is read off exactly and compared to
  the float64 formulas of Song et al. At the last steps c_t = sqrt(1 - abar_prev - sigma^2) is a
  difference of nearly equal numbers that float32 gets ~0.5% wrong."""
  from diffusion_jax.processes import respacing  # pylint: disable=g-import-not-at-top
  schedule = discrete.make_schedule(ml_collections.ConfigDict(dict(
      num_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02)))
  steps, eta, shape = 20, 1.0, (64, 4, 4, 1)
  kept = respacing.respaced_timesteps(1000, steps, 'leading')
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[kept]
  abar_prev = np.append(1.0, abar[:-1])
  sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
  coef = np.sqrt(1 - abar_prev - sigma**2)

  def denoise(x, t, sigma=None):
    del t, sigma
    return solvers.Prediction(jnp.zeros_like(x), jnp.ones_like(x))
  rng = jax.random.PRNGKey(3)
  run = lambda e: solvers.ddim_sample(denoise, schedule, jnp.zeros(shape), rng, steps=steps,
                                       eta=e, trajectory_every=1)[1].x_t
  x_t = np.asarray(jax.jit(run)(eta) if eta_is_traced else run(eta), np.float64)
  for i in range(steps - 1):  # The last step (to abar_prev = 1) has no noise and c = 0.
    t = steps - 1 - i
    z = np.asarray(loop.step_normal(rng, i, shape), np.float64).ravel()
    fit_c, fit_sigma = np.linalg.lstsq(np.stack([np.ones_like(z), z], 1), x_t[i].ravel(),
                                       rcond=None)[0]
    np.testing.assert_allclose([fit_c, fit_sigma], [coef[t], sigma[t]], rtol=2e-6 if not
                               eta_is_traced else 1e-4, err_msg=f'step {i} (t={t})')


# ------------------------------------------------------------------ recorded trajectory rows


@pytest.mark.parametrize('name,opts,steps', [ALL_SAMPLERS[1], ALL_SAMPLERS[2], ALL_SAMPLERS[4]])
def test_trajectory_records_only_the_requested_rows(name, opts, steps):
  """trajectory_images=n records the first n samples inside the loop: the loop's carried
  buffers are [K, n, ...] (never [K, B, ...]) and hold the rows of the full-batch record."""
  denoise, schedule = _short_setup(name)
  noise, key = _noise(8, 16), _key(9)
  sampler = functools.partial(solvers.get_sampler(name), denoise, schedule,
                              trajectory_every=7, **opts)
  fn = jax.jit(sampler, static_argnames='trajectory_images')
  out_all, traj_all = fn(noise, key)
  out_3, traj_3 = fn(noise, key, trajectory_images=3)
  slots = math.ceil(steps / 7)
  assert traj_3.x_t.shape == traj_3.x0.shape == (slots, 3) + SHAPE
  np.testing.assert_array_equal(out_3, out_all)
  for field in ('x_t', 'x0'):
    np.testing.assert_allclose(getattr(traj_3, field), getattr(traj_all, field)[:, :3],
                               atol=1e-6)
  closed = jax.make_jaxpr(functools.partial(sampler, trajectory_images=3))(noise, key)
  (loop,) = [e for e in closed.jaxpr.eqns if e.primitive.name in ('while', 'scan')]
  carried = [tuple(v.aval.shape) for v in loop.outvars]
  assert carried.count((slots, 3) + SHAPE) == 2, carried
  assert (slots, 16) + SHAPE not in carried, carried
  with pytest.raises(ValueError, match='animation_num_images'):
    jax.make_jaxpr(functools.partial(sampler, trajectory_images=0))(noise, key)


# ------------------------------------------------------------------ explicit per-step noise


@pytest.mark.parametrize('name,opts', [('ddpm', dict(variance='fixed_large')),
                                       ('ddim', dict(eta=0.7))])
def test_variance_noise_replaces_the_rng_draws(name, opts):
  """variance_noise[i] is step i's z: the noise the rng would draw reproduces the rng run, and
  other noise gives another sample; a wrong shape or a sampler without noise is an error."""
  denoise, schedule = _short_setup(name)
  noise, key = _noise(3, 8), _key(4)
  run = jax.jit(lambda n, k, z: solvers.get_sampler(name)(denoise, schedule, n, k,
                                                           variance_noise=z, **opts))
  drawn = jnp.stack([loop.step_normal(key, i, noise.shape)
                     for i in range(schedule.num_timesteps)])
  reference = solvers.get_sampler(name)(denoise, schedule, noise, key, **opts)
  np.testing.assert_allclose(run(noise, key, drawn), reference, atol=1e-6)
  other = run(noise, key, -drawn)
  assert np.abs(np.asarray(other) - np.asarray(reference)).mean() > 0.05
  with pytest.raises(ValueError, match=r'\[steps, B, H, W, C\]'):
    solvers.get_sampler(name)(denoise, schedule, noise, key, variance_noise=drawn[1:], **opts)
  with pytest.raises(ValueError, match='variance_noise'):
    ddpm.sample(exact_apply_fn(), _sample_config(sampler='dpm_solver_pp', steps=40), noise, key,
                variance_noise=drawn)


def test_ddim_set_alpha_to_one():
  """The last DDIM step goes to abar = 1 (x = x0_hat) with set_alpha_to_one, else to abar_0 of
  the training schedule: x = sqrt(abar_0) x0_hat + sqrt(1 - abar_0) eps_hat (eta = 0), also when
  the respaced schedule does not keep training step 0 (trailing)."""
  denoise = solvers.make_denoiser(exact_apply_fn(), SCHEDULE, 'epsilon', thresholding='none')
  noise = _noise(5, 8)
  for spacing in ('leading', 'trailing'):
    run = lambda one: solvers.ddim_sample(denoise, SCHEDULE, noise, _key(0), steps=10,
                                           spacing=spacing, set_alpha_to_one=one,
                                           trajectory_every=1)
    x_one, traj_one = run(True)
    x_zero, traj_zero = run(False)
    np.testing.assert_array_equal(traj_one.x_t[:-1], traj_zero.x_t[:-1])
    np.testing.assert_allclose(x_one, traj_one.x0[-1], atol=1e-6)
    a0 = ABAR[0]
    x0_hat = np.asarray(traj_zero.x0[-1], np.float64)
    last_t = 0 if spacing == 'leading' else 99
    x_prev = np.asarray(traj_zero.x_t[-2], np.float64)
    eps_hat = (x_prev - np.sqrt(ABAR[last_t]) * x0_hat) / np.sqrt(1 - ABAR[last_t])
    np.testing.assert_allclose(x_zero, np.sqrt(a0) * x0_hat + np.sqrt(1 - a0) * eps_hat,
                               atol=2e-5, err_msg=spacing)
    assert np.abs(np.asarray(x_zero) - np.asarray(x_one)).max() > 2e-4  # 10x the tolerance.


# ------------------------------------------------------------------ diffusers' conventions


DIFFUSERS = pathlib.Path(__file__).parent / 'fixtures' / 'diffusers'
SAMPLER_OF_SCHEDULER = {'DDPMScheduler': 'ddpm', 'DDIMScheduler': 'ddim',
                        'DPMSolverMultistepScheduler': 'dpm_solver_pp',
                        'DPMSolverSinglestepScheduler': 'dpm_solver_pp'}


def test_spacings_give_diffusers_timesteps_per_scheduler():
  """sample.spacing linspace / leading / trailing give, for each sampler, the timesteps of its
  diffusers scheduler (diffusers 0.42.1, tests/fixtures/make_diffusers_fixture.py) for 1, 7, 10,
  20, 30 and 333 of 1000 steps; DPM-Solver++'s linspace is 999, 949, ..., 50, DDIM's ends at 0."""
  table = json.loads((DIFFUSERS / 'scheduler_timesteps.json').read_text())
  assert set(table) == set(SAMPLER_OF_SCHEDULER)
  checked = 0
  for scheduler, spacings in table.items():
    sampler = SAMPLER_OF_SCHEDULER[scheduler]
    for spacing, by_steps in spacings.items():
      for steps, expected in by_steps.items():
        kept = respacing.respaced_timesteps(T, int(steps), spacing,
                                            solvers.spacing_convention(sampler))
        np.testing.assert_array_equal(kept[::-1], expected, err_msg=f'{scheduler} {spacing}')
        schedule = solvers.sampling_schedule(SCHEDULE, sampler, int(steps), spacing)
        np.testing.assert_array_equal(np.asarray(schedule.timesteps)[::-1], expected)
        checked += 1
  assert checked == 60
  dpm, ddim = (table[k]['linspace']['20'] for k in ('DPMSolverMultistepScheduler',
                                                      'DDIMScheduler'))
  assert dpm[:2] + dpm[-2:] == [999, 949, 100, 50] and ddim[:2] + ddim[-1:] == [999, 946, 0]


def _diffusers_3m_weights(abar_desc):
  """DPM-Solver++(3M) weights as diffusers' DPMSolverMultistepScheduler (and Lu et al.'s code)
  steps, in the W [S, 5] form of `solvers.dpm_solver_coefficients` (whose first two rows and
  final first-order row it shares). For rows 2 <= i <= S - 2, with h, h0, h1 the last three
  lambda steps, r0 = h0 / h, r1 = h1 / h:
    E0 = (D_i - D_{i-1}) / r0,  E1 = (D_{i-1} - D_{i-2}) / r1,
    E = E0 + r0 / (r0 + r1) (E0 - E1),  F = (E0 - E1) / (r0 + r1)   (~ h D' and h^2 D'' / 2),
    x_{i+1} = (s_{i+1} / s_i) x_i + a_{i+1} [(1 - e^-h) D_i + (1 - (1 - e^-h) / h) E
                                             - ((h - 1 + e^-h) / h^2 - 1/2) F].
  The F term is half of the Taylor expansion's (h^2/2 - h + 1 - e^-h) D''."""
  w = solvers.dpm_solver_coefficients(abar_desc, 3, 'multistep').copy()
  alpha, sigma = np.sqrt(abar_desc), np.sqrt(1.0 - abar_desc)
  lam = np.log(alpha / sigma)
  for i in range(2, len(abar_desc) - 1):
    h, h0, h1 = lam[i + 1] - lam[i], lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2]
    r0, r1 = h0 / h, h1 / h
    e0, e1 = np.array([1.0, -1.0, 0.0]) / r0, np.array([0.0, 1.0, -1.0]) / r1
    e, f = e0 + r0 / (r0 + r1) * (e0 - e1), (e0 - e1) / (r0 + r1)
    em = -np.expm1(-h)  # 1 - e^-h
    w[i, 2:5] = alpha[i + 1] * (em * np.array([1.0, 0.0, 0.0]) + (1.0 - em / h) * e
                                - ((h - em) / h**2 - 0.5) * f)
  return w


def _solve_gaussian(w, abar_desc, x_t, mu, sd):
  """Runs weights W on scalar data N(mu, sd^2) with its exact x0 prediction."""
  x, hist = x_t, [0.0 * x_t] * 3  # x_prev, D_prev, D_prev2
  for i, a in enumerate(abar_desc):
    d = mu + np.sqrt(a) * sd**2 / (a * sd**2 + 1 - a) * (x - np.sqrt(a) * mu)
    x, hist = w[i] @ np.array([x, hist[0], d, hist[1], hist[2]]), [x, d, hist[1]]
  return x


def test_third_order_dpm_solver_converges_at_third_order_where_diffusers_does_not():
  """Our 3M weights (Taylor expansion to D'') have global error O(h^3); diffusers' 3M halves the
  D'' term and converges at second order. First `_diffusers_3m_weights` is checked against
  diffusers itself (fixture: 20 linspace steps of DPMSolverMultistepScheduler(solver_order=3)
  on the exact denoiser of N(0.3, 0.2^2)), then both are run on lambda-uniform grids."""
  ref = np.load(DIFFUSERS / 'dpm3_gaussian.npz')
  mu, sd = float(ref['mu']), float(ref['sd'])
  abar = ABAR[ref['timesteps']]  # Descending noise, as the scheduler's timesteps.
  theirs = _solve_gaussian(_diffusers_3m_weights(abar), abar, ref['x_t'], mu, sd)
  ours = _solve_gaussian(solvers.dpm_solver_coefficients(abar, 3), abar, ref['x_t'], mu, sd)
  np.testing.assert_allclose(theirs, ref['out'], atol=1e-6)
  assert np.abs(ours - ref['out']).max() > 30 * np.abs(theirs - ref['out']).max()

  x_t = 1.3
  rates = {}
  for name, weights in [('ours', lambda a: solvers.dpm_solver_coefficients(a, 3)),
                        ('diffusers', _diffusers_3m_weights)]:
    errs = []
    for n in (41, 81, 161, 321):
      abar = 1.0 / (1.0 + np.exp(-2.0 * np.linspace(-3.0, 3.0, n)))
      sig = np.sqrt((1 - abar) / abar)
      x_end = mu + (x_t / np.sqrt(abar[0]) - mu) * np.sqrt(sd**2 + sig[-1]**2) / np.sqrt(
          sd**2 + sig[0]**2)
      exact = mu + sd**2 / (sd**2 + sig[-1]**2) * (x_end - mu)
      errs.append(abs(_solve_gaussian(weights(abar), abar, x_t, mu, sd) - exact))
    rates[name] = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
  assert abs(rates['ours'][-1] - 3.0) < 0.25, rates
  assert abs(rates['diffusers'][-1] - 2.0) < 0.25, rates
