"""Samplers checked against the exact solution of a Gaussian data distribution.

For data x0 ~ N(mu, diag(sigma^2)) the optimal denoiser is known in closed form:
  x_t ~ N(sqrt(abar) mu, abar sigma^2 + 1 - abar),
  E[x0 | x_t]  = mu + sqrt(abar) sigma^2 / (abar sigma^2 + 1 - abar) (x_t - sqrt(abar) mu),
  E[eps | x_t] = sqrt(1 - abar) / (abar sigma^2 + 1 - abar) (x_t - sqrt(abar) mu).
With this predictor every DDPM / DDIM step is an affine map of x_t plus Gaussian noise, so the exact
distribution of each sampler's output (including its discretisation error) follows from
propagating a per-dimension affine map in float64 (`_exact_sampler_law` below, written from the
papers' update rules and independent of the library). The samples are compared to it (pathwise for
deterministic DDIM, through mean and variance within sampling error otherwise), and, for samplers
that take all 1000 steps, to the data distribution itself. A 5-step process with large betas
makes per-step details (each step's variance, the noiseless last step, timestep indexing) visible.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.processes import discrete
from diffusion_jax.sampling import solvers

SHAPE = (4, 4, 1)
D = int(np.prod(SHAPE))
N = 4096  # Samples per run.

# The diffusion processes used: Ho et al.'s, and a 5-step one whose large steps make every
# per-step choice (variance at each t, the t = 0 step, timestep indexing) visible in the samples.
LONG, SHORT = 'linear1000', 'short5'
BETAS_OF = {
    LONG: np.linspace(1e-4, 0.02, 1000, dtype=np.float64),  # Ho et al. 2020.
    SHORT: np.array([0.02, 0.1, 0.25, 0.4, 0.6]),
}
T = len(BETAS_OF[LONG])
BETAS = BETAS_OF[LONG]
ABAR = np.cumprod(1.0 - BETAS)

_rng = np.random.default_rng(1234)
MU = _rng.permutation(np.linspace(-0.5, 0.5, D))      # Distinct means ...
SIGMA = _rng.permutation(np.linspace(0.1, 0.6, D))    # ... and standard deviations.
VAR = SIGMA**2


@functools.lru_cache(maxsize=None)
def library_schedule(process=LONG):
  return discrete.schedule_from_betas(BETAS_OF[process])


SCHEDULE = library_schedule(LONG)


# ------------------------------------------------------------------ the exact predictor


def exact_apply_fn(prediction_type, process=LONG):
  """`apply_fn(x_t, t [B])` returning the Bayes-optimal output of `prediction_type`."""
  abar64 = np.cumprod(1.0 - BETAS_OF[process])
  sqrt_a = jnp.asarray(np.sqrt(abar64), jnp.float32)
  sqrt_1ma = jnp.asarray(np.sqrt(1.0 - abar64), jnp.float32)
  one_ma = jnp.asarray(1.0 - abar64, jnp.float32)
  abar = jnp.asarray(abar64, jnp.float32)
  mu = jnp.asarray(MU.reshape(SHAPE), jnp.float32)
  var = jnp.asarray(VAR.reshape(SHAPE), jnp.float32)

  def apply_fn(x_t, t):
    col = lambda v: v[t].reshape(-1, 1, 1, 1)
    a, sa, s1a = col(abar), col(sqrt_a), col(sqrt_1ma)
    denom = a * var + col(one_ma)
    centred = x_t - sa * mu
    eps = s1a / denom * centred
    x0 = mu + sa * var / denom * centred
    if prediction_type == 'epsilon':
      return eps
    if prediction_type == 'x0':
      return x0
    if prediction_type == 'v':
      return sa * eps - s1a * x0
    raise AssertionError(prediction_type)
  return apply_fn


def _exact_sampler_law(sampler, process=LONG, **opts):
  """(G, H, S2): the sampler's output is G x_T + H + N(0, S2), per dimension (float64).

  Written from the update rules of Ho et al. (ancestral step with the true posterior mean
  coefficients) and Song et al. (DDIM), not from the library code.
  """
  betas = BETAS_OF[process]
  num_t = len(betas)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])

  def coefs(t):
    """(k, e): E[x0|x_t] = mu + k c, E[eps|x_t] = e c, with c = x_t - sqrt(abar_t) mu."""
    denom = abar[t] * VAR + 1.0 - abar[t]
    return np.sqrt(abar[t]) * VAR / denom, np.sqrt(1.0 - abar[t]) / denom

  g, h, s2 = np.ones(D), np.zeros(D), np.zeros(D)  # x = g x_T + h + N(0, s2)

  def step(a_mul, b_add, noise_var):
    nonlocal g, h, s2
    g, h, s2 = a_mul * g, a_mul * h + b_add, a_mul**2 * s2 + noise_var

  if sampler == 'ddpm':
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    if opts['variance'] == 'fixed_small':
      sig2 = post_var
    else:  # fixed_large: beta_t (guided-diffusion puts beta~_1 at index 0, which no step uses).
      sig2 = np.append(post_var[1], betas[1:])
    for t in range(num_t - 1, -1, -1):
      k, _ = coefs(t)
      c1 = betas[t] * np.sqrt(abar_prev[t]) / (1.0 - abar[t])
      c2 = (1.0 - abar_prev[t]) * np.sqrt(alphas[t]) / (1.0 - abar[t])
      # mean = c1 (mu + k (x - sqrt(abar) mu)) + c2 x; no noise on the last step.
      step(c1 * k + c2, c1 * (MU - k * np.sqrt(abar[t]) * MU), sig2[t] if t > 0 else 0.0)
  else:
    steps, eta = opts['steps'], opts['eta']
    stride = num_t // steps
    seq = [i * stride for i in range(steps)]  # 0, k, 2k, ...
    for j in reversed(range(steps)):
      t = seq[j]
      a = abar[t]
      a_prev = abar[seq[j - 1]] if j > 0 else 1.0
      sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
      k, e = coefs(t)
      # x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z
      lin = np.sqrt(a_prev) * k + np.sqrt(max(1 - a_prev - sigma**2, 0.0)) * e
      step(lin, np.sqrt(a_prev) * MU - lin * np.sqrt(a) * MU, sigma**2)
  return g, h, s2


# ------------------------------------------------------------------ running the library


@functools.lru_cache(maxsize=None)
def _compiled(sampler, prediction_type, process, static_opts):
  """The jitted sampler; DDIM's eta is a traced argument so that eta variants share a compile."""
  schedule = library_schedule(process)
  denoise = solvers.make_denoiser(exact_apply_fn(prediction_type, process), schedule,
                                   prediction_type, clip_denoised=False)
  fn = functools.partial(solvers.get_sampler(sampler), denoise, schedule, **dict(static_opts))
  if sampler == 'ddim':
    return jax.jit(lambda noise, rng, eta: fn(noise, rng, eta=eta))
  return jax.jit(fn)


