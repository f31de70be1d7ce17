"""The one place the network is called during sampling, with classifier-free guidance: the
conditional and unconditional outputs of one interleaved batch, mixed by the guidance scale."""

from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp

from diffusion_jax.processes import discrete
from diffusion_jax.sampling import class_labels

def _takes_labels(apply_fn: Callable[..., Any]) -> Optional[bool]:
  """Whether `apply_fn` has a third positional parameter (labels); None if it cannot be told."""
  try:
    params = inspect.signature(apply_fn).parameters.values()
  except (TypeError, ValueError):
    return None
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return True
  return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


def static_float(value) -> Optional[float]:
  """`value` as a Python float when it is known at trace time, else None."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
  """[B, ...] and [B, ...] -> [2B, ...] with rows a0, b0, a1, b1, ..."""
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def _deinterleave(ab: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Inverse of `_interleave`: [2B, ...] -> ([B, ...], [B, ...])."""
  pairs = ab.reshape((ab.shape[0] // 2, 2) + ab.shape[1:])
  return pairs[:, 0], pairs[:, 1]


def make_network_fn(apply_fn: Callable[..., jax.Array], *, labels: Optional[jax.Array] = None,
                    null_label: Optional[int] = None, guidance_scale: float = 1.0,
                    learn_sigma: bool = False, takes_labels: Optional[bool] = None
                    ) -> Callable[[jax.Array, jax.Array], Tuple[jax.Array, Optional[jax.Array]]]:
  """`net(x_t, timesteps [B]) -> (prediction, v or None)`: the one place the network is called.

  apply_fn(x_t, timesteps, labels) (or apply_fn(x_t, timesteps) for models without labels;
  `takes_labels`, default inspected from the signature). Classifier-free guidance with labels
  and guidance_scale s: out = out_u + s (out_c - out_u), out_c with `labels` and out_u with
  `null_label`, evaluated as one doubled batch; the variance channels v of a learn_sigma output
  come from the conditional half. s = 1 and s = 0 call the conditional / unconditional model
  alone, so they are exactly those models.
  """
  if takes_labels is None:
    takes_labels = _takes_labels(apply_fn)
    if takes_labels is None:
      takes_labels = labels is not None
  if labels is not None and not takes_labels:
    raise ValueError('labels were given but apply_fn takes only (x_t, timesteps); '
                     'pass apply_fn(x_t, timesteps, labels) for a class-conditional model.')
  scale = static_float(guidance_scale)
  if labels is None and scale != 1.0:
    raise ValueError(f'sample.guidance_scale={guidance_scale} needs class labels (a model with '
                     'model.num_classes > 0); use 1.0 for unconditional models.')
  if labels is not None and scale != 1.0 and null_label is None:
    raise ValueError('classifier-free guidance (sample.guidance_scale != 1) needs null_label, '
                     'the id of the unconditional class (model.num_classes).')

  def call(x, timesteps, y):
    out = apply_fn(x, timesteps, y) if takes_labels else apply_fn(x, timesteps)
    return discrete.split_learned_sigma(out.astype(jnp.float32), learn_sigma)

  def net(x_t, timesteps):
    if labels is None or scale == 1.0:
      return call(x_t, timesteps, labels)
    null = jnp.full_like(labels, null_label)
    if scale == 0.0:
      return call(x_t, timesteps, null)
    # Rows interleaved (c0, u0, c1, u1, ...), not concatenated: row pair i stays on the device
    # that holds row i of the batch-sharded x_t, so guidance adds no collectives.
    pred, v = call(_interleave(x_t, x_t), _interleave(timesteps, timesteps),
                   _interleave(labels, null))
    pred_c, pred_u = _deinterleave(pred)
    guided = pred_u + guidance_scale * (pred_c - pred_u)
    return guided, (None if v is None else _deinterleave(v)[0])
  return net


def check_guidance_and_labels(sample_config, model_config) -> List[str]:
  """Problems with sample.guidance_scale and sample.class_labels for `model_config`, shared by
  every objective's sampler checks (empty list = fine)."""
  errors: List[str] = []
  guidance = sample_config.guidance_scale
  if guidance < 0:
    errors.append(f'sample.guidance_scale={guidance} must be >= 0 (0 = the unconditional '
                  'model, 1 = the conditional one, > 1 = classifier-free guidance).')
  elif guidance != 1.0 and model_config.num_classes <= 0:
    errors.append(f'sample.guidance_scale={guidance} needs a class-conditional model '
                  '(model.num_classes > 0, trained with training.cond_drop_prob > 0); use 1.0.')
  elif guidance != 1.0 and not model_config.null_class:
    errors.append(f'sample.guidance_scale={guidance} needs the null-class embedding, which this '
                  'model has not (model.null_class=False, e.g. an imported guided-diffusion '
                  'model); use 1.0.')
  if model_config.num_classes == 0 and sample_config.classifier_scale > 0:
    return errors  # The labels name the guiding classifier's classes (checked with its run).
  try:
    class_labels.parse_class_labels(sample_config.class_labels, model_config.num_classes)
  except ValueError as e:
    errors.append(str(e))
  return errors
