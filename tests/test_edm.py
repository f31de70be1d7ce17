"""The EDM objective (diffusion_jax/edm.py, Karras et al. 2022).

The references are independent of the code under test: Table 1's formulas written out in
float64; the ideal denoiser of Gaussian data, D*(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)
per dimension, whose probability-flow ODE has the closed-form solution x(sigma) - mu =
sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2) (x(sigma_max) - mu); and, because that denoiser is
affine in x, the exact mean and variance of the *discretised* Heun / Euler / churn recursion,
propagated as scalars in float64 (so the sampler tests separate discretisation from sampling
error). Everything but the train-step smoke runs on a fake network (no compile of a U-Net).
"""

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default, digits_edm, tiny  # pylint: disable=g-import-not-at-top
from diffusion_jax.objectives import edm
from diffusion_jax.data import pipeline
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes.validation import validate_config

# Gaussian "data" on [N, 2, 2, 1] images: a different mean and std in each of the 4 dimensions.
MU = np.array([0.3, -0.5, 0.0, 0.8]).reshape(2, 2, 1)
S = np.array([0.5, 0.2, 1.0, 0.05]).reshape(2, 2, 1)
N = 4096


def _dcfg(**overrides):
  """The default config with objective 'edm'; edm_<name>=v sets diffusion.edm.<name>."""
  config = default.get_config()
  config.diffusion.objective = 'edm'
  for k, v in overrides.items():
    config.diffusion.edm[k[len('edm_'):]] = v
  return config


def _sample_cfg(sampler='heun', steps=18, **overrides):
  """_dcfg() with sample.sampler, sample.steps and the sample.* `overrides`."""
  config = _dcfg()
  config.sample.sampler, config.sample.steps = sampler, steps
  for k, v in overrides.items():
    config.sample[k] = v
  return config


def ideal_denoiser(x, sigma, mu=MU, s=S):
  """D*(x; sigma) = E[x0 | x0 + sigma n = x] for x0 ~ N(mu, s^2) per dimension."""
  return mu + s**2 / (s**2 + sigma**2) * (x - mu)


def network_of(target_denoiser, sigma_data):
  """The F that makes the preconditioned D equal `target_denoiser(x, sigma [B,1,1,1])`: the
  network input is c_in x and its time c_noise = ln(sigma) / 4, so sigma = exp(4 t), x =
  x_in / c_in and F = (D - c_skip x) / c_out."""
  def apply_fn(x_in, t):
    sigma = jnp.exp(4.0 * t).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, _ = edm.preconditioning(sigma, sigma_data)
    x = x_in / c_in
    return (target_denoiser(x, sigma) - c_skip * x) / c_out
  return apply_fn


# ------------------------------------------------------------------ preconditioning


def test_preconditioning_is_table_1_in_float64():
  sd = 0.5
  sigma = np.array([0.002, 0.01, 0.3, 0.5, 1.0, 7.0, 80.0])
  c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma, sd)
  assert all(c.dtype == np.float64 for c in (c_skip, c_out, c_in, c_noise))
  np.testing.assert_allclose(c_skip, 0.25 / (sigma**2 + 0.25), rtol=1e-15)
  np.testing.assert_allclose(c_out, sigma * 0.5 / np.sqrt(0.25 + sigma**2), rtol=1e-15)
  np.testing.assert_allclose(c_in, 1.0 / np.sqrt(sigma**2 + 0.25), rtol=1e-15)
  np.testing.assert_allclose(c_noise, 0.25 * np.log(sigma), rtol=1e-15)
  # What they are derived from (the paper's appendix B.6): unit-variance network input
  # Var(c_in (x0 + sigma n)) = 1, unit-variance effective target Var((x0 - c_skip x) / c_out) =
  # 1, and c_skip minimising c_out.
  np.testing.assert_allclose(c_in**2 * (sd**2 + sigma**2), 1.0, rtol=1e-14)
  np.testing.assert_allclose(((1 - c_skip)**2 * sd**2 + c_skip**2 * sigma**2) / c_out**2, 1.0,
                             rtol=1e-14)
  for cs in (c_skip * 0.9, c_skip * 1.1):
    assert np.all((1 - cs)**2 * sd**2 + cs**2 * sigma**2 > c_out**2)
  # lambda(sigma) c_out^2 = 1: the loss on F is unweighted.
  np.testing.assert_allclose(edm.loss_weight(sigma, sd) * c_out**2, 1.0, rtol=1e-14)
  # JAX float32 agrees.
  for got, want in zip(edm.preconditioning(jnp.asarray(sigma, jnp.float32), sd),
                       (c_skip, c_out, c_in, c_noise)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)


