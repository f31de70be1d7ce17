"""The data source registry (`data.dataset`): which module reads a config's data.

`SOURCES` maps a name to a module of the protocol in base.py; every other name is a
tensorflow-datasets name (tfds_source.py). pipeline.py and checks.py dispatch through
`source_of` only, so a new source is one module plus one entry here (or `register` at run time).
Imports no TensorFlow: the sources import it where they build tensors.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from diffusion_jax.data import base, digits, folder, tfds_source

# data.dataset -> the module that reads it; any other name goes to `FALLBACK`.
SOURCES: Dict[str, base.Source] = {digits.NAME: digits, folder.NAME: folder}
FALLBACK = tfds_source
_BUILT_IN = (digits.NAME, folder.NAME)


def source_of(data_config) -> base.Source:
  """The source that reads `data_config.dataset` (the tfds source for unregistered names)."""
  return SOURCES.get(str(data_config.dataset), FALLBACK)


def names() -> Tuple[str, ...]:
  """The registered names, in registration order (the built-in 'digits', 'folder' first)."""
  return tuple(SOURCES)


def check_name(name: str) -> List[str]:
  """An error naming data.dataset unless `name` is registered or a tfds builder (the latter
  imports TensorFlow, so only the modes that read data ask)."""
  if name in SOURCES:
    return []
  return FALLBACK.check_name(name, names())


def register(source: base.Source) -> None:
  """Adds a source: `data.dataset=source.NAME` then reads it (see base.py for the protocol)."""
  missing = [attr for attr in base.REQUIRED if not hasattr(source, attr)]
  if missing:
    raise ValueError(f'A data source needs {base.REQUIRED}; {source!r} lacks {missing}.')
  name = source.NAME
  if not isinstance(name, str) or not name:
    raise ValueError(f'A data source needs a non-empty string NAME, got {name!r}.')
  if name in SOURCES and SOURCES[name] is not source:
    raise ValueError(f'data.dataset={name!r} is already registered; unregister it first.')
  SOURCES[name] = source


def unregister(name: str) -> None:
  """Removes the source registered as `name` (the built-in ones stay)."""
  if name in _BUILT_IN:
    raise ValueError(f'{name!r} is a built-in data source.')
  SOURCES.pop(name, None)
