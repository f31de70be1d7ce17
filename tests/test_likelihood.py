"""Likelihoods: the VLB terms, the hybrid loss, the PF-ODE NLL and --mode=eval end to end.

References are computed independently in float64 NumPy / SciPy, mostly on Gaussian data where
the optimal denoiser, the expected VLB terms and the model density are known in closed form.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from configs import default, tiny
from diffusion_jax.training import checkpoints
from diffusion_jax.processes import discrete
from diffusion_jax.modes import evaluate as evaluate_mode
from diffusion_jax.evaluation import likelihood
from diffusion_jax.nn import backbones
from diffusion_jax.objectives import ddpm
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state

LN2 = math.log(2.0)


def _linear_betas(n, b0=1e-4, b1=0.02):
  return b0 + (b1 - b0) * np.arange(n, dtype=np.float64) / (n - 1)


def _schedule(n):
  return discrete.schedule_from_betas(_linear_betas(n))


def _ddpm_config(num_timesteps, learn_sigma=False, **overrides):
  """A default config with objective 'ddpm', `num_timesteps` linear betas (those of
  `_linear_betas`) and `overrides` of diffusion.ddpm."""
  config = default.get_config()
  config.diffusion.objective = 'ddpm'
  config.diffusion.ddpm.update(num_timesteps=num_timesteps, beta_schedule='linear',
                               beta_start=1e-4, beta_end=0.02, **overrides)
  config.model.learn_sigma = learn_sigma
  np.testing.assert_allclose(np.asarray(ddpm.schedule(config).betas),
                             _linear_betas(num_timesteps), rtol=1e-6)  # float32 betas.
  return config


# ------------------------------------------------------------------ Gaussian building blocks


def _normal_kl_np(m1, v1, m2, v2):
  """KL(N(m1, v1) || N(m2, v2)) in nats, written with standard deviations."""
  s1, s2 = np.sqrt(v1), np.sqrt(v2)
  return np.log(s2 / s1) + (s1**2 + (m1 - m2)**2) / (2 * s2**2) - 0.5


def test_normal_kl_matches_numpy_and_quadrature():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=(2, 50))
  lv1, lv2 = rng.uniform(-3, 2, size=(2, 50))
  got = np.asarray(discrete.normal_kl(m1, lv1, m2, lv2))
  np.testing.assert_allclose(got, _normal_kl_np(m1, np.exp(lv1), m2, np.exp(lv2)),
                             rtol=1e-5, atol=1e-6)
  for i in range(3):  # The definition, integrated numerically.
    p, q = stats.norm(m1[i], np.exp(lv1[i] / 2)), stats.norm(m2[i], np.exp(lv2[i] / 2))
    ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -np.inf, np.inf)
    assert got[i] == pytest.approx(ref, rel=1e-4, abs=1e-6)
  # Broadcasting of scalar arguments (as prior_bpd uses it).
  np.testing.assert_allclose(np.asarray(discrete.normal_kl(m1, lv1, 0.0, 0.0)),
                             _normal_kl_np(m1, np.exp(lv1), 0.0, 1.0), rtol=1e-5, atol=1e-6)


def _disc_loglik_scipy(x, mean, log_scale):
  """The discretised Gaussian written with scipy.stats.norm in float64."""
  s = np.exp(log_scale)
  upper, lower = (x + 1 / 255 - mean) / s, (x - 1 / 255 - mean) / s
  # Upper-tail bins as a difference of survival functions, free of cancellation.
  inner = np.where(x > mean, stats.norm.sf(lower) - stats.norm.sf(upper),
                   stats.norm.cdf(upper) - stats.norm.cdf(lower))
  prob = np.where(x < -0.999, stats.norm.cdf(upper),
                  np.where(x > 0.999, stats.norm.sf(lower), inner))
  with np.errstate(divide='ignore'):
    return np.log(prob)


def test_discretized_gaussian_log_likelihood_matches_scipy():
  levels = np.arange(256)
  x = levels / 127.5 - 1.0
  rng = np.random.default_rng(1)
  for mean, log_scale in [(0.0, np.log(0.1)), (-0.97, np.log(0.02)), (0.5, np.log(0.6)),
                          (0.99, np.log(0.004))]:
    mean_arr = mean + 0.01 * rng.normal(size=x.shape)
    got = np.asarray(discrete.discretized_gaussian_log_likelihood(
        x.astype(np.float32), mean_arr.astype(np.float32),
        np.full_like(x, log_scale, np.float32)), np.float64)
    ref = _disc_loglik_scipy(x, mean_arr, log_scale)
    ok = ref > -60  # Where the float64 cdf difference is still accurate.
    np.testing.assert_allclose(got[ok], ref[ok], rtol=2e-4, atol=2e-4)
    assert np.all(np.isfinite(got))
    # A proper distribution over the 256 levels when the mean is the same for all.
    total = np.exp(np.asarray(discrete.discretized_gaussian_log_likelihood(
        x.astype(np.float32), np.float32(mean), np.float32(log_scale)), np.float64)).sum()
    assert total == pytest.approx(1.0, abs=1e-4)


def test_discretized_gaussian_far_tails_are_finite_with_finite_gradients():
  x = jnp.array([-1.0, 0.0, 0.0, 1.0, 1.0 - 2 / 255])
  mean = jnp.array([1.0, 0.9, -0.9, -1.0, -0.8])
  log_scale = jnp.full((5,), np.log(0.01), jnp.float32)
  f = lambda m, s: jnp.sum(discrete.discretized_gaussian_log_likelihood(x, m, s))
  value = discrete.discretized_gaussian_log_likelihood(x, mean, log_scale)
  grads = jax.grad(f, argnums=(0, 1))(mean, log_scale)
  assert np.all(np.isfinite(np.asarray(value))) and np.all(np.asarray(value) < -1000)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  # x = 0 under N(0.9, 0.01^2): the bin [hi, lo] lies ~90 standard deviations out, where the
  # plain cdf difference underflows; scipy's logcdf gives the reference there.
  lo, hi = (0.0 - 1 / 255 - 0.9) / 0.01, (0.0 + 1 / 255 - 0.9) / 0.01
  ref = stats.norm.logcdf(hi) + np.log1p(-np.exp(stats.norm.logcdf(lo) - stats.norm.logcdf(hi)))
  assert float(value[1]) == pytest.approx(ref, rel=1e-5)
  assert float(value[2]) == pytest.approx(ref, rel=1e-5)  # The mirror image, upper tail.


def test_decoder_term_is_the_discretized_nll_in_bits():
  schedule = _schedule(50)
  rng = np.random.default_rng(2)
  x0 = (rng.integers(0, 256, size=(3, 4, 4, 1)) / 127.5 - 1).astype(np.float32)
  x_t = rng.normal(size=x0.shape).astype(np.float32)
  mean = (x0 + 0.02 * rng.normal(size=x0.shape)).astype(np.float32)
  log_var = np.full(x0.shape, np.log(0.03**2), np.float32)
  got = discrete.vlb_term(schedule, x0, x_t, jnp.zeros((3,), jnp.int32), mean, log_var)
  ref = -_disc_loglik_scipy(x0, mean, 0.5 * log_var).reshape(3, -1).mean(1) / LN2
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4)


def test_prior_bpd_closed_form():
  schedule = _schedule(200)
  abar = np.cumprod(1 - _linear_betas(200))[-1]
  x0 = np.random.default_rng(3).uniform(-1, 1, size=(5, 3, 3, 2)).astype(np.float32)
  ref = _normal_kl_np(np.sqrt(abar) * x0, 1 - abar, 0.0, 1.0).reshape(5, -1).mean(1) / LN2
  np.testing.assert_allclose(np.asarray(discrete.prior_bpd(schedule, x0)), ref, rtol=1e-4)


# ------------------------------------------------------------------ VLB of the optimal denoiser


def _gaussian_optimal_output(x_t, abar, mu, var, prediction_type):
  """The output of the exact denoiser of x0 ~ N(mu, diag var) at noise level abar (float32)."""
  s, n = jnp.sqrt(abar), 1.0 - abar
  x0_hat = mu + s * var / (abar * var + n) * (x_t - s * mu)
  eps_hat = (x_t - s * x0_hat) / jnp.sqrt(n)
  if prediction_type == 'epsilon':
    return eps_hat
  if prediction_type == 'x0':
    return x0_hat
  return s * eps_hat - jnp.sqrt(n) * x0_hat  # v


@pytest.mark.parametrize('prediction_type', ['epsilon', 'x0', 'v'])
def test_vlb_terms_of_optimal_gaussian_denoiser_match_closed_form(prediction_type):
  """E[L_t] = 1/2 [log(s_p^2 / b~) + b~ / s_p^2 - 1 + c1^2 Var(x0 | x_t) / s_p^2] per dim."""
  num_steps, n, dims = 1000, 8192, 6
  schedule = _schedule(num_steps)
  betas = _linear_betas(num_steps)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  rng = np.random.default_rng(4)
  mu, var = rng.uniform(-0.5, 0.5, dims), rng.uniform(0.05, 0.5, dims)
  key = jax.random.PRNGKey(0)
  for t in (1, 5, 60, 400, 999):
    k0, k1, key = jax.random.split(key, 3)
    x0 = mu + np.sqrt(var) * np.asarray(jax.random.normal(k0, (n, dims)), np.float64)
    x0 = x0.astype(np.float32)
    t_batch = jnp.full((n,), t, jnp.int32)
    x_t = discrete.q_sample(schedule, x0, t_batch, jax.random.normal(k1, (n, dims)))
    output = _gaussian_optimal_output(x_t, np.float32(abar[t]), mu.astype(np.float32),
                                      var.astype(np.float32), prediction_type)
    post_var = betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
    c1 = betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
    var_x0_given_xt = var * (1 - abar[t]) / (abar[t] * var + 1 - abar[t])
    for variance, model_var in (('fixed_small', post_var), ('fixed_large', betas[t])):
      mean, log_var, _ = discrete.p_mean_variance(schedule, output, x_t, t_batch,
                                                   prediction_type, False, variance)
      terms = np.asarray(discrete.vlb_term(schedule, x0, x_t, t_batch, mean, log_var),
                         np.float64)
      ref = np.mean(0.5 * (np.log(model_var / post_var) + post_var / model_var - 1
                           + c1**2 * var_x0_given_xt / model_var)) / LN2
      stderr = terms.std() / math.sqrt(n)
      assert abs(terms.mean() - ref) < 5 * stderr + 1e-4 * abs(ref) + 1e-7, (
          t, variance, terms.mean(), ref, stderr)


# ------------------------------------------------------------------ learned variance


def test_learned_range_interpolates_between_the_bounds():
  schedule = _schedule(100)
  t = jnp.arange(100)
  v = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, 5)[:, None], (5, 100))
  logv = np.stack([np.asarray(discrete.learned_log_variance(schedule, v[i], t))
                   for i in range(5)])
  lo = np.asarray(schedule.posterior_log_variance_clipped)
  hi = np.log(np.asarray(schedule.betas))
  np.testing.assert_allclose(logv[0], lo, rtol=1e-6)
  np.testing.assert_allclose(logv[-1], hi, rtol=1e-6)
  np.testing.assert_allclose(logv[2], 0.5 * (lo + hi), rtol=1e-6)
  assert np.all(np.diff(logv[:, 1:], axis=0) > 0)  # beta~_t < beta_t for t >= 1.
  # p_mean_variance uses it for learn_sigma outputs.
  out = jnp.concatenate([jnp.zeros((100, 3)), jnp.full((100, 3), 0.5)], axis=-1)
  _, log_var, _ = discrete.p_mean_variance(schedule, out, jnp.zeros((100, 3)), t, 'epsilon',
                                            learn_sigma=True)
  np.testing.assert_allclose(np.asarray(log_var[:, 0]), 0.25 * lo + 0.75 * hi, rtol=1e-5)


def test_training_losses_without_learn_sigma_is_l_simple():
  schedule = _schedule(100)
  rng = np.random.default_rng(5)
  x0, noise, out = (rng.normal(size=(6, 4, 4, 3)).astype(np.float32) for _ in range(3))
  t = jnp.array([0, 3, 10, 50, 80, 99])
  x_t = discrete.q_sample(schedule, x0, t, noise)
  example = {'x0': x0, 'noise': noise, 't': t, 'x_t': x_t}
  for weighting in ('simple', 'min_snr'):
    config = _ddpm_config(100, loss_weighting=weighting)
    np.testing.assert_array_equal(
        np.asarray(ddpm.per_example_loss(config, out, example)),
        np.asarray(ddpm.diffusion_loss(schedule, out, x0, noise, t, 'epsilon', weighting)))


@pytest.mark.parametrize('prediction_type,weighting', [('epsilon', 'simple'), ('v', 'min_snr')])
def test_hybrid_loss_gradients_are_split_by_the_stop_gradient(prediction_type, weighting):
  num_steps = 100
  schedule = _schedule(num_steps)
  config = _ddpm_config(num_steps, learn_sigma=True, prediction_type=prediction_type,
                        loss_weighting=weighting, vlb_weight=0.001)
  rng = np.random.default_rng(6)
  x0 = (rng.integers(0, 256, size=(6, 4, 4, 3)) / 127.5 - 1).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = jnp.array([0, 1, 7, 30, 64, 99])  # Includes the decoder step t = 0.
  x_t = discrete.q_sample(schedule, x0, t, noise)
  pred = 0.5 * rng.normal(size=x0.shape).astype(np.float32)
  v = rng.uniform(-1, 1, size=x0.shape).astype(np.float32)
  output = jnp.concatenate([pred, v], axis=-1)

  example = {'x0': x0, 'noise': noise, 't': t, 'x_t': x_t}
  hybrid = jax.jit(lambda o: jnp.mean(ddpm.per_example_loss(config, o, example)))
  grad = jax.jit(jax.grad(hybrid))(output)
  grad_pred, grad_v = np.asarray(grad[..., :3]), np.asarray(grad[..., 3:])

  simple = lambda p: jnp.mean(ddpm.diffusion_loss(schedule, p, x0, noise, t,
                                                   prediction_type, weighting))
  np.testing.assert_allclose(grad_pred, np.asarray(jax.jit(jax.grad(simple))(pred)),
                             rtol=1e-5,
                             atol=1e-9)

  def vlb(p, v_):
    mean, log_var, _ = discrete.p_mean_variance(
        schedule, jnp.concatenate([p, v_], -1), x_t, t, prediction_type, True)
    return jnp.mean(0.001 * num_steps * discrete.vlb_term(schedule, x0, x_t, t, mean, log_var))
  vlb_grad_pred, vlb_grad_v = jax.jit(jax.grad(vlb, argnums=(0, 1)))(pred, v)
  np.testing.assert_allclose(grad_v, np.asarray(vlb_grad_v), rtol=1e-5, atol=1e-9)
  assert np.abs(grad_v).max() > 0
  # Without the stop-gradient the VLB would move the mean too: the check above is not vacuous.
  assert np.abs(np.asarray(vlb_grad_pred)).max() > 1e-6
  # The loss value is L_simple + lambda T L_t.
  np.testing.assert_allclose(
      float(hybrid(output)), float(simple(pred)) + float(vlb(pred, v)), rtol=1e-5)


# ------------------------------------------------------------------ probability-flow ODE


class _FullCovGaussian:
  """x0 ~ N(mu, Sigma) with a non-diagonal Sigma (D = 4, images [2, 2, 1]) and its exact model."""

  def __init__(self, schedule, seed=0):
    rng = np.random.default_rng(seed)
    self.q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    self.lam = np.array([0.05, 0.2, 0.5, 1.0])
    self.sigma = self.q @ np.diag(self.lam) @ self.q.T
    self.mu = 0.3 * rng.normal(size=4)
    self.schedule = schedule

  def apply_fn(self, x, t):
    """The exact epsilon-predictor at network timestep t (float), using the process's abar."""
    b = x.shape[0]
    xf = x.reshape(b, 4)
    tau = t / (self.schedule.num_timesteps - 1)
    abar = jnp.exp(discrete.continuous_log_alphas_cumprod(self.schedule, tau))[:, None]
    s = jnp.sqrt(abar)
    q, lam = jnp.asarray(self.q, jnp.float32), jnp.asarray(self.lam, jnp.float32)
    x0_hat = self.mu + ((s * lam / (abar * lam + 1 - abar)) * ((xf - s * self.mu) @ q)) @ q.T
    return ((xf - s * x0_hat) / jnp.sqrt(1 - abar)).reshape(x.shape)

  def sample(self, n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.multivariate_normal(self.mu, self.sigma, size=n)

  def reference(self, x, abar0, abar1):
    """Exact log-density at step 0 of the model: N(0, I) at tau = 1 pulled back by the flow.

    All marginals N(sqrt(a) mu, a Sigma + (1 - a) I) share Sigma's eigenvectors, so the flow from
    tau = 0 to 1 is x -> m1 + M (x - m0), M = S1^(1/2) S0^(-1/2); returns that and the marginal.
    """
    s0, s1 = abar0 * self.lam + 1 - abar0, abar1 * self.lam + 1 - abar1
    r = (x - np.sqrt(abar0) * self.mu) @ self.q
    x1 = np.sqrt(abar1) * self.mu + (np.sqrt(s1 / s0) * r) @ self.q.T
    flow = (-0.5 * np.sum(x1**2, 1) - 2 * np.log(2 * np.pi) + 0.5 * np.sum(np.log(s1 / s0)))
    marginal = -0.5 * np.sum(r**2 / s0, 1) - 0.5 * np.sum(np.log(s0)) - 2 * np.log(2 * np.pi)
    log_m = self.q @ np.diag(0.5 * np.log(s1 / s0)) @ self.q.T  # int_0^1 (df/dx) dtau.
    return flow, marginal, log_m


def test_ode_log_likelihood_of_exact_gaussian_model():
  num_steps, batch = 1000, 16
  schedule = _schedule(num_steps)
  abar = np.cumprod(1 - _linear_betas(num_steps))
  model = _FullCovGaussian(schedule)
  x = model.sample(batch)
  ref, marginal, log_m = model.reference(x, abar[0], abar[-1])
  y = jnp.asarray(x.reshape(batch, 2, 2, 1), jnp.float32)

  config = _ddpm_config(num_steps, prediction_type='epsilon')

  def solve(probe, num_probes):
    return jax.jit(lambda y_, key: likelihood.log_likelihood(
        model.apply_fn, config, y_, key, probe=probe, num_probes=num_probes))(
            y, jax.random.PRNGKey(7))

  exact = solve('exact', 1)
  assert bool(exact.successful) and int(exact.num_steps) < 500
  np.testing.assert_allclose(np.asarray(exact.log_prob), ref, atol=1e-2)
  # The model's step-0 marginal is the data's, up to the N(0, I) prior's mismatch at tau = 1.
  np.testing.assert_allclose(np.asarray(exact.log_prob), marginal, atol=3e-2)
  # log p = prior + int div f, and int div f is the flow's log-Jacobian.
  np.testing.assert_allclose(np.asarray(exact.delta_log_prob), np.trace(log_m), atol=1e-2)

  # nll_bpd on continuous points: -log p / (D ln 2).
  bpd = jax.jit(lambda y_, key: likelihood.nll_bpd(
      model.apply_fn, config, y_, key, dequantize_data=False, probe='exact'))(
          y, jax.random.PRNGKey(8))
  np.testing.assert_allclose(np.asarray(bpd), -ref / (4 * LN2), atol=1e-2 / (4 * LN2))

  # Hutchinson with K Rademacher probes: unbiased, with variance 2 sum_{i != j} A_ij^2 / K
  # per image, A = int_0^1 (df/dx) dtau (constant here, as the ODE is linear).
  num_probes = 32
  hutch = solve('rademacher', num_probes)
  diff = np.asarray(hutch.log_prob, np.float64) - np.asarray(exact.log_prob, np.float64)
  std = math.sqrt(2 * (np.sum(log_m**2) - np.sum(np.diag(log_m)**2)) / num_probes)
  assert std > 1e-3  # Sigma is not diagonal, so Rademacher probes are not exact here.
  assert np.all(np.abs(diff) < 5 * std + 2e-2)
  assert abs(diff.mean()) < 5 * std / math.sqrt(batch) + 1e-2
  np.testing.assert_allclose(np.asarray(hutch.prior_log_prob),
                             np.asarray(exact.prior_log_prob), atol=1e-2)


def test_dequantization_and_bits_per_dim_constants():
  levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  key = jax.random.PRNGKey(0)
  y_int = np.asarray(likelihood.dequantize(jnp.asarray(levels), key))
  y_float = np.asarray(likelihood.dequantize(jnp.asarray(levels / 127.5 - 1, jnp.float32), key))
  np.testing.assert_array_equal(y_int, y_float)
  lo = 2 * levels.astype(np.float64) / 256 - 1
  assert np.all(y_int >= lo - 1e-7) and np.all(y_int < lo + 2 / 256 + 1e-7)
  # The uniform density on [-1, 1]^D, (1/2)^D, is 8 bits/dim of 8-bit data: no information.
  dims = 3 * 32 * 32
  uniform = likelihood.bpd_from_log_prob(jnp.float32(-dims * LN2), dims, dequantized=True)
  assert float(uniform) == pytest.approx(8.0, abs=1e-5)
  # A continuous density: -log p / (D ln 2) only.
  assert float(likelihood.bpd_from_log_prob(jnp.float32(-dims * LN2), dims, False)) == \
      pytest.approx(1.0, abs=1e-6)


def test_continuous_process_interpolates_the_schedule():
  schedule = _schedule(10)
  log_abar = np.log(np.cumprod(1 - _linear_betas(10)))
  tau = jnp.arange(10) / 9.0
  np.testing.assert_allclose(np.asarray(discrete.continuous_log_alphas_cumprod(schedule, tau)),
                             log_abar, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(discrete.network_timestep(schedule, tau)),
                             np.arange(10), atol=1e-5)
  # beta(tau) = -d log abar / d tau, constant on each interval.
  mid = (jnp.arange(9) + 0.5) / 9.0
  np.testing.assert_allclose(np.asarray(discrete.continuous_beta(schedule, mid)),
                             -9.0 * np.diff(log_abar), rtol=1e-4)
  np.testing.assert_allclose(
      np.asarray(jax.vmap(jax.grad(lambda s: -discrete.continuous_log_alphas_cumprod(
          schedule, s)))(mid)), -9.0 * np.diff(log_abar), rtol=1e-3)


# ------------------------------------------------------------------ --mode=eval end to end


def test_evaluate_end_to_end(tmp_path):
  config = tiny.get_config()
  config.model.learn_sigma = True
  config.model.unet.update(ch=8, num_groups=4, ch_mult=(1,), attn_resolutions=())
  config.diffusion.ddpm.num_timesteps = 20
  config.training.batch_size = 8
  config.training.num_train_steps = 1
  config.eval.metrics = ('vlb', 'ode_nll')
  config.eval.batch_size = 8
  config.eval.num_batches = 1
  config.eval.num_kl_buckets = 4
  config.eval.ode_rtol = 1e-3
  config.eval.ode_atol = 1e-3
  workdir = str(tmp_path)

  # One hybrid-loss train step, then a checkpoint, as the training loop would write it.
  mesh = sharding.create_mesh(config.mesh)
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  state = train_state.create_train_state(config, mesh, jax.random.PRNGKey(0))
  step_fn = train_state.make_train_step(model, tx, config, mesh)
  images = np.random.default_rng(0).uniform(-1, 1, size=(8, 8, 8, 1)).astype(np.float32)
  state, metrics = step_fn(state, {'image': jax.device_put(images, sharding.batch_sharding(mesh))})
  assert np.isfinite(float(metrics['loss'])) and float(metrics['nonfinite']) == 0
  manager = checkpoints.create_manager(workdir, async_save=False)
  checkpoints.save(manager, 1, state)
  manager.close()

  results = evaluate_mode.evaluate(config, workdir, mesh=mesh)
  written = json.loads((tmp_path / 'eval' / 'vlb_step1.json').read_text())
  assert written == results
  assert written['step'] == 1 and written['num_examples'] == 8
  vlb = written['vlb']
  assert all(np.isfinite(v) for v in (vlb['bpd'], vlb['prior_bpd'], vlb['decoder_bpd']))
  assert len(vlb['kl_buckets']) == 4
  assert sum(vlb['kl_buckets'].values()) == pytest.approx(vlb['kl_bpd'], rel=1e-9)
  assert vlb['prior_bpd'] + vlb['decoder_bpd'] + vlb['kl_bpd'] == pytest.approx(vlb['bpd'],
                                                                                 rel=1e-6)
  assert vlb['bpd'] > 0
  ode = written['ode_nll']
  assert np.isfinite(ode['bpd']) and ode['num_failed_batches'] == 0 and ode['mean_num_steps'] > 0


def test_eval_config_validation():
  from diffusion_jax.config.errors import ConfigError
  from diffusion_jax.modes.validation import validate_config
  config = tiny.get_config()
  validate_config(config, mode='eval', num_devices=8, num_processes=1)
  config.eval.metrics = ('vlb', 'fid')  # Sample metrics are valid eval metrics now ...
  validate_config(config, mode='eval', num_devices=8, num_processes=1)
  config.eval.metrics = ('vlb', 'nope')  # ... unknown names are not.
  config.eval.batch_size = 12
  config.eval.num_batches = 0
  config.diffusion.ddpm.vlb_weight = -1.0
  with pytest.raises(ConfigError) as e:
    validate_config(config, mode='eval', num_devices=8, num_processes=1)
  for field in ('eval.metrics', 'eval.batch_size', 'eval.num_batches', 'diffusion.ddpm.vlb_weight'):
    assert field in str(e.value)
