"""The feature rows KID and precision/recall read: a seeded uniform subset of the set (a
reservoir, metrics.KeptFeatures), not its first rows, so a class-sorted folder keeps every class.

The statistical checks use fixed seeds, so they give one answer on every run; their tolerances
are 5 standard deviations (or a chi-square p-value of 1e-3) of the uniform sampler, and a
first-rows sampler misses them by far.
"""

import itertools
import math

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from diffusion_jax.evaluation import feature_sets, metrics


def _kept_positions(num_rows, limit, seed, batch_sizes):
  """Positions the reservoir keeps of a stream of `num_rows` rows cut into `batch_sizes`."""
  kept = metrics.KeptFeatures(limit, seed)
  rows = np.arange(num_rows, dtype=np.float32)[:, None]
  start = 0
  for size in batch_sizes:
    kept.add(rows[start:start + size])
    start += size
  assert start == num_rows
  np.testing.assert_array_equal(kept.rows[:, 0], kept.positions)  # Rows in stream order.
  return tuple(kept.positions.tolist())


def _batch_sizes(num_rows, seed):
  """A seeded cut of num_rows into batches of 1..5 rows."""
  rng = np.random.default_rng(10_000 + seed)
  sizes = []
  while sum(sizes) < num_rows:
    sizes.append(int(min(rng.integers(1, 6), num_rows - sum(sizes))))
  return sizes


def test_every_subset_is_equally_likely():
  """N = 6, k = 3: each of the 20 subsets over 4000 seeds (batches cut differently per seed)
  ~ 200 times; chi-square against uniform. Positions' inclusion and pairs checked as well."""
  n, k, trials = 6, 3, 4000
  counts = dict.fromkeys(itertools.combinations(range(n), k), 0)
  for seed in range(trials):
    counts[_kept_positions(n, k, seed, _batch_sizes(n, seed))] += 1
  observed = np.array(list(counts.values()))
  assert observed.sum() == trials and len(observed) == math.comb(n, k)
  assert stats.chisquare(observed).pvalue > 1e-3
  # Each position kept with probability k / n = 1/2: std sqrt(T p (1 - p)) ~ 31.6.
  inclusion = np.zeros(n)
  for subset, c in counts.items():
    inclusion[list(subset)] += c
  assert np.all(np.abs(inclusion - trials * k / n) < 5 * math.sqrt(trials * 0.25))
  # A first-rows sampler keeps (0, 1, 2) every time.
  assert counts[(0, 1, 2)] < 2 * trials / len(counts)


def test_positions_and_pairs_are_kept_uniformly_from_a_longer_stream():
  n, k, trials = 40, 8, 3000
  inclusion = np.zeros(n)
  pairs = np.zeros((n, n))
  for seed in range(trials):
    kept = list(_kept_positions(n, k, seed, [7, 13, 1, 19]))
    inclusion[kept] += 1
    pairs[np.ix_(kept, kept)] += 1
  p = k / n
  assert np.all(np.abs(inclusion - trials * p) < 5 * math.sqrt(trials * p * (1 - p)))
  q = k * (k - 1) / (n * (n - 1))  # P(i and j both kept), i != j, of a uniform k-subset.
  off = pairs[~np.eye(n, dtype=bool)]
  assert np.all(np.abs(off - trials * q) < 5 * math.sqrt(trials * q * (1 - q)))
  # The late rows are kept as often as the early ones (a first-rows sampler: never).
  assert abs(inclusion[n // 2:].sum() - inclusion[:n // 2].sum()) < 5 * math.sqrt(
      trials * k / 2)


def test_the_kept_rows_depend_on_the_seed_not_on_the_batches():
  one = _kept_positions(100, 10, 7, [100])
  assert one == _kept_positions(100, 10, 7, [1] * 100)
  assert one == _kept_positions(100, 10, 7, [33, 33, 34])
  assert one != _kept_positions(100, 10, 8, [100])
  assert _kept_positions(5, 10, 3, [2, 3]) == (0, 1, 2, 3, 4)  # Fewer rows than the limit: all.
  empty = metrics.KeptFeatures(0, 0)
  empty.add(np.ones((4, 3)))
  assert empty.rows.shape == (0, 3)
  assert metrics.KeptFeatures(3).rows is None  # Nothing seen yet.
  with pytest.raises(ValueError, match='limit=-1'):
    metrics.KeptFeatures(-1)


def test_a_class_sorted_stream_keeps_every_class_in_proportion():
  """10 classes of 300 rows each, sorted by class, 64 rows a batch, 500 kept: the first 500 rows
  would be classes 0 and 1 only; the reservoir keeps ~50 of each (hypergeometric std ~6.1)."""
  num_classes, per_class, keep = 10, 300, 500
  labels = np.repeat(np.arange(num_classes), per_class)
  features = np.stack([labels, np.arange(len(labels))], 1).astype(np.float32)
  kept = metrics.KeptFeatures(keep, seed=0)
  for start in range(0, len(features), 64):
    kept.add(features[start:start + 64])
  counts = np.bincount(kept.rows[:, 0].astype(int), minlength=num_classes)
  total = num_classes * per_class
  std = math.sqrt(keep * 0.1 * 0.9 * (total - keep) / (total - 1))
  assert counts.sum() == keep
  assert np.all(np.abs(counts - keep / num_classes) < 5 * std), counts
  assert np.bincount(labels[:keep], minlength=num_classes)[2:].sum() == 0  # First rows: 2 classes.


def test_a_class_folder_keeps_every_class_and_records_the_seed(tmp_path):
  """root/<class>/ folders are read in path order; the kept rows still cover every class, and
  the method and seed survive a statistics file."""
  num_classes, per_class, keep = 4, 30, 40
  for c in range(num_classes):
    (tmp_path / f'class_{c}').mkdir()
    for i in range(per_class):
      image = np.full((4, 4, 3), 60 * c, np.uint8)
      image[0, 0, 1] = i
      Image.fromarray(image).save(tmp_path / f'class_{c}' / f'{i:03d}.png')

  def pixel_features(batch):
    return {'pool3': np.asarray(batch).reshape(len(batch), -1)[:, :6].astype(np.float64)}

  got = feature_sets.features_of_source(str(tmp_path), pixel_features, 8, keep, False,
                                        keep_seed=3)
  assert got.num_images == num_classes * per_class
  counts = np.bincount((got.features[:, 0] / 60).astype(int), minlength=num_classes)
  total = num_classes * per_class
  std = math.sqrt(keep * 0.25 * 0.75 * (total - keep) / (total - 1))
  assert counts.sum() == keep and np.all(np.abs(counts - keep / num_classes) < 5 * std), counts
  assert feature_sets.kept_info(got) == {'method': 'reservoir', 'seed': 3, 'rows': keep}
  feature_sets.save_feature_set(str(tmp_path / 'stats.npz'), got)
  again = feature_sets.load_stats_file(str(tmp_path / 'stats.npz'))
  assert feature_sets.kept_info(again) == feature_sets.kept_info(got)
  np.testing.assert_array_equal(again.features, got.features)
  other = feature_sets.features_of_source(str(tmp_path), pixel_features, 8, keep, False,
                                          keep_seed=4)
  assert not np.array_equal(other.features, got.features)
  np.testing.assert_allclose(other.mu, got.mu, rtol=1e-12)  # The moments see every image.
