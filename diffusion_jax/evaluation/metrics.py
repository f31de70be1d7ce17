"""Sample-quality figures from feature vectors: FID, KID, improved precision/recall, IS.

All host-side numpy in float64; features come from inception.py (or the small classifier of
classifier_fd.py). The formulas are those of the reference implementations:

* FID (Heusel et al. 2017): ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}) with
  scipy's sqrtm; where the product is singular (non-finite root) both covariances get
  eps * I added, and a complex root's imaginary part is dropped after checking it is ~0.
* KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel k(x, y) = (x.y/d + 1)^3,
  averaged over random subsets of `subset_size` from each set.
* Improved precision / recall (Kynkaanniemi et al. 2019): each real feature gets the radius of
  its k-th nearest real neighbour; precision is the fraction of generated features inside some
  real ball, recall the fraction of real features inside some generated ball (roles swapped).
* IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) per split, mean and std over 10 splits,
  with p(y|x) the softmax over all 1008 logits of the TF graph, class 0 (unused) included, as the
  original TF code computes it.

`FeatureStats` streams mean and covariance over batches (Chan et al.'s pairwise update), so
FID never holds all features in memory; `KeptFeatures` keeps a seeded uniform subset of the
rows (a reservoir) for KID and precision/recall.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np
import scipy.linalg


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Running count, mean [D] and centred sum of outer products [D, D], float64."""
  count: int
  mean: np.ndarray
  m2: np.ndarray


def empty_stats(dim: int) -> FeatureStats:
  return FeatureStats(0, np.zeros((dim,), np.float64), np.zeros((dim, dim), np.float64))


def update_stats(stats: FeatureStats, features: np.ndarray) -> FeatureStats:
  """Adds a batch [B, D] of features (pairwise merge of means and centred moments)."""
  x = np.asarray(features, np.float64)
  n_b = x.shape[0]
  if n_b == 0:
    return stats
  mean_b = x.mean(axis=0)
  centred = x - mean_b
  m2_b = centred.T @ centred
  n = stats.count + n_b
  delta = mean_b - stats.mean
  mean = stats.mean + delta * (n_b / n)
  m2 = stats.m2 + m2_b + np.outer(delta, delta) * (stats.count * n_b / n)
  return FeatureStats(n, mean, m2)


def mean_and_covariance(stats: FeatureStats) -> Tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) with the unbiased (N - 1) covariance, as np.cov."""
  if stats.count < 2:
    raise ValueError(f'FID needs at least 2 feature vectors, got {stats.count}.')
  return stats.mean, stats.m2 / (stats.count - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Fréchet distance of two Gaussians N(mu1, sigma1), N(mu2, sigma2) (FID's formula)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'The two statistics differ in dimension: mu {mu1.shape} vs {mu2.shape}, '
                     f'sigma {sigma1.shape} vs {sigma2.shape} (features of different networks?).')
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError('The matrix square root in FID has a large imaginary part '
                       f'({np.max(np.abs(covmean.imag)):.3g}): the statistics are degenerate '
                       '(too few samples for the feature dimension?).')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray,
                              num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> Tuple[float, float]:
  """(mean, std) over subsets of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3.

  Each subset draws m = min(subset_size, N1, N2) rows of each set without replacement.
  """
  x_all, y_all = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  d = x_all.shape[1]
  m = min(subset_size, len(x_all), len(y_all))
  if m < 2:
    raise ValueError(f'KID needs at least 2 features per set, got {len(x_all)} and {len(y_all)}.')
  rng = np.random.default_rng(seed)
  values = np.empty((num_subsets,), np.float64)
  for i in range(num_subsets):
    x = x_all[rng.choice(len(x_all), m, replace=False)]
    y = y_all[rng.choice(len(y_all), m, replace=False)]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    values[i] = within - 2.0 * k_xy.mean()
  return float(values.mean()), float(values.std())


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(sq, 0.0)


def knn_radii(features: np.ndarray, k: int = 3, block: int = 1024) -> np.ndarray:
  """Squared distance of each row to its k-th nearest other row [N]."""
  x = np.asarray(features, np.float64)
  if len(x) <= k:
    raise ValueError(f'Precision/recall with k={k} needs more than {k} features, got {len(x)}.')
  radii = np.empty((len(x),), np.float64)
  for start in range(0, len(x), block):
    d = _squared_distances(x[start:start + block], x)
    radii[start:start + block] = np.partition(d, k, axis=1)[:, k]  # Index 0 is the row itself.
  return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray,
              block: int = 1024) -> float:
  """Fraction of `points` within the radius of at least one centre."""
  inside = 0
  for start in range(0, len(points), block):
    d = _squared_distances(points[start:start + block], centres)
    inside += int(np.any(d <= radii[None, :], axis=1).sum())
  return inside / len(points)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> Tuple[float, float]:
  """Improved precision and recall of `fake` features against `real` ones (k-NN balls)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  precision = _coverage(fake, real, knn_radii(real, k))
  recall = _coverage(real, fake, knn_radii(fake, k))
  return precision, recall


