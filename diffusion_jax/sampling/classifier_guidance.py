"""Classifier guidance (Dhariwal & Nichol 2021): a noisy classifier's gradient g = s * grad_x
log p(y | x_t, t) steers a DDPM-family sampler towards class y.

Two forms, as guided-diffusion applies them:
  mean   (ancestral DDPM, their `condition_mean`): mu' = mu + Sigma_t g, Sigma_t the variance
         of the reverse step (Sohl-Dickstein et al. 2015);
  score  (DDIM and every other sampler, their `condition_score`): eps' = eps - sqrt(1 - abar_t) g
         and x0' = (x_t - sqrt(1 - abar_t) eps') / sqrt(abar_t) (Song et al. 2021), i.e. the
         score grad log p(x_t) + g.
The gradient is taken inside the compiled sampler loop (`jax.grad` of the summed selected
log-probabilities: each row depends only on its own x_t, so it is the per-example gradient and
stays sharded over the batch), at the timesteps the network sees (respaced indices mapped back
to training steps, as their `_WrappedModel` maps them).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import jax
import jax.numpy as jnp

# classifier_fn(x_t [B,H,W,C], timesteps [B]) -> logits [B, K].
ClassifierFn = Callable[[jax.Array, jax.Array], jax.Array]
FORMS = ('mean', 'score')
# The diffusion.ddpm fields that fix the noise schedule: classifier and model must agree.
SCHEDULE_FIELDS = ('num_timesteps', 'beta_schedule', 'beta_start', 'beta_end')


def log_prob_gradient(classifier_fn: ClassifierFn, x_t: jax.Array, timesteps: jax.Array,
                      labels: jax.Array) -> jax.Array:
  """grad_x log softmax(classifier_fn(x, timesteps))[labels] at x = x_t, float32 [B,H,W,C]."""
  labels = jnp.asarray(labels, jnp.int32)

  def selected_log_prob(x):
    log_probs = jax.nn.log_softmax(classifier_fn(x, timesteps).astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
  return jax.grad(selected_log_prob)(x_t.astype(jnp.float32))


def guide_score(x0: jax.Array, eps: jax.Array, gradient: jax.Array, a: jax.Array,
                s: jax.Array):
  """(x0', eps') of `condition_score` for x_t = a x0 + s eps and the scaled gradient g:
  eps' = eps - s g, x0' = x0 + (s^2 / a) g (the same shift of x_t's score, so a consistent
  (x0, eps) pair stays consistent)."""
  return x0 + (s * s / a) * gradient, eps - s * gradient


def check_classifier_run(sample_config, model_config, data_config, ddpm_config,
                         classifier_config, objective: str) -> List[str]:
  """Problems with guiding the model of (`model_config`, `data_config`, `ddpm_config`) by the
  classifier run whose config is `classifier_config` (None: the run has no config.json).
  Device-free; each message names the field and the fix."""
  where = f'sample.classifier_workdir={sample_config.classifier_workdir!r}'
  if objective != 'ddpm':
    return [f'sample.classifier_scale={sample_config.classifier_scale} needs a DDPM-family model '
            f"(diffusion.objective='ddpm'), not {objective!r}; set it to 0."]
  if classifier_config is None:
    return [f'{where} holds no run config (config.json): train a classifier there with '
            "diffusion.objective='noisy_classifier' or convert one with `python -m "
            'diffusion_jax.convert --from=openai_classifier`.']
  cmodel = classifier_config.model
  if cmodel.arch != 'classifier':
    return [f"{where} is a run of model.arch={cmodel.arch!r}, not a noisy classifier "
            "(model.arch='classifier')."]
  errors: List[str] = []
  cdata = classifier_config.data
  for field in ('resolution', 'channels'):
    if cdata[field] != data_config[field]:
      errors.append(f'{where}: the classifier reads data.{field}={cdata[field]}, the model '
                    f'makes data.{field}={data_config[field]}; use a classifier of the '
                    "model's images.")
  if model_config.num_classes > 0 and cmodel.num_classes != model_config.num_classes:
    errors.append(f'{where}: the classifier has model.num_classes={cmodel.num_classes}, the '
                  f'model model.num_classes={model_config.num_classes}; they must name the same '
                  'classes.')
  cddpm = classifier_config.diffusion.ddpm
  for field in SCHEDULE_FIELDS:
    if cddpm[field] != ddpm_config[field] and (
        field in ('num_timesteps', 'beta_schedule') or ddpm_config.beta_schedule != 'cosine'):
      errors.append(f'{where}: the classifier was trained on diffusion.ddpm.{field}='
                    f'{cddpm[field]!r}, the model on {ddpm_config[field]!r}; guidance needs '
                    'the same noise schedule.')
  return errors


def check_scale(sample_config) -> List[str]:
  """Problems with sample.classifier_scale / classifier_workdir alone (empty list = fine)."""
  scale = sample_config.classifier_scale
  if scale < 0:
    return [f'sample.classifier_scale={scale} must be >= 0 (0 = no classifier guidance).']
  if scale > 0 and not sample_config.classifier_workdir:
    return [f'sample.classifier_scale={scale} needs sample.classifier_workdir, the run of the '
            'noisy classifier.']
  return []


def guided_labels(labels: Optional[jax.Array], classifier_fn: Optional[ClassifierFn]) -> None:
  """Raises unless guidance has its target classes: labels [B] come with a classifier_fn."""
  if classifier_fn is not None and labels is None:
    raise ValueError('classifier guidance needs the target class of every sample: pass labels '
                     '[B] (sample.class_labels; the classifier\'s classes for an unconditional '
                     'model).')