def test_denoise_wraps_the_network_as_c_skip_x_plus_c_out_f():
  sd = 0.7
  dcfg = _dcfg(edm_sigma_data=sd)
  x = np.random.default_rng(0).normal(size=(3, 2, 2, 1)) * 3.0
  labels = np.array([0, 2, 1])

  def apply_fn(x_in, t, y):  # Any F of (input, time, label).
    return jnp.sin(x_in) * (1.0 + t[:, None, None, None]) + 0.1 * y[:, None, None, None]

  def reference(sigma):  # Written out in float64.
    sigma = np.broadcast_to(sigma, (3,)).reshape(3, 1, 1, 1)
    x_in = x / np.sqrt(sigma**2 + sd**2)
    f = np.sin(x_in) * (1.0 + np.log(sigma) / 4) + 0.1 * labels.reshape(3, 1, 1, 1)
    return sd**2 / (sigma**2 + sd**2) * x + sigma * sd / np.sqrt(sigma**2 + sd**2) * f

  for sigma in (0.05, 2.0, np.array([0.01, 1.0, 50.0])):
    got = edm.denoise(apply_fn, jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32),
                      jnp.asarray(labels), dcfg)
    np.testing.assert_allclose(np.asarray(got), reference(sigma), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ training


@pytest.mark.parametrize('p_mean,p_std', [(-1.2, 1.2), (0.4, 0.6)])
def test_training_sigmas_are_log_normal_and_the_example_is_consistent(p_mean, p_std):
  n, sd = 100_000, 0.5
  dcfg = _dcfg(edm_p_mean=p_mean, edm_p_std=p_std, edm_sigma_data=sd)
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (n, 1, 1, 1), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.PRNGKey(2), (n, 1, 1, 1))
  ex = jax.jit(functools.partial(edm.training_example, dcfg))(x0, noise, jax.random.PRNGKey(3))
  log_sigma = np.log(np.asarray(ex['sigma'], np.float64))
  # Sample mean and std of n normal draws: standard errors p_std / sqrt(n), p_std / sqrt(2n).
  assert abs(log_sigma.mean() - p_mean) < 5 * p_std / math.sqrt(n)
  assert abs(log_sigma.std(ddof=1) - p_std) < 5 * p_std / math.sqrt(2 * n)
  # The network's inputs and the loss's target and weight, in float64 from sigma.
  sigma = np.asarray(ex['sigma'], np.float64).reshape(n, 1, 1, 1)
  x = np.asarray(x0, np.float64) + sigma * np.asarray(noise, np.float64)
  np.testing.assert_allclose(ex['x_t'], x / np.sqrt(sigma**2 + sd**2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ex['t'], np.log(sigma[:, 0, 0, 0]) / 4, rtol=1e-5, atol=1e-6)
  c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / np.sqrt(sigma**2 + sd**2)
  np.testing.assert_allclose(ex['target'], (x0 - c_skip * x) / c_out, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ex['weight'], 1.0, rtol=1e-5)


def _expected_losses(apply_fn, deltas, num=200_000, sd=0.5):
  """Mean per-example loss of F + delta g on `num` draws of Gaussian data (the same draws for
  every delta), and the per-draw residual products for the standard error of the minimiser."""
  dcfg = _dcfg(edm_sigma_data=sd)
  keys = jax.random.split(jax.random.PRNGKey(7), 3)
  x0 = MU + S * jax.random.normal(keys[0], (num,) + MU.shape)
  noise = jax.random.normal(keys[1], x0.shape)
  ex = edm.training_example(dcfg, x0, noise, keys[2])
  f = apply_fn(ex['x_t'], ex['t'])
  g = jnp.tanh(ex['x_t']) + 0.5  # Any perturbation that depends on the network's input.
  losses = [float(jnp.mean(edm.per_example_loss(dcfg, f + d * g, ex))) for d in deltas]
  # d/d delta of the mean loss at 0 is 2 E[w mean((F - T) g)]: its per-draw terms.
  grad_terms = np.asarray(2 * ex['weight'] * jnp.mean((f - ex['target']) * g, axis=(1, 2, 3)))
  curvature = float(2 * jnp.mean(ex['weight'] * jnp.mean(g * g, axis=(1, 2, 3))))
  return np.array(losses), grad_terms, curvature


def test_the_ideal_denoiser_minimises_the_loss():
  """Expected loss along F* + delta g: a parabola with its minimum at delta = 0 (within the
  sampling error of its slope); a wrong denoiser (too little shrinkage) has its minimum away."""
  deltas = np.array([-0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2])
  sd = 0.5
  for denoiser, should_be_optimal in (
      (ideal_denoiser, True),
      (lambda x, sigma: ideal_denoiser(x, sigma, s=1.5 * S), False)):
    losses, grad_terms, curvature = _expected_losses(network_of(denoiser, sd), deltas, sd=sd)
    a, b, c = np.polyfit(deltas, losses, 2)
    np.testing.assert_allclose(2 * a, curvature, rtol=1e-3)  # The loss is quadratic in delta.
    vertex = -b / (2 * a)
    vertex_se = grad_terms.std(ddof=1) / math.sqrt(len(grad_terms)) / curvature
    if should_be_optimal:
      assert abs(vertex) < 4 * vertex_se, (vertex, vertex_se)
      assert losses[0] > losses[3] < losses[-1]
    else:
      assert abs(vertex) > 10 * vertex_se, (vertex, vertex_se)


# ------------------------------------------------------------------ sampling


def discretised_moments(sigmas, heun, s_churn=0.0, s_tmin=0.0, s_tmax=float('inf'),
                        s_noise=1.0, mu=MU, s=S):
  """Exact mean and std per dimension of the sampler's output when D = D* (affine in x):
  x_{i+1} - mu = A_i (x_hat - mu) with Euler / Heun factors A_i, and churn adds variance."""
  steps = len(sigmas) - 1
  mean, var = np.zeros_like(mu), np.full_like(s, sigmas[0]**2)  # x = sigma_max n.
  gamma = min(s_churn / steps, math.sqrt(2) - 1)
  for i in range(steps):
    sig, sig_next = sigmas[i], sigmas[i + 1]
    sig_hat = sig * (1 + gamma) if s_tmin <= sig <= s_tmax else sig
    var = var + s_noise**2 * (sig_hat**2 - sig**2)
    slope = lambda sg: (1 - s**2 / (s**2 + sg**2)) / sg  # d = slope (x - mu)
    h = sig_next - sig_hat
    a = 1 + h * slope(sig_hat)
    if heun and sig_next > 0:
      a = 1 + h / 2 * (slope(sig_hat) + a * slope(sig_next))
    mean, var = mu + a * (mean - mu), a**2 * var
  return mean, np.sqrt(var)


@functools.lru_cache(maxsize=None)
def run_sampler(sampler, steps=18, seed=0, **opts):
  dcfg = _dcfg()
  scfg = _sample_cfg(sampler, steps, **opts)
  noise = jax.random.normal(jax.random.PRNGKey(seed), (N,) + MU.shape)
  fn = jax.jit(lambda n, k: edm.sample(network_of(ideal_denoiser, 0.5), scfg, n, k))
  out = np.asarray(fn(noise, jax.random.PRNGKey(seed + 1)), np.float64)
  return out, np.asarray(noise, np.float64), edm.sampling_sigmas(dcfg, steps, scfg.sample.rho)


CHURN = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)  # The paper's (appendix E).


