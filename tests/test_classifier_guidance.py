"""Classifier guidance against closed forms, and the checks that refuse a mismatched classifier.

Data: x0 | y ~ N(m_y, sigma0^2 I) for K classes with a uniform prior. Then x_t | y ~ N(a m_y, v I)
with v = a^2 sigma0^2 + s^2 (x_t = a x0 + s eps), so the Bayes classifier of x_t is linear-
Gaussian (logits_k = -|x_t - a m_k|^2 / 2v), grad log p(y | x_t) = (a / v)(m_y - sum_k p_k m_k),
and E[x0 | x_t, y] = m_y + (a sigma0^2 / v)(x_t - a m_y): guiding the exact unconditional
denoiser by the exact classifier with scale 1 in the score form must give the exact
class-conditional denoiser.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config import defaults, run_config
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.modes.validation import validate_config
from diffusion_jax.processes import discrete
from diffusion_jax.sampling import classifier_guidance, solvers

SIGMA0 = 0.5
MEANS = np.array([[1.0, -0.5, 0.25, 0.0], [-1.0, 0.5, 0.0, 0.75], [0.0, 0.0, -1.0, -0.5]])
SHAPE = (2, 2, 1)  # D = 4 values per image.


def _schedule(num_timesteps=50):
  return discrete.schedule_from_betas(discrete.beta_schedule('linear', num_timesteps, 1e-4, 0.2))


def _a_s(schedule, timesteps):
  a = jnp.asarray(schedule.sqrt_alphas_cumprod)[timesteps][:, None]
  s = jnp.asarray(schedule.sqrt_one_minus_alphas_cumprod)[timesteps][:, None]
  return a, s


def _bayes_logits(schedule):
  """The exact classifier of x_t as a network: (x_t [B,2,2,1], timesteps [B]) -> logits."""
  means = jnp.asarray(MEANS, jnp.float32)

  def logits(x, timesteps):
    a, s = _a_s(schedule, timesteps)
    v = a**2 * SIGMA0**2 + s**2
    flat = x.reshape(x.shape[0], -1)
    return -jnp.sum((flat[:, None, :] - a[:, :, None] * means[None]) ** 2, -1) / (2 * v)
  return logits


def _posterior_means(schedule, x, timesteps):
  """E[x0 | x_t, k] [B, K, D] and p(k | x_t) [B, K]."""
  a, s = _a_s(schedule, timesteps)
  v = a**2 * SIGMA0**2 + s**2
  flat = x.reshape(x.shape[0], -1)
  means = jnp.asarray(MEANS, jnp.float32)[None]
  cond = means + (a * SIGMA0**2 / v)[:, :, None] * (flat[:, None, :] - a[:, :, None] * means)
  return cond, jax.nn.softmax(_bayes_logits(schedule)(x, timesteps), -1)


def _exact_eps_model(schedule):
  """The optimal unconditional eps-prediction network of the mixture."""
  def apply_fn(x, timesteps, labels=None):
    del labels
    cond, probs = _posterior_means(schedule, x, timesteps)
    x0 = jnp.sum(probs[:, :, None] * cond, 1)
    a, s = _a_s(schedule, timesteps)
    return ((x.reshape(x.shape[0], -1) - a * x0) / s).reshape(x.shape)
  return apply_fn


def _points(seed=0, batch=6):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch,) + SHAPE) * 1.5


def test_gradient_equals_the_closed_form():
  sched = _schedule()
  x = _points()
  timesteps = jnp.array([0, 5, 10, 20, 35, 49])
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  got = classifier_guidance.log_prob_gradient(_bayes_logits(sched), x, timesteps, labels)
  a, s = _a_s(sched, timesteps)
  v = a**2 * SIGMA0**2 + s**2
  _, probs = _posterior_means(sched, x, timesteps)
  means = jnp.asarray(MEANS, jnp.float32)
  want = (a / v) * (means[labels] - probs @ means)
  np.testing.assert_allclose(np.asarray(got).reshape(6, -1), np.asarray(want), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('t', [3, 25, 49])
def test_score_form_turns_the_unconditional_denoiser_into_the_conditional_one(t):
  sched = _schedule()
  x = _points(1)
  labels = jnp.array([0, 1, 2, 2, 1, 0])
  guided = solvers.make_denoiser(_exact_eps_model(sched), sched, 'epsilon', thresholding='none',
                                 labels=labels, classifier_fn=_bayes_logits(sched),
                                 classifier_scale=1.0, classifier_form='score')
  unguided = solvers.make_denoiser(_exact_eps_model(sched), sched, 'epsilon',
                                   thresholding='none', labels=labels)
  pred, plain = guided(x, jnp.int32(t)), unguided(x, jnp.int32(t))
  cond, _ = _posterior_means(sched, x, jnp.full((6,), t))
  want = cond[jnp.arange(6), labels]
  np.testing.assert_allclose(np.asarray(pred.x0).reshape(6, -1), np.asarray(want), atol=2e-5)
  # Guidance moved the prediction (the test could fail by not guiding at all) ...
  assert float(jnp.max(jnp.abs(plain.x0.reshape(6, -1) - want))) > 1e-2
  # ... and x_t = a x0 + s eps still holds for the guided pair.
  a, s = _a_s(sched, jnp.full((6,), t))
  np.testing.assert_allclose(np.asarray(a * pred.x0.reshape(6, -1) + s * pred.eps.reshape(6, -1)),
                             np.asarray(x.reshape(6, -1)), atol=2e-5)


def test_classifier_guidance_adds_to_classifier_free_guidance():
  """With a null class, the classifier's score shift is added to the CFG-mixed prediction."""
  sched = _schedule()
  x = _points(4)
  labels = jnp.array([0, 1, 2, 2, 1, 0])
  exact = _exact_eps_model(sched)
  # A toy conditional network: the exact model, shifted by the label (null = 3: no shift).
  net = lambda x, t, y: exact(x, t) + 0.1 * jnp.where(y < 3, y + 1, 0)[:, None, None, None]
  common = dict(labels=labels, null_label=3, guidance_scale=2.5, thresholding='none')
  cfg = solvers.make_denoiser(net, sched, 'epsilon', **common)
  both = solvers.make_denoiser(net, sched, 'epsilon', classifier_fn=_bayes_logits(sched),
                               classifier_scale=0.7, **common)
  t = 20
  g = 0.7 * classifier_guidance.log_prob_gradient(_bayes_logits(sched), x, jnp.full((6,), t),
                                                  labels)
  a, s = _a_s(sched, jnp.full((6,), t))
  a, s = a[:, :, None, None], s[:, :, None, None]
  np.testing.assert_allclose(np.asarray(both(x, t).eps), np.asarray(cfg(x, t).eps - s * g),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(both(x, t).x0),
                             np.asarray(cfg(x, t).x0 + s * s / a * g), atol=1e-5)