def _noise(seed, n=N):
  return jax.random.normal(jax.random.key(seed), (n,) + SHAPE, jnp.float32)


def run_sampler(sampler, seed=0, prediction_type='epsilon', n=N, rng_seed=None, process=LONG,
                **opts):
  """(x_T, x_0) as read-only float64 [n, D] (cached: several tests share runs)."""
  rng_seed = seed + 10_000 if rng_seed is None else rng_seed
  return _run_cached(sampler, seed, rng_seed, prediction_type, n, process,
                     tuple(sorted(opts.items())))


@functools.lru_cache(maxsize=None)
def _run_cached(sampler, seed, rng_seed, prediction_type, n, process, opts):
  opts = dict(opts)
  eta = opts.pop('eta', None)
  fn = _compiled(sampler, prediction_type, process, tuple(sorted(opts.items())))
  noise = _noise(seed, n)
  args = (noise, jax.random.key(rng_seed)) + (() if eta is None else (jnp.float32(eta),))
  out = fn(*args)
  assert out.shape == noise.shape and out.dtype == jnp.float32
  x_t = np.asarray(noise, np.float64).reshape(n, D)
  x0 = np.asarray(out, np.float64).reshape(n, D)
  x_t.flags.writeable = x0.flags.writeable = False
  return x_t, x0


def _moment_z_scores(x, mean, var):
  """z-scores of the sample mean and variance of x [n, D] against a Gaussian N(mean, var)."""
  n = x.shape[0]
  z_mean = (x.mean(0) - mean) / np.sqrt(var / n)
  z_var = (x.var(0, ddof=1) - var) / (var * np.sqrt(2.0 / (n - 1)))
  return z_mean, z_var


Z_TOL = 5.0  # 32 statistics per run; P(|z| > 5) ~ 6e-7 each.


# ------------------------------------------------------------------ tests


