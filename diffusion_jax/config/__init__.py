"""Configs as data (ml_collections): the library's defaults (defaults.py), the run's own
config.json (run_config.py), configs of earlier versions read in today's layout (migration.py),
the error every check raises (errors.py), and experiment config files loaded by path."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from typing import Union

import ml_collections

from diffusion_jax.config.defaults import get_config
from diffusion_jax.config.errors import ConfigError

__all__ = ['ConfigError', 'get_config', 'load_config_file']


def load_config_file(path: Union[str, os.PathLike]) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, e.g. 'configs/digits_flow.py' (as main.py's --config).

  A relative path that does not exist from the working directory is looked up in the checkout
  this package runs from (configs/ ships with the repository, not inside the package). A file
  of a package folder (configs/ has an __init__.py) may import its siblings
  (`from configs import digits`): the folder's parent is put on sys.path while it loads.
  """
  file = pathlib.Path(path)
  if not file.exists() and not file.is_absolute():
    checkout = pathlib.Path(__file__).resolve().parents[2]
    if (checkout / file).exists():
      file = checkout / file
  if not file.is_file():
    raise FileNotFoundError(f'{path} is not a config file. The experiment configs are in the '
                            "repository's configs/ folder: clone it and pass that path.")
  file = file.resolve()
  root = file.parent.parent if (file.parent / '__init__.py').exists() else file.parent
  name = (f'{file.parent.name}.{file.stem}' if (file.parent / '__init__.py').exists()
          else file.stem)
  sys.path.insert(0, str(root))
  try:
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(root))
  return module.get_config()
