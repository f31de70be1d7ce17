"""Flow matching (flow_matching.py): samplers, loss and likelihood against closed forms on Gaussian data,
the time distributions, config errors and a train-step smoke test.

Gaussian data x0 ~ N(mu, s^2) independently per dimension, eps ~ N(0, 1), x_t = (1 - t) x0 + t eps:
x_t is Gaussian with mean m_t = (1 - t) mu and variance V_t = (1 - t)^2 s^2 + t^2, and
(v = eps - x0, x_t) are jointly Gaussian with Cov(v, x_t) = t - (1 - t) s^2. Linear-Gaussian
conditioning gives the optimal velocity (the flow-matching loss's minimiser)

  v*(x, t) = E[eps - x0 | x_t = x] = -mu + (t - (1 - t) s^2) / V_t (x - m_t),

and E[x0 | x_t = x] = mu + (1 - t) s^2 / V_t (x - m_t). Since dm_t/dt = -mu and
dV_t/dt = 2 (t - (1 - t) s^2), v* moves every point along x_t = m_t + sqrt(V_t) z with z fixed:
the exact ODE map from t = 1 (m = 0, V = 1) to t = 0 is x0 = mu + s z, z = x_1, and the density of
the ODE model at t is N(m_t, V_t).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, tiny
from diffusion_jax.objectives import flow_matching
from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import likelihood
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes.validation import validate_config

MU = np.array([0.5, -1.0, 0.2, 0.0])
S = np.array([0.5, 1.0, 1.5, 0.8])
SHAPE = (2, 2, 1)  # Images of D = 4 dimensions, dimension d = MU[d], S[d].
LN2 = math.log(2.0)


def _dcfg(objective='flow_matching', **overrides):
  """The default config with `objective`; flow_<name>=v sets diffusion.flow_matching.<name>."""
  cfg = default.get_config()
  cfg.diffusion.objective = objective
  for k, v in overrides.items():
    cfg.diffusion.flow_matching[k[len('flow_'):]] = v
  return cfg


def _img(a):
  return jnp.asarray(np.asarray(a, np.float32).reshape(SHAPE))


def v_star(x, t):
  """The optimal velocity (module docstring), x [B, 2, 2, 1], t scalar or [B]."""
  t = jnp.reshape(jnp.asarray(t, jnp.float32), (-1, 1, 1, 1))
  mu, s2 = _img(MU), _img(S**2)
  var = (1 - t)**2 * s2 + t**2
  return -mu + (t - (1 - t) * s2) / var * (x - (1 - t) * mu)


def x0_star(x, t):
  t = jnp.reshape(jnp.asarray(t, jnp.float32), (-1, 1, 1, 1))
  mu, s2 = _img(MU), _img(S**2)
  var = (1 - t)**2 * s2 + t**2
  return mu + (1 - t) * s2 / var * (x - (1 - t) * mu)


def _network(prediction, time_scale=1000.0):
  """apply_fn(x, t_net [B]) of the ideal network for `prediction` ('velocity' | 'x0')."""
  def apply_fn(x, t_net):
    t = t_net / time_scale
    return v_star(x, t) if prediction == 'velocity' else x0_star(x, t)
  return apply_fn


def _noise(n, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n,) + SHAPE, jnp.float32)


# ------------------------------------------------------------------ samplers on Gaussian data


# (sampler, steps, per-sample tolerance) at time shift 3: the global error is O(h) for Euler,
# O(h^2) for Heun and the midpoint rule (`test_ode_samplers_converge_at_their_order`). Measured
# max errors over the 4096 samples: euler 1000 steps 0.0087, heun 40 0.022 (mostly its Euler
# step into t = 0, the shifted grid's longest), midpoint 40 7e-5; the bounds are ~2.5x those.
ODE_CASES = [('euler', 1000, 2e-2), ('heun', 40, 5e-2), ('midpoint', 40, 2e-4)]


@pytest.mark.parametrize('prediction', ['velocity', 'x0'])
@pytest.mark.parametrize('sampler,steps,tol', ODE_CASES)
def test_ode_samplers_transport_noise_to_the_gaussian(sampler, steps, tol, prediction):
  n = 4096
  noise = _noise(n)
  config = _dcfg(flow_prediction=prediction, flow_time_shift=3.0)
  config.sample.update(sampler=sampler, steps=steps)
  out = jax.jit(lambda z, key: flow_matching.sample(_network(prediction), config, z, key))(
      noise, jax.random.PRNGKey(1))
  out = np.asarray(out, np.float64).reshape(n, 4)
  exact = MU + S * np.asarray(noise, np.float64).reshape(n, 4)  # The ODE's exact map.
  err = np.abs(out - exact).max()
  assert err < tol, (sampler, err)
  # The sample moments: the exact map's sampling error (4 standard errors) plus the step error.
  assert np.all(np.abs(out.mean(0) - MU) < 4 * S / math.sqrt(n) + tol)
  assert np.all(np.abs(out.std(0) - S) < 4 * S / math.sqrt(2 * n) + tol)


@pytest.mark.parametrize('sampler,order', [('euler', 1), ('heun', 2), ('midpoint', 2)])
def test_ode_samplers_converge_at_their_order(sampler, order):
  """Doubling the steps divides the max error against the exact map by at least ~2^order
  (measured at shift 3: euler 0.51, heun 0.26, midpoint 0.12, super-convergent here)."""
  noise = _noise(1024)
  exact = MU + S * np.asarray(noise, np.float64).reshape(1024, 4)

  def err(steps):
    out = flow_matching.flow_sample(v_star, noise, jax.random.PRNGKey(0), sampler=sampler, steps=steps,
                           shift=3.0)
    return np.abs(np.asarray(out, np.float64).reshape(1024, 4) - exact).max()
  ratio = err(40) / err(20)
  assert ratio < 1.3 * 2.0**-order, ratio
  if order == 1:
    assert ratio > 0.35, ratio  # Euler is first order, not better.


def test_coarse_euler_is_worse_and_trajectory_is_recorded():
  """The per-sample check can fail: Euler on 4 steps misses the exact map; trajectories hold
  x_t after each step (last = output) and x0_hat = x - t v."""
  noise = _noise(256)
  exact = MU + S * np.asarray(noise, np.float64).reshape(256, 4)
  coarse = flow_matching.flow_sample(v_star, noise, jax.random.PRNGKey(0), sampler='euler', steps=4)
  assert np.abs(np.asarray(coarse).reshape(256, 4) - exact).max() > 0.05
  x, traj = flow_matching.flow_sample(v_star, noise, jax.random.PRNGKey(0), sampler='euler', steps=4,
                             trajectory_every=1, trajectory_images=3)
  assert traj.x_t.shape == (4, 3) + SHAPE
  np.testing.assert_array_equal(np.asarray(traj.x_t[-1]), np.asarray(x[:3]))
  np.testing.assert_allclose(np.asarray(traj.x0[0]), np.asarray(x0_star(noise[:3], 1.0)),
                             atol=1e-5)


def test_euler_maruyama_matches_the_moments_and_reduces_to_euler():
  n, steps = 8192, 400
  noise = _noise(n, seed=3)
  run = jax.jit(lambda z, key, c: flow_matching.flow_sample(v_star, z, key, sampler='euler_maruyama',
                                                   steps=steps, noise_scale=c),
                static_argnums=2)
  out = np.asarray(run(noise, jax.random.PRNGKey(5), 1.0), np.float64).reshape(n, 4)
  bias = 0.03  # Euler-Maruyama's O(h) weak error at 400 steps (~0.01 measured).
  assert np.all(np.abs(out.mean(0) - MU) < 4 * S / math.sqrt(n) + bias)
  assert np.all(np.abs(out.std(0) - S) < 4 * S / math.sqrt(2 * n) + bias)
  # Not the ODE map: the noise re-draws the path (the test above would fail on it).
  exact = MU + S * np.asarray(noise, np.float64).reshape(n, 4)
  assert np.abs(out - exact).mean() > 0.1
  # With noise scale 0 the SDE is the ODE: exactly the Euler sampler.
  euler = flow_matching.flow_sample(v_star, noise, jax.random.PRNGKey(5), sampler='euler', steps=steps)
  np.testing.assert_array_equal(np.asarray(run(noise, jax.random.PRNGKey(5), 0.0)),
                                np.asarray(euler))


# ------------------------------------------------------------------ the loss's minimiser


def _perturbation(x, t):
  """A fixed direction g(x, t) to move the network output along."""
  t = jnp.reshape(t, (-1, 1, 1, 1))
  return jnp.sin(2.0 * x) + t - 0.5


@pytest.mark.parametrize('prediction', ['velocity', 'x0'])
@pytest.mark.parametrize('time_dist', ['uniform', 'logit_normal'])
def test_expected_loss_is_a_parabola_with_its_minimum_at_the_optimum(prediction, time_dist):
  """E loss(out* + delta g) = A + 2 B delta + C delta^2 with B = 0 at the optimal output
  (v* or x0*), over Monte-Carlo draws shared by every delta; and a shifted output's
  minimiser is the shift, so the check can fail."""
  n = 50_000
  dcfg = _dcfg(flow_prediction=prediction, flow_time_dist=time_dist, flow_time_shift=2.0)
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(11), 3)
  x0 = _img(MU) + _img(S) * jax.random.normal(k0, (n,) + SHAPE)
  ex = flow_matching.training_example(dcfg, x0, jax.random.normal(k1, x0.shape), k2)
  t = ex['time']
  np.testing.assert_allclose(np.asarray(ex['t']), np.asarray(t) * 1000.0, rtol=1e-6)
  optimal = (v_star if prediction == 'velocity' else x0_star)(ex['x_t'], t)
  g = _perturbation(ex['x_t'], t)
  deltas = np.array([-0.4, -0.2, 0.0, 0.2, 0.4])

  def per_example(out):
    return np.asarray(flow_matching.per_example_loss(dcfg, out, ex), np.float64)

  for offset in (0.0, 0.15):
    losses = np.stack([per_example(optimal + (offset + d) * g) for d in deltas])  # [5, n]
    c2, c1, c0 = np.polyfit(deltas, losses.mean(1), 2)
    resid = losses.mean(1) - np.polyval([c2, c1, c0], deltas)
    assert np.abs(resid).max() < 1e-6 * losses.mean()  # Exactly quadratic in delta.
    argmin = -c1 / (2 * c2)
    # Standard error of argmin from the per-example linear coefficient.
    lin = (losses[3] - losses[1]) / (2 * 0.2)
    se = lin.std() / math.sqrt(n) / (2 * c2)
    assert abs(argmin + offset) < 5 * se + 1e-3, (offset, argmin, se)
    assert se < 0.03  # The Monte-Carlo sample pins the minimiser down.


def test_x0_loss_is_the_clamped_velocity_loss():
  dcfg = _dcfg(flow_prediction='x0', flow_x0_min_t=0.05, flow_time_dist='uniform')
  k0, k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 4)
  x0 = jax.random.normal(k0, (512,) + SHAPE)
  ex = flow_matching.training_example(dcfg, x0, jax.random.normal(k1, x0.shape), k2)
  x0_hat = x0 + 0.1 * jax.random.normal(k3, x0.shape)
  got = np.asarray(flow_matching.per_example_loss(dcfg, x0_hat, ex))
  t = np.asarray(ex['time'], np.float64)
  v_hat = (np.asarray(ex['x_t']) - np.asarray(x0_hat)) / np.maximum(t, 0.05)[:, None, None, None]
  v = (np.asarray(ex['x_t']) - np.asarray(x0)) / np.maximum(t, 0.05)[:, None, None, None]
  np.testing.assert_allclose(got, np.mean((v_hat - v)**2, axis=(1, 2, 3)), rtol=1e-4)
  # Where t >= the clamp this is ||v_hat - v||^2 with v = eps - x0 itself.
  big = t > 0.05
  v_true = np.asarray(ex['velocity'])
  np.testing.assert_allclose(got[big], np.mean((v_hat - v_true)**2, axis=(1, 2, 3))[big],
                             rtol=1e-3)
  assert (~big).sum() > 0 and big.sum() > 0
  np.testing.assert_allclose(np.asarray(ex['x_t']),
                             (1 - t[:, None, None, None]) * np.asarray(x0)
                             + t[:, None, None, None] * (v_true + np.asarray(x0)), atol=1e-5)


# ------------------------------------------------------------------ times


def test_time_shift_is_the_documented_function():
  t = np.array([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
  for s in (0.25, 1.0, 3.0, 4.0):
    got = flow_matching.time_shift(t, s)
    np.testing.assert_allclose(got, s * t / (1 + (s - 1) * t), rtol=1e-12)
    assert got[0] == 0.0 and got[-1] == 1.0
    assert np.all(np.diff(flow_matching.time_shift(np.linspace(0, 1, 1001), s)) > 0)
    inner = t[1:-1]  # Noise-to-signal ratio times s.
    np.testing.assert_allclose(flow_matching.time_shift(inner, s) / (1 - flow_matching.time_shift(inner, s)),
                               s * inner / (1 - inner), rtol=1e-12)
  np.testing.assert_allclose(flow_matching.time_shift(0.5, 3.0), 0.75)
  assert flow_matching.time_shift_for_resolution(64, 64, 32, 32) == 2.0
  assert flow_matching.time_shift_for_resolution(1024, 1024, 256, 256) == 4.0  # SD3's sqrt(m/n).
  grid = flow_matching.sample_time_grid(10, 3.0)
  np.testing.assert_allclose(grid, flow_matching.time_shift(1 - np.arange(11) / 10, 3.0))
  assert grid[0] == 1.0 and grid[-1] == 0.0


@pytest.mark.parametrize('mean,std,shift', [(0.0, 1.0, 1.0), (-0.5, 0.7, 1.0), (0.3, 1.2, 3.0)])
def test_logit_normal_times_have_the_right_moments(mean, std, shift):
  n = 100_000
  dcfg = _dcfg(flow_time_dist='logit_normal', flow_logit_mean=mean, flow_logit_std=std,
               flow_time_shift=shift)
  t = np.asarray(flow_matching.sample_times(dcfg.diffusion.flow_matching, jax.random.PRNGKey(4),
                                            n), np.float64)
  logit = np.log(t) - np.log1p(-t)
  # The shift multiplies t / (1 - t) by s, so it adds log s to the logit.
  assert abs(logit.mean() - (mean + math.log(shift))) < 4 * std / math.sqrt(n)
  assert abs(logit.std() - std) < 4 * std / math.sqrt(2 * n)
  assert np.all((t > 0) & (t < 1))


def test_uniform_times_are_uniform_then_shifted():
  n = 100_000
  flow = _dcfg(flow_time_dist='uniform').diffusion.flow_matching
  t = np.asarray(flow_matching.sample_times(flow, jax.random.PRNGKey(5), n))
  assert abs(t.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)
  hist, _ = np.histogram(t, bins=10, range=(0, 1))
  assert np.all(np.abs(hist / n - 0.1) < 5 * math.sqrt(0.09 / n))
  flow = _dcfg(flow_time_dist='uniform', flow_time_shift=3.0).diffusion.flow_matching
  shifted = np.asarray(flow_matching.sample_times(flow, jax.random.PRNGKey(5), n))
  np.testing.assert_allclose(shifted, flow_matching.time_shift(t, 3.0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ likelihood


def _log_normal(y, mean, var):
  return np.sum(-0.5 * (y - mean)**2 / var - 0.5 * np.log(2 * np.pi * var), axis=1)


@pytest.mark.parametrize('prediction', ['velocity', 'x0'])
def test_flow_ode_likelihood_is_the_gaussian_density(prediction):
  n = 16
  rng = np.random.default_rng(0)
  y = MU + S * rng.normal(size=(n, 4))
  dcfg = _dcfg(flow_prediction=prediction)
  result = jax.jit(lambda y_, key: likelihood.log_likelihood(
      _network(prediction), dcfg, y_, key, probe='exact'))(
          jnp.asarray(y.reshape((n,) + SHAPE), jnp.float32), jax.random.PRNGKey(0))
  assert bool(result.successful)
  t0 = 0.0 if prediction == 'velocity' else flow_matching.X0_LIKELIHOOD_T0
  ref = _log_normal(y, (1 - t0) * MU, (1 - t0)**2 * S**2 + t0**2)
  got = np.asarray(result.log_prob, np.float64)
  np.testing.assert_allclose(got / (4 * LN2), ref / (4 * LN2), atol=2e-3)  # bits/dim.
  # The divergence integral is the log-Jacobian sum_d log(1 / s_d) of x1 = (y - mu) / s.
  np.testing.assert_allclose(np.asarray(result.delta_log_prob), -np.sum(np.log(S)), atol=5e-3)
  # A wrong field gives a wrong density (the check can fail).
  wrong = jax.jit(lambda y_, key: likelihood.solve_log_likelihood(
      lambda t, x: 1.1 * v_star(x, t), y_, key, t0=0.0, t1=1.0, probe='exact'))(
          jnp.asarray(y.reshape((n,) + SHAPE), jnp.float32), jax.random.PRNGKey(0))
  assert np.abs(np.asarray(wrong.log_prob) - ref).mean() > 0.05


def test_edm_ode_likelihood_is_the_gaussian_density():
  """EDM's ideal denoiser D*(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), through
  edm.denoise's preconditioning: the model density at sigma_min is N(mu, s^2 + sigma_min^2) up to
  the prior's mismatch N(mu, s^2 + sigma_max^2) vs N(0, sigma_max^2), and equals exactly the
  prior pulled back by the linear flow x -> mu + r (x - mu), r = sqrt((s^2 + smax^2) / (s^2 +
  smin^2))."""
  edm = pytest.importorskip('diffusion_jax.objectives.edm')
  dcfg = _dcfg(objective='edm')
  e = dcfg.diffusion.edm
  sd, smin, smax = e.sigma_data, e.sigma_min, e.sigma_max
  mu, s2 = _img(MU), _img(S**2)

  def apply_fn(x_in, c_noise):  # F with D = c_skip x + c_out F equal to D*.
    sigma = jnp.exp(4.0 * c_noise).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, _ = edm.preconditioning(sigma, sd)
    x = x_in / c_in
    d_star = mu + s2 / (s2 + sigma**2) * (x - mu)
    return (d_star - c_skip * x) / c_out

  n = 16
  rng = np.random.default_rng(1)
  y = MU + np.sqrt(S**2 + smin**2) * rng.normal(size=(n, 4))
  result = jax.jit(lambda y_, key: likelihood.log_likelihood(
      apply_fn, dcfg, y_, key, probe='exact'))(
          jnp.asarray(y.reshape((n,) + SHAPE), jnp.float32), jax.random.PRNGKey(0))
  assert bool(result.successful)
  r = np.sqrt((S**2 + smax**2) / (S**2 + smin**2))
  x1 = MU + r * (y - MU)
  pulled_back = _log_normal(x1, 0.0, smax**2) + np.sum(np.log(r))
  got = np.asarray(result.log_prob, np.float64)
  np.testing.assert_allclose(got / (4 * LN2), pulled_back / (4 * LN2), atol=2e-3)
  # The data's density at sigma_min differs from it only by the prior's mismatch at sigma_max.
  marginal = _log_normal(y, MU, S**2 + smin**2)
  mismatch = _log_normal(x1, 0.0, smax**2) - _log_normal(x1, MU, S**2 + smax**2)
  assert np.abs(mismatch).max() < 0.1  # O(mu / sigma_max).
  assert np.all(np.abs(got - marginal) < np.abs(mismatch) + 2e-3 * 4 * LN2)


# ------------------------------------------------------------------ config errors


def _flow_config(**overrides):
  config = tiny.get_config()
  config.diffusion.objective = 'flow_matching'
  config.sample.sampler = 'heun'
  config.eval.metrics = ('ode_nll',)
  for dotted, value in overrides.items():
    *parents, field = dotted.split('__')
    node = config
    for name in parents:
      node = node[name]
    node[field] = value
  return config


BAD = {
    'time_dist': ({'diffusion__flow_matching__time_dist': 'beta'}, ['diffusion.flow_matching.time_dist', 'beta']),
    'logit_std': ({'diffusion__flow_matching__logit_std': 0.0}, ['diffusion.flow_matching.logit_std']),
    'shift': ({'diffusion__flow_matching__time_shift': -1.0}, ['diffusion.flow_matching.time_shift']),
    'prediction': ({'diffusion__flow_matching__prediction': 'eps'}, ['diffusion.flow_matching.prediction', 'eps']),
    'x0_min_t': ({'diffusion__flow_matching__x0_min_t': 1.5}, ['diffusion.flow_matching.x0_min_t']),
    'time_scale': ({'diffusion__flow_matching__time_scale': 0.0}, ['diffusion.flow_matching.time_scale']),
    'learn_sigma': ({'model__learn_sigma': True}, ['model.learn_sigma']),
    'ddpm_sampler': ({'sample__sampler': 'ddim'},
                     ['sample.sampler', 'ddim', 'euler', 'heun', 'midpoint', 'euler_maruyama']),
    'steps': ({'sample__steps': 0}, ['sample.steps']),
    'noise_scale': ({'sample__flow_noise_scale': -1.0}, ['sample.flow_noise_scale']),
    'sample_shift': ({'sample__flow_shift': -2.0}, ['sample.flow_shift']),
    'guidance_unconditional': ({'sample__guidance_scale': 2.0}, ['sample.guidance_scale']),
}


@pytest.mark.parametrize('name', sorted(BAD))
def test_bad_flow_config_raises_naming_the_field(name):
  overrides, fields = BAD[name]
  validate_config(_flow_config())  # The base is fine ...
  with pytest.raises(ConfigError) as info:
    validate_config(_flow_config(**overrides))  # ... and each override is not.
  for field in fields:
    assert field in str(info.value), (field, str(info.value))


def test_vlb_metric_stops_only_eval_mode():
  config = _flow_config(eval__metrics=('vlb', 'ode_nll'))
  validate_config(config, 'train')  # A plain objective override trains as is ...
  with pytest.raises(ConfigError, match=r"eval.metrics has 'vlb'.*'flow_matching'.*'ode_nll'"):
    validate_config(config, 'eval')  # ... only --mode=eval reads eval.metrics.


# ------------------------------------------------------------------ training


def test_flow_train_step_loss_falls():
  """configs/tiny.py with objective flow_matching: Adam 2e-3 on one fixed batch; the loss (fresh
  t and noise each step) falls over 30 steps."""
  config = _flow_config()
  config.model.unet.dropout = 0.0
  config.training.batch_size = 16
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 0
  config.optim.lr_schedule = 'constant'
  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:1])
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  state = train_state.create_train_state(config, mesh, jax.random.PRNGKey(0))
  step = train_state.make_train_step(model, tx, config, mesh)
  images, _ = pipeline.load_digits()
  batch = jax.device_put({'image': images[:16].astype(np.float32) / 127.5 - 1.0},
                         sharding.batch_sharding(mesh))
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  losses = np.array(losses)
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses
