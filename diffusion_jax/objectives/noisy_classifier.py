"""The 'noisy_classifier' objective: the noisy classifier p(y | x_t, t) of classifier guidance
(Dhariwal & Nichol 2021, guided-diffusion's scripts/classifier_train.py), trained on the DDPM
schedule of `config.diffusion.ddpm`, with the fields of `config.diffusion.noisy_classifier`.

Training: t ~ U{0..T-1} and x_t = q_sample(x0, t, eps) exactly as the 'ddpm' objective draws
them (its `training_example`: the same schedule, the same draws), then the softmax
cross-entropy of the logits of `model.arch='classifier'` (nn/classifier.py) against the batch's
true labels (`example['label']`, which the train step adds for labelled data). The classifier
must see the noise levels of the diffusion model it will guide, so its schedule is the one of
`diffusion.ddpm`: train it with the diffusion run's `diffusion.ddpm` section.
`noisy_classifier.noised=False` trains on the clean x0 at t = 0 instead (their --noised=False).

The train step logs, through `step_metrics`, the top-1 accuracy over the batch and the loss and
accuracy per quarter of t (`acc_q0..acc_q3`, `loss_q0..loss_q3`, quarter = floor(4 t / T), as
guided-diffusion's log_loss_dict), averaged over the examples that fell in each quarter.

It draws no samples and has no likelihood (SAMPLERS = LIKELIHOOD_METRICS = ()): a trained run is
read by the guided samplers through `sample.classifier_workdir` of a diffusion run.

The module implements the protocol of objectives/base.py.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.objectives import ddpm

NAME = 'noisy_classifier'
SAMPLERS: Tuple[str, ...] = ()
LIKELIHOOD_METRICS: Tuple[str, ...] = ()
# The model.arch values this objective trains, and which no other objective may train
# (objectives.check_config): the classifier's output is logits, not an image.
ARCHS: Tuple[str, ...] = ('classifier',)
# What a run of this objective is for, in the message that refuses --mode=sample / eval / export.
USE_INSTEAD = ("use this run's workdir as sample.classifier_workdir (with sample."
               'classifier_scale > 0) of a diffusion run trained on the same diffusion.ddpm '
               'schedule: classifier guidance')
NUM_QUARTERS = 4  # The t ranges of the logged metrics (guided-diffusion's quartiles).


# ---------------------------------------------------------------- training


def training_example(config, x0: jax.Array, noise: jax.Array,
                     key: jax.Array) -> Dict[str, jax.Array]:
  """'x_t' and 't' [B] of a batch x0 [B,H,W,C]: the 'ddpm' objective's uniform t and q_sample
  on `diffusion.ddpm`'s schedule, or x0 at t = 0 with noisy_classifier.noised=False."""
  if not config.diffusion.noisy_classifier.noised:
    return {'x_t': x0.astype(jnp.float32), 't': jnp.zeros((x0.shape[0],), jnp.int32)}
  example = ddpm.training_example(config, x0, noise, key)
  return {'x_t': example['x_t'], 't': example['t']}


def _labels(example: Dict[str, jax.Array]) -> jax.Array:
  if 'label' not in example:
    raise ValueError("diffusion.objective='noisy_classifier' needs the batch's labels "
                     "(example['label']): train on labelled data (data.dataset='digits', or "
                     'data.label_key) with model.num_classes set to its class count.')
  return example['label'].astype(jnp.int32)


def per_example_loss(config, output: jax.Array, example: Dict[str, jax.Array]) -> jax.Array:
  """Softmax cross-entropy [B] (nats, float32) of the logits `output` [B, K] against the true
  labels example['label'] [B]."""
  del config
  return optax.softmax_cross_entropy_with_integer_labels(output.astype(jnp.float32),
                                                         _labels(example))


def t_quarter(config, t: jax.Array) -> jax.Array:
  """The quarter [B] (0..3) of the training steps t [B] holds: floor(4 t / T), T =
  diffusion.ddpm.num_timesteps (guided-diffusion's `int(4 * t / num_timesteps)`)."""
  num_timesteps = int(config.diffusion.ddpm.num_timesteps)
  return jnp.clip((jnp.asarray(t, jnp.int32) * NUM_QUARTERS) // num_timesteps, 0,
                  NUM_QUARTERS - 1)


