"""The first hour: train_metrics.jsonl and loss_curve.png of a tiny run and its resume, and the
progress bar's text and when it is shown (never without an interactive terminal)."""

import glob
import io
import json
import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import test_checkpoints as tc  # pylint: disable=g-import-not-at-top,g-bad-import-order
from diffusion_jax import images  # pylint: disable=g-import-not-at-top
from diffusion_jax.modes import train as train_mode
from diffusion_jax.training import run_log


def _tensorboard_scalars(workdir, tag):
  """{step: value} of `tag` in the run's event files (what clu wrote)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(str(workdir), 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def _rows(workdir):
  with open(os.path.join(workdir, run_log.METRICS_FILE), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_metrics_jsonl_and_loss_curve_follow_a_resumed_run(tmp_path, capfd):
  workdir = str(tmp_path / 'run')
  train_mode.train_and_evaluate(tc.loop_config(4), workdir)  # Logs (and checkpoints) steps 2 and 4.
  first = _rows(workdir)
  assert [row['step'] for row in first] == [2, 4]
  tb_loss = _tensorboard_scalars(workdir, 'loss')
  np.testing.assert_allclose([row['loss'] for row in first], [tb_loss[2], tb_loss[4]], rtol=1e-6)
  # A run killed after logging a step its checkpoint does not hold: a row for step 6 and half
  # a line. The resume from checkpoint 4 drops both before logging 6 itself.
  with open(os.path.join(workdir, run_log.METRICS_FILE), 'a', encoding='utf-8') as f:
    f.write(json.dumps({'step': 6, 'loss': 123.0}) + '\n{"step": 8, "lo')
  train_mode.train_and_evaluate(tc.loop_config(6), workdir)
  rows = _rows(workdir)
  assert [row['step'] for row in rows] == [2, 4, 6]  # No duplicate, no jump back.
  assert rows[:2] == first
  tb_loss = _tensorboard_scalars(workdir, 'loss')
  assert rows[2]['loss'] != 123.0
  np.testing.assert_allclose(rows[2]['loss'], tb_loss[6], rtol=1e-6)

  metrics = run_log.read_train_metrics(workdir)
  assert {'step', 'loss', 'grad_norm', 'learning_rate',
          'train/steps_per_sec_window'} <= set(metrics)
  assert metrics['step'].dtype == np.int64 and list(metrics['step']) == [2, 4, 6]
  np.testing.assert_allclose(metrics['loss'], [tb_loss[s] for s in (2, 4, 6)], rtol=1e-6)
  np.testing.assert_allclose(metrics['learning_rate'], 2e-3, rtol=1e-6)  # Constant schedule.
  assert np.all(metrics['train/steps_per_sec_window'] > 0)

  with Image.open(os.path.join(workdir, run_log.LOSS_CURVE_FILE)) as png:
    png.load()
    assert png.format == 'PNG' and png.size == images.CURVE_SIZE and png.mode == 'RGB'
    drawn = np.all(np.asarray(png) == images.CURVE_COLOR, axis=-1)
  cols, _, _ = images.curve_pixels(metrics['step'], metrics['loss'])
  assert drawn[:, int(round(cols[0]))].any() and drawn[:, int(round(cols[-1]))].any()
  # pytest's stderr is no terminal: no progress bar in the output.
  assert 'ETA' not in capfd.readouterr().err


def test_read_train_metrics_fills_missing_and_nonfinite_with_nan(tmp_path):
  (tmp_path / run_log.METRICS_FILE).write_text(
      '{"step": 10, "loss": 0.5}\n{"step": 20, "loss": null, "skipped_steps": 3}\n')
  metrics = run_log.read_train_metrics(str(tmp_path))
  assert list(metrics['step']) == [10, 20]
  np.testing.assert_array_equal(metrics['loss'], [0.5, np.nan])
  np.testing.assert_array_equal(metrics['skipped_steps'], [np.nan, 3.0])
  with pytest.raises(FileNotFoundError, match='log_every_steps'):
    run_log.read_train_metrics(str(tmp_path / 'none'))


class _Stream(io.StringIO):

  def __init__(self, tty):
    super().__init__()
    self._tty = tty

  def isatty(self):
    return self._tty


def test_progress_bar_only_on_a_terminal_of_process_0():
  assert run_log.show_progress_bar(_Stream(True), process_index=0)
  assert not run_log.show_progress_bar(_Stream(False), process_index=0)  # Logs, pipes, CI.
  assert not run_log.show_progress_bar(_Stream(True), process_index=1)
  assert not run_log.show_progress_bar(object(), process_index=0)  # No isatty at all.
  closed = _Stream(True)
  closed.close()
  closed.isatty = io.StringIO().isatty  # A closed stream's isatty raises ValueError.
  assert not run_log.show_progress_bar(closed, process_index=0)


def test_progress_line_rate_eta_and_loss():
  # 500 of 3000 steps in 100 s: 5 steps/s, 2500 steps left = 500 s.
  line = run_log.progress_line(500, 3000, 100.0, loss=0.03125)
  assert '500/3000 steps' in line and ' 17%' in line
  assert '01:40 elapsed' in line and 'ETA 08:20' in line and '5.00step/s' in line
  assert 'loss 0.03125' in line
  # Resumed at 2000: only this run's 500 steps count for the rate, so 100 s are left.
  line = run_log.progress_line(2500, 3000, 100.0, start_step=2000)
  assert 'ETA 01:40' in line and '5.00step/s' in line and 'loss' not in line


def test_progress_bar_draws_on_stderr_and_clears_for_log_lines(monkeypatch):
  stream = _Stream(True)
  monkeypatch.setattr(sys, 'stderr', stream)
  handler = logging.StreamHandler(stream)
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    bar = run_log.TrainProgressBar(0, 100, enabled=True)
    bar.update(10, loss=0.5)
    assert len(handler.filters) == 1  # The bar's clearing filter.
    before = stream.getvalue()
    root.warning('a log line')
    after = stream.getvalue()[len(before):]
    assert after.index('\r') < after.index('a log line')  # The bar was cleared first.
    bar.close()
    assert not handler.filters
    assert '10/100 steps' in stream.getvalue() and 'loss 0.5' in stream.getvalue()
  finally:
    root.removeHandler(handler)
  quiet = _Stream(False)
  monkeypatch.setattr(sys, 'stderr', quiet)
  bar = run_log.TrainProgressBar(0, 100, enabled=False)
  bar.update(50, loss=0.5)
  bar.close()
  assert quiet.getvalue() == ''
