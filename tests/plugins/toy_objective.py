"""A toy objective, registered by tests/test_objectives_backbones.py to show that a new
objective is one module: variance-exploding noise x = x0 + sigma eps, log sigma uniform on
[log sigma_min, log sigma_max], the network predicting eps; Euler on dx/dsigma = eps_hat."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.objectives import base
from diffusion_jax.sampling import guidance

NAME, SAMPLERS, LIKELIHOOD_METRICS = 'toy', ('euler',), ('ode_nll',)


def default_config():
  return ml_collections.ConfigDict({'sigma_min': 0.02, 'sigma_max': 20.0})


def _bcast(a, x):
  return a.reshape(a.shape + (1,) * (x.ndim - 1))


def _inputs(x, sigma):  # The network sees x / sqrt(1 + sigma^2) at time log(sigma).
  return x * jax.lax.rsqrt(1.0 + _bcast(sigma, x)**2), jnp.log(sigma)


def training_example(config, x0, noise, key):
  c = config.diffusion.toy
  u = jax.random.uniform(key, (x0.shape[0],))
  sigma = jnp.exp(math.log(c.sigma_min) + u * math.log(c.sigma_max / c.sigma_min))
  x_t, t = _inputs(x0 + _bcast(sigma, x0) * noise, sigma)
  return {'x_t': x_t, 't': t, 'noise': noise}


def per_example_loss(config, output, example):
  del config
  return base.weighted_mse(output, example['noise'], jnp.ones(output.shape[:1]))


def _sigmas(config):
  c = config.diffusion.toy
  return np.append(np.geomspace(c.sigma_max, c.sigma_min, config.sample.steps), 0.0)


def _eps(net, x, sigma):
  return net(*_inputs(x, jnp.full((x.shape[0],), sigma, jnp.float32)))[0]


def sample(apply_fn, config, noise, rng, *, labels=None, null_label=None, trajectory_every=0,
           trajectory_images=None):
  del rng, trajectory_every, trajectory_images
  net = guidance.make_network_fn(apply_fn, labels=labels, null_label=null_label,
                                 guidance_scale=config.sample.guidance_scale)
  sigmas = _sigmas(config)
  x = noise * float(sigmas[0])
  for s, s_next in zip(sigmas[:-1], sigmas[1:]):  # A few steps: a Python loop is fine.
    x = x + float(s_next - s) * _eps(net, x, float(s))
  return x


def sampling_steps(config):
  return int(config.sample.steps)


network_evaluations = sampling_steps


def probability_flow(apply_fn, config):
  c = config.diffusion.toy
  net = guidance.make_network_fn(apply_fn)
  drift = lambda s, x: jnp.exp(s) * _eps(net, x, jnp.exp(s))  # dx/d(log sigma).
  return base.ProbabilityFlow(drift, math.log(c.sigma_min), math.log(c.sigma_max), c.sigma_max)


def check_config(config):
  c, errors = config.diffusion.toy, []
  if not 0 < c.sigma_min < c.sigma_max:
    errors.append(f'diffusion.toy.sigma_min={c.sigma_min} and sigma_max={c.sigma_max} must '
                  'satisfy 0 < sigma_min < sigma_max.')
  if config.sample.sampler not in SAMPLERS or config.sample.steps < 1:
    errors.append(f'sample.sampler={config.sample.sampler!r} / sample.steps='
                  f'{config.sample.steps}: the toy objective samples with euler, steps >= 1.')
  return errors
