"""Where evaluation figures go: `<workdir>/eval/<metric>_step<step>.json` and TensorBoard."""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, Optional

import jax
from clu import metric_writers
from etils import epath



def write_eval_scalars(workdir: str, step: int, scalars: Dict[str, float]) -> epath.Path:
  """Writes `scalars` at `step` to TensorBoard under `<workdir>/eval` (created); returns it."""
  out_dir = epath.Path(workdir) / 'eval'
  writer = metric_writers.create_default_writer(str(out_dir),
                                                just_logging=jax.process_index() > 0)
  writer.write_scalars(int(step), scalars)
  writer.flush()
  writer.close()
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
  return out_dir


def write_sample_results(workdir: str, step: int, results: Dict[str, Dict[str, Any]]
                         ) -> Dict[str, float]:
  """Writes each metric's figures to `<workdir>/eval/<metric>_step<step>.json` (process 0) and
  its numbers to TensorBoard (`<workdir>/eval`, as `<metric>/<figure>`); returns those scalars."""
  scalars = {f'{metric}/{name}': value for metric, figures in results.items()
             for name, value in figures.items()
             if isinstance(value, (int, float)) and name not in ('step',)}
  out_dir = write_eval_scalars(workdir, step, scalars)
  if jax.process_index() == 0:
    for metric, figures in results.items():
      (out_dir / f'{metric}_step{step}.json').write_text(json.dumps(figures, indent=2))
    logging.info('Sample metrics of step %d: %s', step, json.dumps(scalars))
  return scalars


def read_best(workdir: str) -> Optional[Dict[str, Any]]:
  """`<workdir>/eval/best.json` ({'metric', 'value', 'step'}) or None when there is none yet."""
  path = epath.Path(workdir) / 'eval' / 'best.json'
  return json.loads(path.read_text()) if path.exists() else None
