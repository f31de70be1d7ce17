"""A run's own config: written to `<workdir>/config.json` at the start of training, read back by
`--mode=sample|eval|export`, so a run directory says how it was made.

JSON has no tuples; `load_run_config` turns lists back into tuples wherever the default config
(`diffusion_jax/config/defaults.py`) holds a tuple, so a reloaded config equals the one that was
saved.

In the modes that read a run (`config_for_run`), the run's config.json is the config: the
--config file only supplies the fields the run lacks (it predates them, or an import wrote it),
and only the explicit command-line overrides are requests; an override of a field of the trained
network (model, diffusion) that differs from the run's value is a LockedFieldError naming it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

import ml_collections
from etils import epath
from diffusion_jax.config import defaults, migration
from diffusion_jax.config.errors import ConfigError

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
  tmp.replace(path)  # Overwrites the copy of an earlier start (a resumed run).
  return path


def _restore_tuples(value: Any, like: Any) -> Any:
  if isinstance(value, dict):
    return {k: _restore_tuples(v, like.get(k) if isinstance(like, dict) else None)
            for k, v in value.items()}
  if isinstance(value, list) and isinstance(like, (tuple, type(None))):
    return tuple(value)
  return value


def _add_missing(value: Dict[str, Any], like: Dict[str, Any]) -> Dict[str, Any]:
  """`value` plus every field of `like` it lacks (recursively)."""
  merged = dict(value)
  for key, default in like.items():
    if key not in merged:
      merged[key] = default
    elif isinstance(default, dict) and isinstance(merged[key], dict):
      merged[key] = _add_missing(merged[key], default)
  return merged


def config_from_json(text: str, fallback: Optional[ml_collections.ConfigDict] = None
                     ) -> ml_collections.ConfigDict:
  """Inverse of `config_to_json`: lists become tuples where the default config has tuples.

  A config of an earlier layout is migrated first (migration.py). A field the saved config lacks
  (the run predates it) takes its value from `fallback` (e.g. the --config file) when that has
  the field and it is not one of the trained network (LOCKED_SECTIONS), else from
  config/defaults.py: a network field added later defaults to the behaviour the code had
  before, which is the network the run trained, whatever --config says.
  """
  like: Dict[str, Any] = defaults.get_config().to_dict()
  saved = _restore_tuples(migration.migrate(json.loads(text)), like)
  if fallback is not None:
    saved = _add_missing(saved, {k: v for k, v in fallback.to_dict().items()
                                 if k not in LOCKED_SECTIONS})
  return ml_collections.ConfigDict(_add_missing(saved, like))


def load_run_config(workdir: str, fallback: Optional[ml_collections.ConfigDict] = None
                    ) -> ml_collections.ConfigDict | None:
  """The config saved in `<workdir>/config.json` (a field it lacks from `fallback` or the
  defaults, as `config_from_json` says), or None if the run has none."""
  path = config_path(workdir)
  if not path.exists():
    return None
  return config_from_json(path.read_text(), fallback)


class LockedFieldError(ValueError):
  """A sample/eval config changes a field of the trained network (model, diffusion)."""


# Fields that fix the trained network: a sample/eval run must use the saved run's values.
LOCKED_SECTIONS = ('model', 'diffusion')
# ... except those that choose how the same network is computed (same parameters, same maths).
FREE_FIELDS = ('model.conv_backend',)


def flatten(config: ml_collections.ConfigDict | Dict[str, Any], prefix: str = ''
            ) -> Dict[str, Any]:
  """{'model.unet.ch': 128, ...}: every leaf of `config` under its dotted name."""
  items = config.items() if isinstance(config, dict) else config.to_dict().items()
  flat: Dict[str, Any] = {}
  for key, value in items:
    name = f'{prefix}{key}'
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(flatten(value, name + '.'))
    else:
      flat[name] = value
  return flat


def locked_differences(saved: ml_collections.ConfigDict, requested: ml_collections.ConfigDict,
                       sections: Tuple[str, ...] = LOCKED_SECTIONS
                       ) -> List[Tuple[str, Any, Any]]:
  """(dotted field, saved value, requested value) for each field of `sections` that differs
  (`FREE_FIELDS` aside).

  Tuples and lists compare equal element-wise (JSON has no tuples).
  """
  def norm(value):
    return list(value) if isinstance(value, tuple) else value
  def locked(name):
    return name.split('.')[0] in sections and name not in FREE_FIELDS
  old = {k: v for k, v in flatten(saved).items() if locked(k)}
  new = {k: v for k, v in flatten(requested).items() if locked(k)}
  return [(name, old.get(name), new.get(name)) for name in sorted(set(old) | set(new))
          if norm(old.get(name)) != norm(new.get(name))]


def describe_differences(differences: List[Tuple[str, Any, Any]]) -> str:
  """One indented line per `locked_differences` entry: 'model.unet.ch: run has 32, requested 64'."""
  return ''.join(f'\n  {name}: run has {old!r}, requested {new!r}'
                 for name, old, new in differences)


def check_resume_config(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                        source: str) -> None:
  """Training resumes a run only with its own network: raises config_validation.ConfigError
  listing each model.* / diffusion.* field where `config` differs from the `saved` one (read
  from `source`, a checkpoint or config.json) with both values.

  Optimizer and training fields may change; whether the state still fits is checked on restore.
  """
  differences = locked_differences(saved, config)
  if differences:
    raise ConfigError(
        f'Cannot resume {source}: the config changes fields of the trained network (model, '
        'diffusion). Use the run\'s values (its config.json) or a new --workdir:'
        + describe_differences(differences))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Dict[str, Any]
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` with each dotted `overrides` field ('sample.steps': 50) set."""
  merged = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('.')
    node = merged
    for name in parents:
      node = node[name]
    node[leaf] = value
  return merged


def config_for_run(saved: ml_collections.ConfigDict, overrides: Dict[str, Any]
                   ) -> ml_collections.ConfigDict:
  """The config --mode=sample|eval|export uses: the run's own `saved` config (as
  `load_run_config(workdir, fallback=the --config file)` reads it) with the command-line
  `overrides` ({'sample.steps': 50, ...}) applied.

  Only the overrides are requests: sample, eval, mesh, ... fields may change, and so may
  FREE_FIELDS; an override of a model or diffusion field that differs from the run's value
  would describe another network than the checkpoint's, so it raises LockedFieldError listing
  each such dotted field with both values. `saved` is not modified.
  """
  requested = apply_overrides(saved, overrides)
  differences = locked_differences(saved, requested)
  if differences:
    raise LockedFieldError('The command-line overrides change fields of the trained network '
                           "(model, diffusion) relative to the run's config.json; drop those "
                           'overrides or use a new --workdir:' + describe_differences(differences))
  return requested