@pytest.mark.parametrize('sampler,opts', [('heun', {}), ('heun', CHURN), ('euler', {})])
def test_sampler_at_18_steps_matches_its_discretisation(sampler, opts):
  """18 steps (35 network calls with heun): the samples' mean / std per dimension equal those of
  the discretised recursion within 5 standard errors (mean: std / sqrt(N); std: std /
  sqrt(2 (N - 1)) for normal data). At 18 steps the discretisation is not negligible on these
  narrow Gaussians (heun std +4..11%, with the paper's ImageNet churn, meant for 256 steps,
  +11..25%, euler -14..21%), so this pins down the sampler, including the churn noise, exactly."""
  out, _, sigmas = run_sampler(sampler, 18, **opts)
  mean, std = out.mean(0), out.std(0, ddof=1)
  exp_mean, exp_std = discretised_moments(sigmas, sampler == 'heun', **opts)
  assert np.all(np.abs(mean - exp_mean) < 5 * exp_std / math.sqrt(N)), (mean, exp_mean)
  assert np.all(np.abs(std - exp_std) < 5 * exp_std / math.sqrt(2 * (N - 1))), (std, exp_std)


@pytest.mark.parametrize('sampler,steps,opts,disc_tol', [
    ('heun', 128, {}, 0.002), ('heun', 256, CHURN, 0.01), ('euler', 256, {}, 0.02)])