def test_exact_predictor_is_consistent():
  """The three outputs of the test's predictor describe one (x0, eps) with x_t = a x0 + s eps."""
  x = _noise(0, 8)
  t = jnp.array([0, 1, 10, 100, 400, 700, 998, 999], jnp.int32)
  eps = np.asarray(exact_apply_fn('epsilon')(x, t), np.float64)
  x0 = np.asarray(exact_apply_fn('x0')(x, t), np.float64)
  a = np.sqrt(ABAR[np.asarray(t)]).reshape(-1, 1, 1, 1)
  s = np.sqrt(1 - ABAR[np.asarray(t)]).reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(a * x0 + s * eps, np.asarray(x, np.float64), atol=2e-6)


@pytest.mark.parametrize('steps', [5, 10, 50, 100])
def test_ddim_eta0_is_the_exact_deterministic_map(steps):
  """DDIM(eta=0) with the exact predictor is the affine map G x_T + H computed in float64."""
  x_t, x0 = run_sampler('ddim', steps=steps, eta=0.0)
  g, h, s2 = _exact_sampler_law('ddim', steps=steps, eta=0.0)
  assert np.all(s2 == 0)
  np.testing.assert_allclose(x0, g * x_t + h, atol=2e-4, rtol=0)
  # The same statement about the distribution, within sampling error.
  z_mean, z_var = _moment_z_scores(x0, h, g**2)
  assert np.max(np.abs(z_mean)) < Z_TOL and np.max(np.abs(z_var)) < Z_TOL


@pytest.mark.parametrize('sampler,opts', [
    ('ddpm', dict(variance='fixed_small')),
    ('ddpm', dict(variance='fixed_large')),
    ('ddim', dict(steps=50, eta=1.0)),
    ('ddim', dict(steps=10, eta=1.0)),
    ('ddim', dict(steps=50, eta=0.5)),
])
def test_stochastic_sampler_matches_its_exact_law(sampler, opts):
  """Mean and per-dimension variance of the samples equal the sampler's exact output law."""
  _, x0 = run_sampler(sampler, **opts)
  g, h, s2 = _exact_sampler_law(sampler, **opts)
  assert np.all(s2 > 0)
  z_mean, z_var = _moment_z_scores(x0, h, g**2 + s2)
  assert np.max(np.abs(z_mean)) < Z_TOL, z_mean
  assert np.max(np.abs(z_var)) < Z_TOL, z_var


@pytest.mark.parametrize('sampler,opts', [
    ('ddpm', dict(variance='fixed_small')),
    ('ddpm', dict(variance='fixed_large')),
    ('ddim', dict(steps=5, eta=1.0)),
    ('ddim', dict(steps=2, eta=0.5)),
    ('ddim', dict(steps=5, eta=0.0)),
])
def test_short_process_matches_exact_law(sampler, opts):
  """On a 5-step process each step's mean, variance and timestep show up in the samples."""
  x_t, x0 = run_sampler(sampler, process=SHORT, **opts)
  g, h, s2 = _exact_sampler_law(sampler, process=SHORT, **opts)
  z_mean, z_var = _moment_z_scores(x0, h, g**2 + s2)
  assert np.max(np.abs(z_mean)) < Z_TOL, z_mean
  assert np.max(np.abs(z_var)) < Z_TOL, z_var
  if opts.get('eta') == 0.0:
    np.testing.assert_allclose(x0, g * x_t + h, atol=1e-5, rtol=0)


def test_short_process_has_power():
  """The short-process laws are far apart (in units of sampling error) for the choices that a
  sampler could get wrong, so test_short_process_matches_exact_law can tell them apart."""
  def var(sampler, **opts):
    g, _, s2 = _exact_sampler_law(sampler, process=SHORT, **opts)
    return g**2 + s2
  se = np.sqrt(2.0 / (N - 1))
  small, large = var('ddpm', variance='fixed_small'), var('ddpm', variance='fixed_large')
  assert np.min(np.abs(large / small - 1)) > 4 * Z_TOL * se
  assert np.min(np.abs(var('ddim', steps=5, eta=1.0) / var('ddim', steps=5, eta=0.0) - 1)) > (
      2 * Z_TOL * se)