def step_metrics(config, output: jax.Array, example: Dict[str, jax.Array]
                 ) -> Dict[str, Tuple[jax.Array, jax.Array]]:
  """The train step's extra metrics, each as (sum over the examples, count of examples):
  'accuracy' (top-1, all of the batch), and per quarter q of t (`t_quarter`) 'acc_q<q>' and
  'loss_q<q>' (cross-entropy) over the examples whose t is in quarter q.

  Sums and counts, not means: the train step adds them over micro-batches and devices and the
  log window over steps, so each logged value is the mean over every example it saw, and a
  quarter that no example of a batch fell in (count 0) weighs nothing instead of averaging a
  0/0 in.
  """
  labels = _labels(example)
  loss = per_example_loss(config, output, example)
  correct = (jnp.argmax(output, axis=-1) == labels).astype(jnp.float32)
  quarter = t_quarter(config, example['t'])
  batch = jnp.asarray(labels.shape[0], jnp.float32)
  metrics = {'accuracy': (jnp.sum(correct), batch)}
  for q in range(NUM_QUARTERS):
    in_q = (quarter == q).astype(jnp.float32)
    count = jnp.sum(in_q)
    metrics[f'acc_q{q}'] = (jnp.sum(correct * in_q), count)
    metrics[f'loss_q{q}'] = (jnp.sum(loss * in_q), count)
  return metrics


# ---------------------------------------------------------------- sampling and likelihood


def _no_sampling(what: str):
  raise ValueError(f"diffusion.objective='noisy_classifier' trains a classifier, which has no "
                   f'{what}; {USE_INSTEAD}.')


def sample(apply_fn, config, noise, rng, **kwargs):
  """Not available: a classifier draws no samples (see USE_INSTEAD)."""
  del apply_fn, config, noise, rng, kwargs
  _no_sampling('sampler')


def sampling_steps(config) -> int:
  """Not available: a classifier draws no samples."""
  del config
  _no_sampling('sampler')


def network_evaluations(config) -> int:
  """Not available: a classifier draws no samples."""
  del config
  _no_sampling('sampler')


def probability_flow(apply_fn, config):
  """Not available: a classifier has no likelihood ODE."""
  del apply_fn, config
  _no_sampling('likelihood')


# ---------------------------------------------------------------- config


def check_config(config) -> List[str]:
  """Problems with a noisy-classifier run (empty list = fine), each naming the field and the
  fix: the `diffusion.ddpm` schedule it trains on (ddpm.check_config's diffusion.ddpm.* errors;
  its sample.* ones concern the sampling of a diffusion run, which this run has not), the
  backbone (objectives.check_config checks model.arch against ARCHS), label dropout,
  learn_sigma and the in-training eval, which scores samples."""
  errors: List[str] = [e for e in ddpm.check_config(config) if e.startswith('diffusion.ddpm.')]
  section = config.diffusion.noisy_classifier
  if not isinstance(section.get('noised', None), bool):
    errors.append(f'diffusion.noisy_classifier.noised={section.get("noised", None)!r} must be '
                  'True (train on x_t at random t) or False (on clean x0 at t = 0).')
  tcfg = config.training
  if tcfg.cond_drop_prob > 0:
    errors.append(f'training.cond_drop_prob={tcfg.cond_drop_prob}: a noisy classifier predicts '
                  'the label, it is not conditioned on it (there is no null class to drop to); '
                  'set training.cond_drop_prob=0.')
  if config.model.learn_sigma and config.model.arch not in ARCHS:
    # (model.arch='classifier' refuses learn_sigma itself: nn/classifier.check_config.)
    errors.append('model.learn_sigma=True: diffusion.objective=\'noisy_classifier\' trains '
                  'logits, not a variance; set model.learn_sigma=False.')
  if tcfg.eval_every_steps > 0:
    errors.append(f'training.eval_every_steps={tcfg.eval_every_steps}: the in-training eval '
                  "scores samples, which diffusion.objective='noisy_classifier' does not draw "
                  '(its accuracy per t quarter is logged every training.log_every_steps); set '
                  'training.eval_every_steps=0.')
  return errors