def test_sampler_with_the_ideal_denoiser_reproduces_the_data(sampler, steps, opts, disc_tol):
  """With enough steps the output is the data distribution N(mu, s^2): its mean and std per
  dimension match mu and s within 5 standard errors plus the discretisation's bias, which is
  itself below `disc_tol` s (heun: second order, churn and euler: first order in the steps)."""
  out, _, sigmas = run_sampler(sampler, steps, **opts)
  mean, std = out.mean(0), out.std(0, ddof=1)
  exp_mean, exp_std = discretised_moments(sigmas, sampler == 'heun', **opts)
  # The start N(0, sigma_max^2) instead of N(mu, s^2 + sigma_max^2) shifts the mean by about
  # mu s / sigma_max; the rest is the discretisation.
  assert np.all(np.abs(exp_mean - MU) < disc_tol * S + np.abs(MU) * S / sigmas[0])
  assert np.all(np.abs(exp_std / S - 1) < disc_tol)
  assert np.all(np.abs(mean - MU) < 5 * S / math.sqrt(N) + np.abs(exp_mean - MU)), mean
  assert np.all(np.abs(std - S) < 5 * S / math.sqrt(2 * (N - 1)) + np.abs(exp_std - S)), std


def test_deterministic_heun_follows_the_ode_per_sample():
  """Per sample: at 18 steps the output is the discretised affine map mu + A (x_max - mu) (to
  float32 rounding); at 128 steps it is the exact ODE solution mu + s / sqrt(s^2 +
  sigma_max^2) (x_max - mu) to 0.5% of s."""
  for steps, tol_exact in ((18, None), (128, 5e-3)):
    out, noise, sigmas = run_sampler('heun', steps)
    x_max = sigmas[0] * noise
    factor = discretised_moments(sigmas, True, mu=MU, s=S)[1] / sigmas[0]  # |A| = std ratio.
    np.testing.assert_allclose(out, MU + factor * (x_max - MU), rtol=0, atol=2e-5)
    exact = MU + S / np.sqrt(S**2 + sigmas[0]**2) * (x_max - MU)
    err = (np.abs(out - exact) / S).max()
    if tol_exact is None:
      assert err > 0.05  # 18 steps are visibly off on these narrow Gaussians ...
    else:
      assert err < tol_exact, err  # ... 128 are not.