@pytest.mark.parametrize('eta', [1.0, 0.5])
def test_stochastic_ddim_noise_comes_from_rng(eta):
  """Same (x_T, rng) gives the same samples; another rng with the same x_T gives others."""
  _, a = run_sampler('ddim', rng_seed=1, steps=50, eta=eta)
  # A fresh run (bypassing the result cache) with the same arguments.
  _, b = _run_cached.__wrapped__('ddim', 0, 1, 'epsilon', N, LONG, (('eta', eta), ('steps', 50)))
  _, c = run_sampler('ddim', rng_seed=2, steps=50, eta=eta)
  np.testing.assert_array_equal(a, b)
  # With the same x_T the two runs differ only through the injected noise, so E(a - c)^2 = 2 S2.
  _, _, s2 = _exact_sampler_law('ddim', steps=50, eta=eta)
  d2 = np.mean((a - c)**2, axis=0)
  np.testing.assert_allclose(d2, 2 * s2, rtol=Z_TOL * np.sqrt(2.0 / N))
  # eta = 0 injects no noise at all.
  _, d = run_sampler('ddim', rng_seed=1, steps=50, eta=0.0)
  _, e = run_sampler('ddim', rng_seed=2, steps=50, eta=0.0)
  np.testing.assert_array_equal(d, e)


@pytest.mark.parametrize('sampler,opts', [
    ('ddpm', dict(variance='fixed_small')),
    ('ddpm', dict(variance='fixed_large')),
    ('ddim', dict(steps=T, eta=0.0)),
])
def test_full_length_samplers_recover_the_data_distribution(sampler, opts):
  """With all T steps the samples follow N(mu, sigma^2).

  The means are unbiased to < 0.4% of sigma, so they must match within sampling error. The
  variances carry the finite-T discretisation bias (float64 analysis of these settings: at most
  7.3% (fixed_small), 1.6% (fixed_large), 3.4% (DDIM), all on the sigma = 0.1 dimension), so they
  get sampling error plus a 10% relative budget. (With few DDIM steps the bias is far larger, e.g.
  17% at 50 steps and 58% at 10 steps on average, which is why those runs are compared with
  their exact law above rather than with the data.)
  """
  _, x0 = run_sampler(sampler, **opts)
  z_mean, _ = _moment_z_scores(x0, MU, VAR)
  assert np.max(np.abs(z_mean)) < Z_TOL, z_mean
  rel_var = x0.var(0, ddof=1) / VAR - 1.0
  assert np.max(np.abs(rel_var)) < 0.10 + Z_TOL * np.sqrt(2.0 / (N - 1)), rel_var
  # And the budget itself is honest: the exact law of the sampler is that close to the data.
  g, h, s2 = _exact_sampler_law(sampler, **opts)
  assert np.max(np.abs(h - MU) / SIGMA) < 5e-3
  assert np.max(np.abs((g**2 + s2) / VAR - 1.0)) < 0.08


def test_ddim_more_steps_is_more_accurate():
  """Averaged over seeds, 100 DDIM steps reproduce the data variance far better than 5 steps."""
  err = {5: [], 100: []}
  for seed in range(3):
    for steps in err:
      _, x0 = run_sampler('ddim', seed=seed, steps=steps, eta=0.0)
      err[steps].append(np.mean(np.abs(x0.var(0, ddof=1) / VAR - 1.0)))
      # Means stay right even with 5 steps (bias < 2% of sigma).
      assert np.max(np.abs(x0.mean(0) - MU) / SIGMA) < 0.02 + Z_TOL / np.sqrt(N)
  # Exact values: 0.81 (5 steps) vs 0.09 (100 steps) mean relative variance error;
  # the sampling error of each is ~0.02.
  assert np.mean(err[100]) < 0.25 * np.mean(err[5]), err
  assert np.mean(err[100]) < 0.2