def inception_score(logits: np.ndarray, num_splits: int = 10) -> Tuple[float, float]:
  """(mean, std) over `num_splits` equal splits of exp(mean_x KL(p(y|x) || p(y)))."""
  logits = np.asarray(logits, np.float64)
  if len(logits) < num_splits:
    raise ValueError(f'IS with {num_splits} splits needs at least {num_splits} samples, got '
                     f'{len(logits)}.')
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(log_p, num_splits):
    p = np.exp(part)
    log_marginal = np.log(p.mean(axis=0))
    kl = (p * (part - log_marginal[None, :])).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


# The figures computed from feature rows (KeptFeatures) rather than from the streamed moments.
ROW_METRICS = ('kid', 'precision_recall')


class KeptFeatures:
  """A seeded uniform random subset of at most `limit` rows of a stream of feature batches,
  for KID and precision/recall, which need rows (FID only needs the streamed moments).

  Bottom-k sampling, a reservoir sample: every row gets an independent U[0, 1) key, drawn in
  stream order from PCG64 seeded with `seed`, and the `limit` rows with the smallest keys are
  kept. The kept set is a uniform random subset of min(limit, N) of the N rows whatever their
  order (a class-sorted folder keeps every class in proportion, where the first `limit` rows
  would keep the first classes only) and whatever the batch sizes (the same seed and stream
  give the same rows). Memory: the kept rows and one batch; a full reservoir replaces rows in
  place. Explicit, mutable state: `add` each batch, then read `rows`.
  """
  METHOD = 'reservoir'

  def __init__(self, limit: int, seed: int = 0):
    if limit < 0:
      raise ValueError(f'KeptFeatures: limit={limit} must be >= 0 (0 keeps no rows).')
    self.limit, self.seed = int(limit), int(seed)
    self.num_seen = 0
    self._rng = np.random.default_rng(self.seed)
    self._rows: Optional[np.ndarray] = None  # [capacity, D] float32; the first `_count` used.
    self._keys = np.empty((0,), np.float64)
    self._positions = np.empty((0,), np.int64)
    self._count = 0

  def add(self, features: np.ndarray) -> None:
    """Offers the rows of `features` [B, D] (their stream positions follow the earlier ones)."""
    x = np.asarray(features, np.float32)
    keys = self._rng.random(len(x))  # Drawn for every row, so the stream decides the keys.
    positions = self.num_seen + np.arange(len(x), dtype=np.int64)
    self.num_seen += len(x)
    if self._rows is None:
      self._rows = np.empty((0,) + x.shape[1:], np.float32)
    if self.limit == 0 or not len(x):
      return
    free = self.limit - self._count
    if free > 0:  # Filling: take rows while there is room.
      take = min(free, len(x))
      self._grow(self._count + take)
      end = self._count + take
      self._rows[self._count:end] = x[:take]
      self._keys[self._count:end] = keys[:take]
      self._positions[self._count:end] = positions[:take]
      self._count = end
      x, keys, positions = x[take:], keys[take:], positions[take:]
    entering = keys < self._keys.max() if len(x) else np.zeros((0,), bool)
    if not entering.any():
      return
    x, keys, positions = x[entering], keys[entering], positions[entering]
    combined = np.concatenate([self._keys, keys])
    kept = np.argpartition(combined, self.limit - 1)[:self.limit]
    new = kept[kept >= self.limit] - self.limit
    stays = np.zeros((self.limit,), bool)
    stays[kept[kept < self.limit]] = True
    slots = np.flatnonzero(~stays)  # As many evicted slots as new rows enter.
    self._rows[slots], self._keys[slots] = x[new], keys[new]
    self._positions[slots] = positions[new]

  def _grow(self, size: int) -> None:
    """Capacity for `size` rows (doubling, at most `limit`), keeping the rows held."""
    if size <= len(self._keys):
      return
    capacity = min(self.limit, max(size, 2 * len(self._keys)))
    rows = np.empty((capacity,) + self._rows.shape[1:], np.float32)
    rows[:self._count] = self._rows[:self._count]
    self._rows = rows
    self._keys = np.concatenate([self._keys[:self._count],
                                 np.empty((capacity - self._count,), np.float64)])
    self._positions = np.concatenate([self._positions[:self._count],
                                      np.empty((capacity - self._count,), np.int64)])

  @property
  def positions(self) -> np.ndarray:
    """Stream positions [K] of the kept rows, ascending."""
    return np.sort(self._positions[:self._count])

  @property
  def rows(self) -> Optional[np.ndarray]:
    """The kept rows [min(limit, N), D] float32 in stream order; None before any batch."""
    if self._rows is None:
      return None
    order = np.argsort(self._positions[:self._count], kind='stable')
    return self._rows[:self._count][order]