def test_churn_makes_the_sampler_stochastic():
  a, _, _ = run_sampler('heun', 18, **CHURN)
  b, _, _ = run_sampler('heun', 18, seed=0, s_churn=40.0, s_tmin=0.05, s_tmax=50.0,
                        s_noise=1.003, rho=7.0)
  np.testing.assert_array_equal(a, b)  # Same rng: same draws.
  scfg = _sample_cfg('heun', 18, **CHURN)
  fn = lambda k: edm.sample(network_of(ideal_denoiser, 0.5), scfg, jnp.zeros((8,) + MU.shape),
                            k)
  assert np.abs(np.asarray(fn(jax.random.PRNGKey(1)) - fn(jax.random.PRNGKey(2)))).max() > 1e-3


def test_one_euler_step_is_the_guided_denoiser_and_trajectories_end_at_the_output():
  """Euler with one step from sigma_max to 0 returns D(x; sigma_max); with classifier-free
  guidance that is D_u + s (D_c - D_u) (make_network_fn's interleaved batch)."""
  dcfg = _dcfg()
  null = 3
  labels = jnp.array([0, 1, 2, 1])

  def apply_fn(x_in, t, y):
    return jnp.cos(x_in + y[:, None, None, None]) * (1 + 0.1 * t[:, None, None, None])

  noise = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 1))
  scale = 2.5
  out = edm.sample(apply_fn, _sample_cfg('euler', 1, guidance_scale=scale), noise,
                   jax.random.PRNGKey(1), labels=labels, null_label=null)
  sigma_max = dcfg.diffusion.edm.sigma_max
  x = noise * sigma_max
  d_c = edm.denoise(apply_fn, x, sigma_max, labels, dcfg)
  d_u = edm.denoise(apply_fn, x, sigma_max, jnp.full_like(labels, null), dcfg)
  np.testing.assert_allclose(out, d_u + scale * (d_c - d_u), rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(d_c - d_u)).max() > 1e-2

  x0, traj = edm.sample(apply_fn, _sample_cfg('heun', 5), noise, jax.random.PRNGKey(1),
                        labels=labels, null_label=null, trajectory_every=2, trajectory_images=3)
  assert traj.x_t.shape == (3, 3, 2, 2, 1) and traj.x0.shape == (3, 3, 2, 2, 1)
  np.testing.assert_array_equal(traj.x_t[-1], x0[:3])


def test_sampler_rejects_a_ddpm_sampler_name():
  with pytest.raises(ValueError, match=r"sample.sampler='ddim'.*\('heun', 'euler'\)"):
    edm.sample(network_of(ideal_denoiser, 0.5), _sample_cfg('ddim', 10), jnp.zeros((2, 2, 2, 1)),
               jax.random.PRNGKey(0))


# ------------------------------------------------------------------ config


BAD = {
    'ddpm_sampler': ({'sample.sampler': 'ddim'}, ['sample.sampler', "'heun'"]),
    'dpm_solver': ({'sample.sampler': 'dpm_solver_pp'}, ['sample.sampler', 'dpm_solver_pp']),
    'learn_sigma': ({'model.learn_sigma': True}, ['model.learn_sigma']),
    'sigma_data': ({'diffusion.edm.sigma_data': 0.0}, ['diffusion.edm.sigma_data']),
    'sigma_range': ({'diffusion.edm.sigma_min': 80.0, 'diffusion.edm.sigma_max': 1.0},
                    ['diffusion.edm.sigma_min', 'sigma_max']),
    'p_std': ({'diffusion.edm.p_std': 0.0}, ['diffusion.edm.p_std']),
    'steps': ({'sample.steps': 0}, ['sample.steps']),
    'churn': ({'sample.s_churn': -1.0}, ['sample.s_churn']),
    'guidance_unconditional': ({'sample.guidance_scale': 2.0}, ['sample.guidance_scale']),
    'thresholding': ({'sample.thresholding': 'static'}, ['sample.thresholding']),
}