@pytest.mark.parametrize('prediction_type', ['x0', 'v'])
def test_prediction_types_give_the_same_ddim_samples(prediction_type):
  """The same exact predictor expressed as x0 or v gives the epsilon samples (DDIM, eta=0)."""
  _, ref = run_sampler('ddim', steps=50, eta=0.0)
  _, out = run_sampler('ddim', prediction_type=prediction_type, steps=50, eta=0.0)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  # And with injected noise (same rng): the conversion is exact, so the noise paths coincide.
  _, ref = run_sampler('ddim', steps=50, eta=1.0)
  _, out = run_sampler('ddim', prediction_type=prediction_type, steps=50, eta=1.0)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_make_denoiser_converts_and_clips():
  x = 3.0 * _noise(5, 8)  # Large x_t so that the x0 predictions leave [-1, 1] at small t.
  clipped_any = False
  for t in (0, 20, 500, 999):
    t_batch = jnp.full((8,), t, jnp.int32)
    eps_out = exact_apply_fn('epsilon')(x, t_batch)
    a, s = np.sqrt(ABAR[t]), np.sqrt(1 - ABAR[t])
    xn, en = np.asarray(x, np.float64), np.asarray(eps_out, np.float64)
    x0_true = (xn - s * en) / a
    pred = solvers.make_denoiser(exact_apply_fn('epsilon'), SCHEDULE, 'epsilon',
                                  clip_denoised=False)(x, jnp.int32(t))
    np.testing.assert_allclose(pred.eps, en, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pred.x0, x0_true, rtol=1e-4, atol=1e-4)
    clipped = solvers.make_denoiser(exact_apply_fn('epsilon'), SCHEDULE, 'epsilon',
                                     clip_denoised=True)(x, t)
    np.testing.assert_allclose(clipped.x0, np.clip(x0_true, -1, 1), rtol=1e-4, atol=1e-4)
    clipped_any |= bool(np.any(np.abs(x0_true) > 1))
    # eps is recomputed from the clipped x0, so (x0, eps) still reproduce x_t.
    np.testing.assert_allclose(a * np.asarray(clipped.x0, np.float64) +
                               s * np.asarray(clipped.eps, np.float64), xn, atol=1e-4)
  assert clipped_any  # The clipping was exercised.


def test_get_sampler_and_unknown_names():
  assert solvers.get_sampler('ddpm') is solvers.ddpm_sample
  assert solvers.get_sampler('ddim') is solvers.ddim_sample
  with pytest.raises(ValueError, match=r'sample\.sampler'):
    solvers.get_sampler('no_such_sampler')
  denoise = solvers.make_denoiser(exact_apply_fn('epsilon'), SCHEDULE, 'epsilon', False)
  with pytest.raises(ValueError, match=r'sample\.variance'):
    solvers.ddpm_sample(denoise, SCHEDULE, _noise(0, 2), jax.random.key(0), variance='learned_x')


def test_ddim_timesteps():
  np.testing.assert_array_equal(solvers.ddim_timesteps(1000, 10), np.arange(0, 1000, 100))
  np.testing.assert_array_equal(solvers.ddim_timesteps(1000, 3), [0, 333, 666])
  np.testing.assert_array_equal(solvers.ddim_timesteps(1000, 1000), np.arange(1000))
  np.testing.assert_array_equal(solvers.ddim_timesteps(1000, 1), [0])
  np.testing.assert_array_equal(solvers.ddim_timesteps(10, 4), [0, 2, 4, 6])
  for steps in (50, 64, 100, 250, 999):
    seq = solvers.ddim_timesteps(1000, steps)
    assert len(seq) == steps and seq[0] == 0 and seq[-1] < 1000
    assert np.all(np.diff(seq) == 1000 // steps)
  for bad in (0, -1, 1001):
    with pytest.raises(ValueError, match=r'sample\.steps'):
      solvers.ddim_timesteps(1000, bad)


@pytest.mark.parametrize('sampler,opts,length', [
    ('ddpm', dict(variance='fixed_small'), T),
    ('ddim', dict(steps=20, eta=1.0), 20),
])
def test_jitted_sampler_is_one_loop_with_one_model_call(sampler, opts, length):
  calls = []
  inner = exact_apply_fn('epsilon')

  def apply_fn(x, t):
    calls.append(1)  # Runs once per trace of the model.
    return inner(x, t)

  denoise = solvers.make_denoiser(apply_fn, SCHEDULE, 'epsilon', clip_denoised=False)
  fn = jax.jit(functools.partial(solvers.get_sampler(sampler), denoise, SCHEDULE, **opts))
  closed = jax.make_jaxpr(fn)(_noise(0, 2), jax.random.key(0))
  assert len(calls) == 1
  (jit_eqn,) = closed.jaxpr.eqns
  inner_jaxpr = jit_eqn.params['jaxpr'].jaxpr
  loops = [e for e in inner_jaxpr.eqns if e.primitive.name in ('while', 'scan')]
  assert len(loops) == 1, [e.primitive.name for e in inner_jaxpr.eqns]
  if loops[0].primitive.name == 'scan':
    assert loops[0].params['length'] == length
  # Nothing is unrolled: the per-step work (model + update) lives in the single loop body.
  assert len(inner_jaxpr.eqns) < 20, len(inner_jaxpr.eqns)