@pytest.mark.parametrize('variance', ['fixed_small', 'fixed_large'])
def test_mean_form_shifts_the_ddpm_step_by_its_variance_times_the_gradient(variance):
  sched = _schedule(8)
  x_T = _points(2)
  labels = jnp.array([2, 1, 0, 0, 1, 2])
  scale = 3.0
  noise = jax.random.normal(jax.random.PRNGKey(3), (8,) + x_T.shape)

  def first_step(classifier_fn):
    denoise = solvers.make_denoiser(_exact_eps_model(sched), sched, 'epsilon',
                                    thresholding='none', labels=labels,
                                    classifier_fn=classifier_fn, classifier_scale=scale,
                                    classifier_form='mean')
    _, trajectory = solvers.ddpm_sample(denoise, sched, x_T, jax.random.PRNGKey(0),
                                        variance=variance, trajectory_every=1,
                                        variance_noise=noise)
    return trajectory.x_t[0]

  shift = first_step(_bayes_logits(sched)) - first_step(None)
  t = sched.num_timesteps - 1
  g = scale * classifier_guidance.log_prob_gradient(
      _bayes_logits(sched), x_T, jnp.full((6,), t), labels)
  post_var, betas = np.asarray(sched.posterior_variance), np.asarray(sched.betas)
  var = post_var[t] if variance == 'fixed_small' else betas[t]
  np.testing.assert_allclose(np.asarray(shift), var * np.asarray(g), rtol=1e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(shift))) > 1e-3


def _classifier_run(tmp_path, **changes):
  """A classifier run directory (config.json only: validation reads nothing else)."""
  config = defaults.get_config()
  config.model.arch = 'classifier'
  config.model.num_classes = 10
  config.data.update(dataset='digits', resolution=8, channels=1, random_flip=False)
  for name, value in changes.items():
    section, field = name.split('__')
    config[section][field] = value
  workdir = tmp_path / 'classifier'
  run_config.save_run_config(config, str(workdir))
  return str(workdir)


def _guided_config(workdir, **sample):
  from configs import digits  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.sample.update(dict(dict(classifier_scale=1.0, classifier_workdir=workdir,
                                 sampler='ddpm', steps=0, num_samples=8, batch_size=8),
                            **sample))
  return config


def test_a_matching_classifier_passes_validation(tmp_path):
  validate_config(_guided_config(_classifier_run(tmp_path)), mode='sample', num_devices=1)


@pytest.mark.parametrize('change, named', [
    (dict(data__resolution=16), 'data.resolution'),
    (dict(data__channels=3), 'data.channels'),
    (dict(diffusion__ddpm=None), 'diffusion.ddpm.num_timesteps'),
    (dict(model__arch='unet'), "model.arch='unet'"),
])
def test_a_mismatched_classifier_is_refused_by_name(tmp_path, change, named):
  if 'diffusion__ddpm' in change:
    change = {}
    workdir = _classifier_run(tmp_path)
    saved = run_config.load_run_config(workdir)
    saved.diffusion.ddpm.num_timesteps = 500
    run_config.save_run_config(saved, workdir)
  else:
    workdir = _classifier_run(tmp_path, **change)
  with pytest.raises(ConfigError, match=named.replace('.', r'\.').replace('(', r'\(')):
    validate_config(_guided_config(workdir), mode='sample', num_devices=1)


