"""A run's own config: written to `<workdir>/config.json` at the start of training, read back by
`--mode=sample|eval`, so a run directory says how it was made.

JSON has no tuples; `load_run_config` turns lists back into tuples wherever the default config
(`configs/default.py`) holds a tuple, so a reloaded config equals the one that was saved.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import ml_collections
from etils import epath

CONFIG_FILE = 'config.json'


def config_path(workdir: str) -> epath.Path:
  """`<workdir>/config.json`."""
  return epath.Path(workdir) / CONFIG_FILE


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as indented JSON with sorted keys (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
  """Writes `config` to `<workdir>/config.json` (atomically: a temporary file, then a rename)."""
  path = config_path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (CONFIG_FILE + '.tmp')
  tmp.write_text(config_to_json(config))
  tmp.rename(path)
  return path


def _restore_tuples(value: Any, like: Any) -> Any:
  if isinstance(value, dict):
    return {k: _restore_tuples(v, like.get(k) if isinstance(like, dict) else None)
            for k, v in value.items()}
  if isinstance(value, list) and isinstance(like, (tuple, type(None))):
    return tuple(value)
  return value


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of `config_to_json`: lists become tuples where the default config has tuples."""
  from configs import default  # pylint: disable=g-import-not-at-top
  like: Dict[str, Any] = default.get_config().to_dict()
  return ml_collections.ConfigDict(_restore_tuples(json.loads(text), like))


def load_run_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config saved in `<workdir>/config.json`, or None if the run has none."""
  path = config_path(workdir)
  if not path.exists():
    return None
  return config_from_json(path.read_text())
