"""Diffusion math against closed forms computed independently in float64 NumPy."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from diffusion_jax.objectives import ddpm
from diffusion_jax.processes import discrete

T = 1000
B0, B1 = 1e-4, 0.02  # Ho et al. 2020.


def _ref_betas(name, n=T, b0=B0, b1=B1):
  """The published formulas, written out element by element."""
  i = np.arange(n, dtype=np.float64)
  if name == 'linear':
    return b0 + (b1 - b0) * i / (n - 1)
  if name == 'scaled_linear':
    return (math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (n - 1))**2
  if name == 'sigmoid':
    x = -6.0 + 12.0 * i / (n - 1)
    return b0 + (b1 - b0) / (1.0 + np.exp(-x))
  raise AssertionError(name)


def _cosine_f(u, n=T, s=0.008):
  return np.cos(((u / n) + s) / (1 + s) * np.pi / 2)**2


def _schedule(name='linear', n=T):
  return discrete.schedule_from_betas(discrete.beta_schedule(name, n))


def _np(x):
  return np.asarray(x, np.float64)


def _abar64(name='linear'):
  return np.cumprod(1.0 - discrete.beta_schedule(name, T))


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize('name', ['linear', 'scaled_linear', 'sigmoid'])
def test_beta_formulas(name):
  betas = discrete.beta_schedule(name, T)
  assert betas.dtype == np.float64 and betas.shape == (T,)
  np.testing.assert_allclose(betas, _ref_betas(name), rtol=1e-12, atol=0)
  # Other ranges and lengths are honoured too.
  np.testing.assert_allclose(discrete.beta_schedule(name, 37, 1e-3, 0.05),
                             _ref_betas(name, 37, 1e-3, 0.05), rtol=1e-12, atol=0)


def test_published_endpoints():
  lin = discrete.beta_schedule('linear', T)
  assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
  sl = discrete.beta_schedule('scaled_linear', T, 0.00085, 0.012)  # Stable Diffusion.
  assert sl[0] == pytest.approx(0.00085) and sl[-1] == pytest.approx(0.012)
  sig = discrete.beta_schedule('sigmoid', T)
  assert np.all(np.diff(sig) > 0) and B0 < sig[0] < sig[-1] < B1


def test_cosine_schedule():
  betas = discrete.beta_schedule('cosine', T)
  assert np.all(betas > 0) and np.all(betas <= 0.999)
  capped = np.isclose(betas, 0.999, rtol=0, atol=1e-12)
  assert capped[-1]  # abar(1) = 0 forces the last beta to the cap.
  first_cap = int(np.argmax(capped))
  abar = np.cumprod(1.0 - betas)
  t = np.arange(first_cap)
  np.testing.assert_allclose(abar[:first_cap], _cosine_f(t + 1) / _cosine_f(0), rtol=1e-9,
                             atol=1e-15)
  # Stored as float32 in the schedule.
  s = _schedule('cosine')
  np.testing.assert_allclose(_np(s.alphas_cumprod)[:first_cap], abar[:first_cap], rtol=2e-6,
                             atol=1e-12)


@pytest.mark.parametrize('name', discrete.BETA_SCHEDULES)
def test_schedule_fields(name):
  betas = discrete.beta_schedule(name, T)
  s = discrete.schedule_from_betas(betas)
  assert s.num_timesteps == T
  for field in ('betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'sqrt_alphas_cumprod',
                'sqrt_one_minus_alphas_cumprod', 'posterior_variance',
                'posterior_log_variance_clipped', 'posterior_mean_coef1', 'posterior_mean_coef2'):
    v = getattr(s, field)
    assert v.shape == (T,) and v.dtype == jnp.float32, field
    assert np.all(np.isfinite(_np(v))), field
  abar = np.ones(T)
  running = 1.0
  for i in range(T):  # float64 cumulative product, as a loop.
    running *= 1.0 - betas[i]
    abar[i] = running
  np.testing.assert_allclose(_np(s.betas), betas, rtol=1e-7)
  np.testing.assert_allclose(_np(s.alphas_cumprod), abar, rtol=1e-6)
  np.testing.assert_allclose(_np(s.alphas_cumprod_prev)[1:], abar[:-1], rtol=1e-6)
  assert float(s.alphas_cumprod_prev[0]) == 1.0
  np.testing.assert_allclose(_np(s.sqrt_alphas_cumprod), np.sqrt(abar), rtol=1e-6)
  np.testing.assert_allclose(_np(s.sqrt_one_minus_alphas_cumprod), np.sqrt(1 - abar), rtol=1e-6)
  # abar decreases monotonically towards (almost) pure noise.
  assert np.all(np.diff(_np(s.alphas_cumprod)) < 0)
  # The schedule is a pytree that passes through jit.
  doubled = jax.jit(lambda sch: jax.tree_util.tree_map(lambda x: 2 * x, sch))(s)
  np.testing.assert_allclose(_np(doubled.betas), 2 * _np(s.betas))


def test_make_schedule_from_config():
  config = default.get_config()
  s = discrete.make_schedule(config.diffusion.ddpm)
  assert s.num_timesteps == config.diffusion.ddpm.num_timesteps == 1000
  np.testing.assert_allclose(_np(s.betas), _ref_betas('linear'), rtol=1e-6)
  config.diffusion.ddpm.beta_schedule = 'cosine'
  config.diffusion.ddpm.num_timesteps = 50
  s = discrete.make_schedule(config.diffusion.ddpm)
  assert s.num_timesteps == 50
  np.testing.assert_allclose(_np(s.alphas_cumprod)[:10],
                             _cosine_f(np.arange(1, 11), 50) / _cosine_f(0, 50), rtol=1e-6)


def test_schedule_rejects_invalid_betas():
  for bad in (np.array([0.1, 0.0, 0.2]), np.array([0.1, 1.0]), np.array([-0.1, 0.2]),
              np.full((2, 2), 0.1)):
    with pytest.raises(ValueError):
      discrete.schedule_from_betas(bad)


def test_extract_broadcasts():
  vals = jnp.arange(10, dtype=jnp.float32) * 1.5
  out = discrete.extract(vals, jnp.array([0, 3, 9]), 4)
  assert out.shape == (3, 1, 1, 1)
  np.testing.assert_array_equal(_np(out).ravel(), [0.0, 4.5, 13.5])
  assert float(discrete.extract(vals, 2, 0)) == 3.0


# ------------------------------------------------------------------ forward process


@pytest.mark.parametrize('t', [0, 10, 250, 999])
def test_q_sample_moments(t):
  n = 200_000
  x0_values = np.array([-0.8, 0.0, 0.3, 1.0])
  x0 = jnp.asarray(np.repeat(x0_values[None], n, 0), jnp.float32)  # [n, 4]
  noise = jax.random.normal(jax.random.key(t), x0.shape, jnp.float32)
  xt = _np(discrete.q_sample(_schedule(), x0, jnp.full((n,), t), noise))
  a = _abar64()[t]
  mean, var = np.sqrt(a) * x0_values, 1.0 - a
  se_mean = np.sqrt(var / n)
  se_var = var * np.sqrt(2.0 / (n - 1))
  assert np.all(np.abs(xt.mean(0) - mean) < 5 * se_mean), (xt.mean(0), mean)
  assert np.all(np.abs(xt.var(0, ddof=1) - var) < 5 * se_var), (xt.var(0), var)
  # The scalar-t form and q_mean_variance agree with the same closed forms.
  xt_scalar = _np(discrete.q_sample(_schedule(), x0, t, noise))
  np.testing.assert_allclose(xt_scalar, xt, rtol=0, atol=0)
  m, v = discrete.q_mean_variance(_schedule(), jnp.asarray(x0_values[None], jnp.float32),
                                   jnp.array([t]))
  np.testing.assert_allclose(_np(m)[0], mean, rtol=1e-6, atol=1e-7)
  # 1 - abar is formed in float32 from the stored abar, so at t = 0 (1 - abar = 1e-4) it carries
  # the float32 rounding of abar (~6e-8 absolute, ~2e-4 relative).
  np.testing.assert_allclose(_np(v)[0], np.full(4, var), rtol=1e-6, atol=1e-7)


def _bayes_posterior(x0, xt, t, betas):
  """q(x_{t-1} | x_t, x0) from q(x_{t-1} | x0) q(x_t | x_{t-1}) by multiplying Gaussians."""
  abar = np.cumprod(1.0 - betas)
  abar_prev = 1.0 if t == 0 else abar[t - 1]
  beta = betas[t]
  prior_mean, prior_var = np.sqrt(abar_prev) * x0, 1.0 - abar_prev
  if prior_var == 0.0:  # t = 0: x_{-1} is x0 itself.
    return x0 * np.ones_like(xt), 0.0
  # Likelihood of x_{t-1} given x_t: x_t = sqrt(alpha) x_{t-1} + sqrt(beta) e.
  precision = 1.0 / prior_var + (1.0 - beta) / beta
  var = 1.0 / precision
  mean = var * (prior_mean / prior_var + np.sqrt(1.0 - beta) * xt / beta)
  return mean, var


@pytest.mark.parametrize('name', ['linear', 'cosine'])
@pytest.mark.parametrize('t', [0, 1, 2, 50, 500, 998, 999])
def test_q_posterior_is_bayes_rule(name, t):
  if name == 'cosine' and t == 999:
    t = 990  # The capped last cosine step is tested via the linear schedule.
  betas = discrete.beta_schedule(name, T)
  s = discrete.schedule_from_betas(betas)
  rng = np.random.default_rng(t)
  x0 = rng.uniform(-1, 1, (6, 2, 2, 1))
  xt = rng.normal(size=(6, 2, 2, 1)) * 2.0
  mean, var, log_var = discrete.q_posterior(s, jnp.asarray(x0, jnp.float32),
                                             jnp.asarray(xt, jnp.float32), jnp.full((6,), t))
  ref_mean, ref_var = _bayes_posterior(x0, xt, t, betas)
  assert mean.shape == var.shape == log_var.shape == x0.shape
  np.testing.assert_allclose(_np(mean), ref_mean, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(_np(var), np.full(x0.shape, ref_var), rtol=1e-5, atol=1e-12)
  if t == 0:
    assert np.all(_np(var) == 0.0)
    np.testing.assert_allclose(_np(mean), x0, atol=1e-6)
    # The clipped log-variance uses the t = 1 value instead of log(0).
    _, ref_var1 = _bayes_posterior(x0, xt, 1, betas)
    np.testing.assert_allclose(_np(log_var), np.log(ref_var1), rtol=1e-5)
  else:
    np.testing.assert_allclose(_np(log_var), np.log(ref_var), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('t', [1, 10, 300])
def test_q_posterior_monte_carlo(t):
  """Regressing sampled x_{t-1} on x_t recovers the posterior mean line and variance."""
  n = 200_000
  betas = discrete.beta_schedule('linear', T)
  abar = np.cumprod(1.0 - betas)
  x0 = 0.6
  rng = np.random.default_rng(100 + t)
  x_prev = np.sqrt(abar[t - 1]) * x0 + np.sqrt(1 - abar[t - 1]) * rng.normal(size=n)
  x_t = np.sqrt(1 - betas[t]) * x_prev + np.sqrt(betas[t]) * rng.normal(size=n)
  slope, intercept = np.polyfit(x_t, x_prev, 1)
  resid_var = np.var(x_prev - (slope * x_t + intercept), ddof=2)

  s = discrete.schedule_from_betas(betas)
  probe = jnp.array([0.0, 1.0], jnp.float32)
  mean, var, _ = discrete.q_posterior(s, jnp.full((2,), x0, jnp.float32), probe,
                                       jnp.full((2,), t))
  lib_intercept, lib_slope = float(mean[0]), float(mean[1] - mean[0])
  lib_var = float(var[0])
  se_slope = np.sqrt(resid_var / (n * np.var(x_t)))
  se_intercept = np.sqrt(resid_var / n * (1 + np.mean(x_t)**2 / np.var(x_t)))
  se_var = resid_var * np.sqrt(2.0 / (n - 2))
  assert abs(slope - lib_slope) < 5 * se_slope, (slope, lib_slope)
  assert abs(intercept - lib_intercept) < 5 * se_intercept, (intercept, lib_intercept)
  assert abs(resid_var - lib_var) < 5 * se_var, (resid_var, lib_var)


# ------------------------------------------------------------------ parameterisations


def test_conversions_round_trip():
  s = _schedule()
  rng = np.random.default_rng(0)
  t = np.arange(T)
  x0 = rng.uniform(-1, 1, (T, 3, 3, 2))
  eps = rng.normal(size=x0.shape)
  x0_j, eps_j, t_j = (jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32),
                      jnp.asarray(t))
  a = np.sqrt(_abar64())[:, None, None, None]
  sig = np.sqrt(1 - _abar64())[:, None, None, None]
  xt_ref = a * x0 + sig * eps
  v_ref = a * eps - sig * x0  # Salimans & Ho 2022.

  xt = discrete.q_sample(s, x0_j, t_j, eps_j)
  v = discrete.v_from_x0_eps(s, t_j, x0_j, eps_j)
  np.testing.assert_allclose(_np(xt), xt_ref, atol=1e-5)
  np.testing.assert_allclose(_np(v), v_ref, atol=1e-5)

  x0_v, eps_v = discrete.x0_eps_from_output(s, v, xt, t_j, 'v')
  np.testing.assert_allclose(_np(x0_v), x0, atol=1e-5)
  np.testing.assert_allclose(_np(eps_v), eps, atol=1e-5)
  # x0 from eps divides by sqrt(abar) (>= 0.0064 at t = 999) and eps from x0 by sqrt(1 - abar)
  # (>= 0.01 at t = 0): float32 rounding of x_t is amplified accordingly.
  x0_e, _ = discrete.x0_eps_from_output(s, eps_j, xt, t_j, 'epsilon')
  _, eps_x = discrete.x0_eps_from_output(s, x0_j, xt, t_j, 'x0')
  np.testing.assert_allclose(_np(x0_e), x0, atol=1e-6 / a.min() * 10)
  np.testing.assert_allclose(_np(eps_x), eps, atol=1e-6 / sig.min() * 10)
  # Where conditioning is good the round trip is tight.
  mid = slice(100, 900)
  np.testing.assert_allclose(_np(x0_e)[mid], x0[mid], atol=2e-5)
  np.testing.assert_allclose(_np(eps_x)[mid], eps[mid], atol=2e-5)


@pytest.mark.parametrize('prediction_type', discrete.PREDICTION_TYPES)
def test_output_conversion_recovers_truth(prediction_type):
  s = _schedule()
  rng = np.random.default_rng(1)
  t = np.array([0, 1, 7, 100, 500, 900, 999])
  x0 = rng.uniform(-1, 1, (len(t), 4, 4, 3))
  eps = rng.normal(size=x0.shape)
  a = np.sqrt(_abar64()[t])[:, None, None, None]
  sig = np.sqrt(1 - _abar64()[t])[:, None, None, None]
  xt = a * x0 + sig * eps
  target = {'epsilon': eps, 'x0': x0, 'v': a * eps - sig * x0}[prediction_type]
  f32 = lambda z: jnp.asarray(z, jnp.float32)
  np.testing.assert_allclose(
      _np(ddpm.training_target(s, f32(x0), f32(eps), jnp.asarray(t), prediction_type)),
      target, atol=1e-5)
  x0_hat, eps_hat = discrete.x0_eps_from_output(s, f32(target), f32(xt), jnp.asarray(t),
                                                 prediction_type)
  assert x0_hat.dtype == eps_hat.dtype == jnp.float32
  # Tolerances follow the conditioning: x0 from eps at t = 999 and eps from x0 at t = 0.
  np.testing.assert_allclose(_np(x0_hat), x0, atol=1e-3, rtol=0)
  np.testing.assert_allclose(_np(eps_hat), eps, atol=1e-3, rtol=0)
  np.testing.assert_allclose(_np(x0_hat)[2:-1], x0[2:-1], atol=2e-5)
  np.testing.assert_allclose(_np(eps_hat)[2:-1], eps[2:-1], atol=2e-5)
  # bfloat16 outputs are accepted and computed in float32.
  x0_b, _ = discrete.x0_eps_from_output(s, f32(target).astype(jnp.bfloat16), f32(xt),
                                         jnp.asarray(t), prediction_type)
  assert x0_b.dtype == jnp.float32


# ------------------------------------------------------------------ loss


@pytest.mark.parametrize('prediction_type', discrete.PREDICTION_TYPES)
def test_simple_loss_is_mse(prediction_type):
  s = _schedule()
  rng = np.random.default_rng(2)
  t = np.array([0, 3, 250, 999, 600])
  x0 = rng.uniform(-1, 1, (5, 4, 4, 3))
  eps = rng.normal(size=x0.shape)
  out = rng.normal(size=x0.shape)
  a = np.sqrt(_abar64()[t])[:, None, None, None]
  sig = np.sqrt(1 - _abar64()[t])[:, None, None, None]
  target = {'epsilon': eps, 'x0': x0, 'v': a * eps - sig * x0}[prediction_type]
  expected = np.mean((out - target)**2, axis=(1, 2, 3))
  f32 = lambda z: jnp.asarray(z, jnp.float32)
  loss = ddpm.diffusion_loss(s, f32(out), f32(x0), f32(eps), jnp.asarray(t),
                                  prediction_type)
  assert loss.shape == (5,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(_np(loss), expected, rtol=1e-5)
  # The default weighting is 'simple'.
  np.testing.assert_array_equal(
      _np(loss), _np(ddpm.diffusion_loss(s, f32(out), f32(x0), f32(eps), jnp.asarray(t),
                                              prediction_type, weighting='simple')))
  # A bf16 output is upcast before the loss.
  loss_bf16 = ddpm.diffusion_loss(s, f32(out).astype(jnp.bfloat16), f32(x0), f32(eps),
                                       jnp.asarray(t), prediction_type)
  assert loss_bf16.dtype == jnp.float32
  np.testing.assert_allclose(_np(loss_bf16), expected, rtol=2e-2)


@pytest.mark.parametrize('gamma', [5.0, 1.0])
@pytest.mark.parametrize('prediction_type', discrete.PREDICTION_TYPES)
def test_min_snr_loss_is_weighted_x0_error(prediction_type, gamma):
  """weight * MSE(target) == min(SNR, gamma) * MSE(x0, x0_hat) (Hang et al. 2023)."""
  s = _schedule()
  rng = np.random.default_rng(3)
  t = np.array([0, 5, 50, 150, 300, 500, 800, 999])  # SNR from ~1e4 down to ~4e-5.
  abar = _abar64()[t]
  snr = abar / (1 - abar)
  assert snr.max() > gamma > snr.min()
  x0 = rng.uniform(-1, 1, (len(t), 4, 4, 3))
  eps = rng.normal(size=x0.shape)
  a = np.sqrt(abar)[:, None, None, None]
  sig = np.sqrt(1 - abar)[:, None, None, None]
  xt = a * x0 + sig * eps
  target = {'epsilon': eps, 'x0': x0, 'v': a * eps - sig * x0}[prediction_type]
  out = target + 0.1 * rng.normal(size=x0.shape)
  # x0 implied by the perturbed output, derived from x_t = a x0 + sig eps.
  if prediction_type == 'epsilon':
    x0_hat = (xt - sig * out) / a
  elif prediction_type == 'x0':
    x0_hat = out
  else:  # v = a eps - sig x0  =>  x0 = a x_t - sig v.
    x0_hat = a * xt - sig * out
  expected = np.minimum(snr, gamma) * np.mean((x0 - x0_hat)**2, axis=(1, 2, 3))
  f32 = lambda z: jnp.asarray(z, jnp.float32)
  loss = ddpm.diffusion_loss(s, f32(out), f32(x0), f32(eps), jnp.asarray(t),
                                  prediction_type, weighting='min_snr', min_snr_gamma=gamma)
  # snr() divides by 1 - abar formed in float32, ~2e-4 relative error at t = 0 (see q_sample test).
  np.testing.assert_allclose(_np(loss), expected, rtol=5e-4)
  np.testing.assert_allclose(_np(loss)[1:], expected[1:], rtol=1e-4)
  w = ddpm.loss_weight(s, jnp.asarray(t), 'min_snr', prediction_type, gamma)
  assert w.shape == (len(t),)
  np.testing.assert_allclose(_np(discrete.snr(s, jnp.asarray(t))), snr, rtol=5e-4)
  np.testing.assert_array_equal(
      _np(ddpm.loss_weight(s, jnp.asarray(t), 'simple', prediction_type)), np.ones(len(t)))


def test_loss_is_differentiable_and_jittable():
  s = _schedule()
  x0 = jnp.linspace(-1, 1, 2 * 8).reshape(2, 2, 2, 2)
  eps = jnp.cos(jnp.arange(16.0)).reshape(2, 2, 2, 2)
  t = jnp.array([10, 700])
  out = jnp.zeros_like(x0)
  f = jax.jit(lambda o: ddpm.diffusion_loss(s, o, x0, eps, t, 'epsilon').sum())
  g = jax.grad(f)(out)
  # d/do sum_b mean((o - eps)^2) = 2 (o - eps) / (H W C).
  np.testing.assert_allclose(_np(g), 2 * (0 - _np(eps)) / 8, rtol=1e-6)


# ------------------------------------------------------------------ errors


def test_unknown_names_raise_naming_the_config_field():
  s = _schedule(n=10)
  x = jnp.zeros((2, 2, 2, 1))
  t = jnp.array([1, 2])
  with pytest.raises(ValueError, match=r'diffusion\.ddpm\.beta_schedule'):
    discrete.beta_schedule('quadratic', 10)
  config = ml_collections.ConfigDict(dict(beta_schedule='exp', num_timesteps=10,
                                          beta_start=B0, beta_end=B1))
  with pytest.raises(ValueError, match=r'diffusion\.ddpm\.beta_schedule'):
    discrete.make_schedule(config)
  with pytest.raises(ValueError, match=r'diffusion\.ddpm\.prediction_type'):
    discrete.x0_eps_from_output(s, x, x, t, 'score')
  with pytest.raises(ValueError, match=r'diffusion\.ddpm\.prediction_type'):
    ddpm.training_target(s, x, x, t, 'score')
  with pytest.raises(ValueError, match=r'diffusion\.ddpm\.prediction_type'):
    ddpm.loss_weight(s, t, 'min_snr', 'score')
  with pytest.raises(ValueError, match=r'diffusion\.ddpm\.prediction_type'):
    ddpm.diffusion_loss(s, x, x, x, t, 'score')
  with pytest.raises(ValueError, match=r'diffusion\.ddpm\.loss_weighting'):
    ddpm.loss_weight(s, t, 'p2', 'epsilon')
  with pytest.raises(ValueError, match=r'diffusion\.ddpm\.loss_weighting'):
    ddpm.diffusion_loss(s, x, x, x, t, 'epsilon', weighting='p2')
  # The names the config documents are all accepted.
  for name in ('linear', 'cosine', 'scaled_linear', 'sigmoid'):
    assert discrete.beta_schedule(name, 10).shape == (10,)
  for pred in ('epsilon', 'x0', 'v'):
    for weighting in ('simple', 'min_snr'):
      assert ddpm.diffusion_loss(s, x, x, x, t, pred, weighting).shape == (2,)