def test_class_count_and_labels_are_checked_against_the_classifier(tmp_path):
  from configs import digits_cond  # pylint: disable=g-import-not-at-top
  config = digits_cond.get_config()
  config.sample.update(classifier_scale=1.0, sampler='ddpm', steps=0, num_samples=8,
                       batch_size=8, classifier_workdir=_classifier_run(
                           tmp_path, model__num_classes=5))
  with pytest.raises(ConfigError, match='model.num_classes=5'):
    validate_config(config, mode='sample', num_devices=1)
  # An unconditional model's labels name the classifier's classes: 12 is not one of 10.
  unconditional = _guided_config(_classifier_run(tmp_path / 'b'), class_labels='3,12')
  with pytest.raises(ConfigError, match='12'):
    validate_config(unconditional, mode='sample', num_devices=1)


def test_guidance_settings_are_refused_where_they_cannot_apply(tmp_path):
  with pytest.raises(ConfigError, match='sample.classifier_workdir'):
    validate_config(_guided_config(''), mode='sample', num_devices=1)
  with pytest.raises(ConfigError, match='classifier_scale=-1'):
    validate_config(_guided_config(_classifier_run(tmp_path), classifier_scale=-1.0),
                    mode='sample', num_devices=1)
  with pytest.raises(ConfigError, match='not --mode=train'):
    validate_config(_guided_config(_classifier_run(tmp_path / 'c')), mode='train',
                    num_devices=1)
  with pytest.raises(ConfigError, match='holds no run config'):
    validate_config(_guided_config(str(tmp_path / 'nothing')), mode='sample', num_devices=1)


# ---------------------------------------------------------------- the compiled, sharded program


def _tiny_classifier_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.arch = 'classifier'
  config.model.num_classes = 10
  config.model.classifier.update(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                                 num_head_channels=8, num_groups=8)
  return config


def _random_run(config, workdir):
  import test_sampling_cli as tsc  # pylint: disable=g-import-not-at-top
  tsc._save_random_checkpoint(config, workdir)  # pylint: disable=protected-access
  run_config.save_run_config(config, workdir)
  return workdir


def test_guided_program_is_sharded_over_the_batch_and_equals_the_unsharded_one(tmp_path):
  """--mode=sample's program on 8 devices (classifier gradient inside the loop) gives the
  unsharded guided sampler's images for an unconditional model, labelled with the classifier's
  classes; guidance changes them."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffusion_jax.modes import sample as sample_mode  # pylint: disable=g-import-not-at-top
  from diffusion_jax.nn import backbones  # pylint: disable=g-import-not-at-top
  from diffusion_jax.objectives import ddpm  # pylint: disable=g-import-not-at-top
  from diffusion_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import restore  # pylint: disable=g-import-not-at-top
  classifier_dir = _random_run(_tiny_classifier_config(), str(tmp_path / 'classifier'))
  config = tiny.get_config()
  workdir = _random_run(config, str(tmp_path / 'model'))
  config.sample.update(sampler='ddim', steps=4, num_samples=16, batch_size=16, seed=3,
                       classifier_scale=1000.0, classifier_workdir=classifier_dir,
                       class_labels='1,7')
  out_dir = sample_mode.generate(config, workdir)
  assert '_cg1000_' in out_dir.name
  with np.load(out_dir / 'samples.npz') as saved:
    images, labels = saved['arr_0'], saved['arr_1']
  np.testing.assert_array_equal(labels, np.resize([1, 7], 16))

  mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
  classifier = restore.restore_guidance_classifier(config, mesh)
  params, _ = restore.restore_params(config, workdir, mesh, use_ema=True)
  model = backbones.create_model(config.model, 1)
  noise_key, sampler_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), 0))
  noise = jax.random.normal(noise_key, (16, 8, 8, 1))
  apply_fn = lambda x, t, y: model.apply({'params': params}, x, t, y)

  def reference(scale):
    config.sample.classifier_scale = scale
    logits = lambda x, t: classifier.model.apply({'params': classifier.params}, x, t)
    x = jax.jit(lambda n: ddpm.sample(apply_fn, config, n, sampler_key, labels=jnp.asarray(
        labels), classifier_fn=logits if scale else None))(noise)
    return np.asarray(jnp.clip(x, -1, 1))

  guided, unguided = reference(1000.0), reference(0.0)
  as_float = images.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(as_float, guided, atol=1.5 / 127.5)
  assert np.abs(guided - unguided).max() > 0.1
