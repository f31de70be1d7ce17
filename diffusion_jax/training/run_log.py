"""What a training run writes about its progress, besides TensorBoard: the metrics file, the loss
curve and the progress bar.

* `<workdir>/train_metrics.jsonl`: one JSON row per log step (process 0), read back with
  `read_train_metrics`; a resumed run first drops the rows after its checkpoint.
* `<workdir>/loss_curve.png`: the logged loss against the step, redrawn at every log step.
* a tqdm bar with steps/s and ETA, only on an interactive terminal (`show_progress_bar`).
* `flatten_config`: the config as TensorBoard hparams.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Dict, List, Optional, TextIO

import jax
import numpy as np
import tqdm
from etils import epath

from diffusion_jax import images
from diffusion_jax.config import run_config


def flatten_config(config) -> Dict[str, object]:
  """{'training.batch_size': 128, 'model.unet.ch_mult': '(1, 2)', ...}: TensorBoard hparams
  (`run_config.flatten`'s dotted keys; bools, numbers and strings kept, anything else (tuples,
  None) as str)."""
  return {name: value if isinstance(value, (bool, int, float, str)) else str(value)
          for name, value in run_config.flatten(config).items()}


METRICS_FILE = 'train_metrics.jsonl'  # <workdir>/: one JSON row per log step (process 0).
LOSS_CURVE_FILE = 'loss_curve.png'    # <workdir>/: the logged loss against the step.


def _json_value(value) -> Optional[float]:
  """A scalar as JSON: float, or null for NaN/Inf (read back as NaN)."""
  value = float(value)
  return value if math.isfinite(value) else None


def _read_rows(path: epath.Path, text: Optional[str] = None) -> List[Dict[str, object]]:
  """The rows of a train_metrics.jsonl (its `text` if already read); a line that does not
  parse (a run killed mid-write leaves at most a partial last line) is skipped."""
  rows = []
  for line in (path.read_text() if text is None else text).splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      logging.warning('Skipping an unreadable line of %s: %r', path, line[:80])
      continue
    if isinstance(row, dict) and 'step' in row:
      rows.append(row)
  return rows


def read_train_metrics(workdir: str) -> Dict[str, np.ndarray]:
  """The logged training scalars of `<workdir>/train_metrics.jsonl` as arrays over log steps.

  Returns {'step': int64 [N], 'loss': float64 [N], ...}: one entry per logged scalar (the train
  step's 'loss', 'grad_norm', 'learning_rate', 'train/steps_per_sec_window', 'skipped_steps'
  with training.on_nonfinite='skip'), NaN where a row lacks it or it was non-finite. Rows are
  in step order, one per log step (a resumed run first drops the rows after its checkpoint).
  """
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: training writes it at every log step '
                            '(training.log_every_steps) on process 0.')
  rows = _read_rows(path)
  keys = ['step'] + sorted({key for row in rows for key in row} - {'step'})
  out = {'step': np.array([int(row['step']) for row in rows], np.int64)}
  for key in keys[1:]:
    out[key] = np.array([np.nan if row.get(key) is None else float(row[key]) for row in rows],
                        np.float64)
  return out


class TrainMetricsLog:
  """Appends each log step's scalars to `<workdir>/train_metrics.jsonl` and redraws
  `<workdir>/loss_curve.png` (process 0 only; the others hold an inactive log).

  On resume from step s the rows after s (logged after the checkpoint, before a kill) are
  dropped first, so the file never repeats a step or goes back. Local files are appended to a
  line at a time; on object stores (gs://, which cannot append) the whole file is rewritten.
  """

  def __init__(self, workdir: str, start_step: int, active: bool):
    self.active = active
    self.path = epath.Path(workdir) / METRICS_FILE
    self.curve_path = epath.Path(workdir) / LOSS_CURVE_FILE
    self._append = '://' not in str(self.path)
    self.rows: List[Dict[str, object]] = []
    if not active or not self.path.exists():
      return
    text = self.path.read_text()
    rows = _read_rows(self.path, text)
    self.rows = [row for row in rows if int(row['step']) <= start_step]
    if len(self.rows) < len(rows):
      logging.info('%s: dropped %d row(s) after the resumed step %d.', self.path,
                   len(rows) - len(self.rows), start_step)
    if self._text(self.rows) != text:  # Rows dropped, or an unreadable (partial) line.
      temporary = self.path.parent / (METRICS_FILE + '.tmp')  # Never a half-written file.
      temporary.write_text(self._text(self.rows))
      temporary.replace(self.path)

  @staticmethod
  def _text(rows: List[Dict[str, object]]) -> str:
    return ''.join(json.dumps(row) + '\n' for row in rows)

  def append(self, step: int, scalars: Dict[str, float]) -> None:
    """Adds the row {'step': step, **scalars} and redraws the loss curve."""
    if not self.active:
      return
    row = {'step': int(step)} | {key: _json_value(v) for key, v in scalars.items()}
    self.rows.append(row)
    if self._append:
      with self.path.open('a') as f:
        f.write(self._text([row]))
    else:
      self.path.write_text(self._text(self.rows))
    self.write_curve()

  def write_curve(self) -> None:
    """Draws the logged loss against the step (images.plot_curve) to loss_curve.png."""
    steps = np.array([row['step'] for row in self.rows], np.float64)
    loss = np.array([np.nan if row.get('loss') is None else row['loss'] for row in self.rows],
                    np.float64)
    finite = loss[np.isfinite(loss)]
    log_y = finite.size > 0 and bool(np.all(finite > 0))
    title = f'training loss (mean over each log window{", log scale" if log_y else ""})'
    images.write_png(str(self.curve_path), images.plot_curve(steps, loss, title, log_y=log_y))


PROGRESS_FORMAT = ('{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed} elapsed, '
                   'ETA {remaining}, {rate_fmt}{postfix}]')


def show_progress_bar(stream: Optional[TextIO] = None, process_index: Optional[int] = None
                      ) -> bool:
  """Whether training draws a progress bar: only process 0, only when `stream` (default
  sys.stderr) is an interactive terminal, so log files, pipes and CI stay free of it."""
  stream = sys.stderr if stream is None else stream
  if (jax.process_index() if process_index is None else process_index) != 0:
    return False
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # No isatty, or a closed stream.
    return False


def progress_line(step: int, num_steps: int, elapsed_s: float, loss: Optional[float] = None,
                  start_step: int = 0, ncols: int = 100) -> str:
  """The progress bar's text after `elapsed_s` seconds at `step` of `num_steps`, e.g.
  ' 17%|##  | 500/3000 steps [01:40 elapsed, ETA 08:20, 5.00step/s, loss 0.0312]':
  steps/s = (step - start_step) / elapsed_s (a resumed run counts only its own steps) and
  ETA = (num_steps - step) / (steps/s)."""
  return tqdm.tqdm.format_meter(step, num_steps, elapsed_s, ncols=ncols, ascii=True, unit='step',
                                bar_format=PROGRESS_FORMAT, postfix=_loss_postfix(loss),
                                initial=start_step)


def _loss_postfix(loss: Optional[float]) -> Optional[str]:
  return None if loss is None else f'loss {loss:.4g}'


class _ClearBarFilter(logging.Filter):
  """Clears the progress bar before a log line is printed; its next update redraws it below."""

  def __init__(self, bar: tqdm.tqdm):
    super().__init__()
    self._bar = bar

  def filter(self, record: logging.LogRecord) -> bool:
    self._bar.clear()
    return True


class TrainProgressBar:
  """A tqdm bar (steps/s, ETA, the last logged loss) on an interactive stderr; a no-op
  otherwise (see `show_progress_bar`). clu's periodic reports and the log lines stay: while
  the bar is up, every handler of the root logger clears it before printing a line."""

  def __init__(self, start_step: int, num_steps: int, enabled: bool):
    self._bar = tqdm.tqdm(total=num_steps, initial=start_step, unit='step',
                          bar_format=PROGRESS_FORMAT, dynamic_ncols=True, file=sys.stderr,
                          disable=not enabled)
    self._filter = _ClearBarFilter(self._bar) if enabled else None
    self._handlers = list(logging.getLogger().handlers) if enabled else []
    for handler in self._handlers:
      handler.addFilter(self._filter)

  def update(self, step: int, loss: Optional[float] = None) -> None:
    """Moves the bar to `step`; a new `loss` (at log steps) replaces the shown one."""
    if self._filter is None:
      return
    if loss is not None:
      self._bar.set_postfix_str(_loss_postfix(loss), refresh=False)
    self._bar.update(step - self._bar.n)

  def close(self) -> None:
    for handler in self._handlers:
      handler.removeFilter(self._filter)
    self._bar.close()
