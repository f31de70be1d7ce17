"""`classifier_fd`: a Fréchet distance for 8x8 digits, where Inception features mean nothing.

A small MLP classifier is trained once (a few seconds, full-batch Adam) on the dataset itself
(scikit-learn's digits, every image) and cached as a file; the Fréchet distance is taken between
the 64-d penultimate features of generated and real images (the same formula as FID,
metrics.frechet_distance). For class-conditional models the classifier's label agreement (the
fraction of samples it assigns the class they were drawn for) is reported beside it.

Figures are only comparable for the same classifier: its file's sha256 is reported with them.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from diffusion_jax.evaluation import feature_sets, metrics
from diffusion_jax.interop import torch_pickle

PyTree = Any
HIDDEN = (256, 64)
NUM_CLASSES = 10
TRAIN_STEPS = 400
LEARNING_RATE = 3e-3
SEED = 0
SUPPORTED_DATASETS = ('digits',)


class DigitsClassifier(nn.Module):
  """uint8-range [N, 8, 8, 1] -> (features [N, 64], logits [N, 10])."""

  @nn.compact
  def __call__(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
    x = images.reshape((images.shape[0], -1)).astype(jnp.float32) / 127.5 - 1.0
    for width in HIDDEN:
      x = nn.gelu(nn.Dense(width)(x))
    return x, nn.Dense(NUM_CLASSES)(x)


def train_classifier(images: np.ndarray, labels: np.ndarray) -> Tuple[PyTree, float]:
  """Full-batch Adam for TRAIN_STEPS on (images uint8 [N, 8, 8, 1], labels [N]).

  Returns (params, training accuracy). Deterministic for a given input. The steps run as a
  Python loop over one compiled step rather than one `lax.scan`: on XLA:CPU a weight gradient
  inside a while loop is many times slower (benchmarks/RESULTS.md). With init and apply jitted
  too, the classifier takes ~2.5 s instead of ~6 s (compiles included), with the same
  parameters (tests/test_fid.py); every fresh run of the digits demos pays it before its first
  eval.
  """
  model = DigitsClassifier()
  x, y = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
  # Jitted, like the step below: run op by op, init would compile each op separately.
  params = jax.jit(model.init)(jax.random.PRNGKey(SEED), x[:1])['params']
  tx = optax.adam(LEARNING_RATE)

  def loss_fn(p):
    _, logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, opt):
    updates, opt = tx.update(jax.grad(loss_fn)(p), opt, p)
    return optax.apply_updates(p, updates), opt

  opt_state = jax.jit(tx.init)(params)
  for _ in range(TRAIN_STEPS):
    params, opt_state = step(params, opt_state)
  _, logits = features_and_logits(params, images)
  return params, float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def _save_params(path: epath.Path, params: PyTree) -> None:
  feature_sets.save_npz_atomically(str(path), {
      '/'.join(k.key for k in kp): np.asarray(v)
      for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]})


def _load_params(path: epath.Path) -> PyTree:
  abstract = jax.eval_shape(lambda: DigitsClassifier().init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))['params']
  with path.open('rb') as f:
    with np.load(f) as data:
      flat = dict(data)
  leaves = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    key = '/'.join(k.key for k in kp)
    if key not in flat or flat[key].shape != leaf.shape:
      raise ValueError(f'{path} is not a classifier of this version ({key} missing or of '
                       'another shape); delete it and it is trained again.')
    leaves.append(jnp.asarray(flat[key]))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def load_or_train(cache_path: str, images: np.ndarray, labels: np.ndarray
                  ) -> Tuple[PyTree, str]:
  """(params, sha256 of the cached file): read `cache_path`, or train and write it first."""
  path = epath.Path(cache_path)
  if not path.exists():
    params, _ = train_classifier(images, labels)
    _save_params(path, params)
  return _load_params(path), torch_pickle.sha256(str(path))


def features_and_logits(params: PyTree, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  feats, logits = jax.jit(DigitsClassifier().apply)({'params': params}, jnp.asarray(images))
  return np.asarray(feats, np.float64), np.asarray(logits)


class Scorer:
  """classifier_fd against the whole dataset, with the classifier and the real images' features
  computed once (training scores many sample sets with one Scorer).

  `cache_path` holds the classifier (trained and written there first if absent).
  """

  def __init__(self, cache_path: str, dataset: str = 'digits'):
    if dataset not in SUPPORTED_DATASETS:
      raise ValueError(f"classifier_fd is defined for {SUPPORTED_DATASETS}, not {dataset!r}; "
                       "use 'fid' for natural images.")
    from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    real, real_labels = pipeline.load_digits()
    self.image_shape = real.shape[1:]
    self.params, self.checksum = load_or_train(cache_path, real, real_labels)
    real_feats, real_logits = features_and_logits(self.params, real)
    self.mu, self.sigma = real_feats.mean(0), np.cov(real_feats, rowvar=False)
    self.num_reference = int(len(real))
    self.accuracy = float(np.mean(np.argmax(real_logits, -1) == real_labels))

  def __call__(self, samples: np.ndarray, labels: Optional[np.ndarray]) -> Dict[str, Any]:
    """{'classifier_fd', 'num_samples', 'num_reference', 'classifier_sha256',
    'classifier_accuracy' (on the real images)} plus 'label_agreement' when `labels` [N] (the
    classes the samples were drawn for) are given."""
    samples = np.asarray(samples)
    if samples.shape[1:] != self.image_shape:
      raise ValueError(f'classifier_fd needs samples of shape [N, 8, 8, 1], got {samples.shape}.')
    fake_feats, fake_logits = features_and_logits(self.params, samples)
    out: Dict[str, Any] = {
        'classifier_fd': metrics.frechet_distance(
            self.mu, self.sigma, fake_feats.mean(0), np.cov(fake_feats, rowvar=False)),
        'num_samples': int(len(samples)), 'num_reference': self.num_reference,
        'classifier_sha256': self.checksum, 'classifier_accuracy': self.accuracy}
    if labels is not None:
      out['label_agreement'] = float(np.mean(np.argmax(fake_logits, -1) == np.asarray(labels)))
    return out