@pytest.mark.parametrize('name', sorted(BAD))
def test_bad_edm_config_raises_naming_the_field(name):
  overrides, fields = BAD[name]
  config = digits_edm.get_config()
  validate_config(config, 'sample')  # The base is fine.
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  with pytest.raises(ConfigError) as e:
    validate_config(config, 'sample')
  for field in fields:
    assert field in str(e.value), (field, str(e.value))


def test_vlb_metric_stops_only_eval_mode():
  """'vlb' is ddpm's bound: --mode=eval refuses it for edm; train and sample never read it."""
  config = digits_edm.get_config()
  config.eval.metrics = ('vlb',)
  validate_config(config, 'train', num_devices=1, num_processes=1)
  validate_config(config, 'sample', num_devices=1, num_processes=1)
  with pytest.raises(ConfigError, match=r"eval.metrics has 'vlb'.*'ode_nll'"):
    validate_config(config, 'eval', num_devices=1, num_processes=1)


def test_shipped_edm_configs_validate():
  from configs import cifar10_edm  # pylint: disable=g-import-not-at-top
  validate_config(digits_edm.get_config(), 'train', num_devices=1, num_processes=1)
  config = cifar10_edm.get_config()
  validate_config(config, 'sample', num_devices=8, num_processes=1)
  assert config.sample.steps * 2 - 1 == 35  # The paper's network-evaluation count.
  # EMA half-life of 0.5 Mimg at batch 512.
  half_life = math.log(0.5) / math.log(config.optim.ema_decay) * config.training.batch_size
  assert abs(half_life - 500_000) < 100
  assert config.training.num_train_steps * config.training.batch_size == pytest.approx(200e6,
                                                                                      rel=1e-5)


# ------------------------------------------------------------------ train step


def test_tiny_edm_train_step_loss_falls():
  """configs/tiny.py (one 8x8 level, no attention: a quick compile) with objective 'edm',
  trained 30 steps on one batch of 16 digits: the EDM loss on a fixed set of 256 (image,
  sigma, noise) draws falls by more than a fifth (1.66 -> 1.14 here). At init the output layer
  is zero, so that loss is E[weight target^2] exactly."""
  config = tiny.get_config()
  config.diffusion.objective = 'edm'
  config.sample.sampler = 'heun'
  config.eval.metrics = ('classifier_fd',)
  config.model.unet.ch_mult = (1,)
  config.model.unet.attn_resolutions = ()
  config.model.unet.dropout = 0.0
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 0
  config.optim.lr_schedule = 'constant'
  validate_config(config, 'train', num_devices=1, num_processes=1)
  model = backbones.create_model(config.model, config.data.channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:1])
  state = train_state.create_train_state(config, mesh, jax.random.PRNGKey(0))
  step = train_state.make_train_step(model, tx, config, mesh)
  images, _ = pipeline.load_digits()
  x0 = images[:16].astype(np.float32) / 127.5 - 1.0
  batch = jax.device_put({'image': x0}, sharding.batch_sharding(mesh))
  fixed = jnp.tile(jnp.asarray(x0), (16, 1, 1, 1))
  ex = edm.training_example(config, fixed,
                            jax.random.normal(jax.random.PRNGKey(5), fixed.shape),
                            jax.random.PRNGKey(6))

  @jax.jit
  def eval_loss(params):
    out = model.apply({'params': params}, ex['x_t'], ex['t'], None, train=False)
    return jnp.mean(edm.per_example_loss(config, out, ex))

  before = float(eval_loss(jax.device_get(state.params)))
  np.testing.assert_allclose(before, float(jnp.mean(ex['weight'] * jnp.mean(
      ex['target']**2, axis=(1, 2, 3)))), rtol=1e-5)
  for _ in range(30):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics['loss']))
  after = float(eval_loss(jax.device_get(state.params)))
  assert after < 0.8 * before, (before, after)
