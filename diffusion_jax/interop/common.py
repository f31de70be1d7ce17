"""What the importers share (diffusers.py, openai.py): the torch key of our leaf, the checked walk
from a state dict onto our parameter tree, and the one place an imported run directory is written.

An importer supplies, per parameter path of ours ('down_0_res_0', 'conv1', 'kernel'), the key
its file stores it under (`torch_key` with its module names), the shape it has there and the
conversion into our layout; `params_from_state_dict` checks every key, shape and dtype of the
whole file before it reads a single tensor (a torch_pickle.Tensor is read only then; a numpy
array is used as is), and refuses a tensor of the file that our model does not have. `write_run`
saves `<workdir>/config.json` and a step-0 checkpoint whose params and every EMA are the
imported weights, after `check_empty_workdir`.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.config import run_config
from diffusion_jax.training import checkpoints
from diffusion_jax.training import ema as ema_lib
from diffusion_jax.training import train_state

PyTree = Any
Path = Tuple[str, ...]
# Element types a weight may have in the file (converted to model.param_dtype).
FLOAT_DTYPES = ('float16', 'bfloat16', 'float32', 'float64')


class ConversionError(ValueError):
  """The source cannot be converted exactly; the message names the option, block or key."""


def leaf_paths(tree: PyTree) -> List[Tuple[Path, Any]]:
  """[(('down_0_res_0', 'conv1', 'kernel'), leaf), ...] of a parameter tree, in tree order."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(str(k.key) for k in keys), leaf) for keys, leaf in flat]


# Our leaf names -> torch's (both importers' files are torch modules).
LEAF_NAMES = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'embedding': 'weight'}


def torch_key(path: Path, prefix: str, submodules: Mapping[str, str], source: str) -> str:
  """The state-dict key of our leaf at `path` in a torch file: `prefix` (the file's name of our
  top-level module path[0]), then `submodules`' name of each module between (our GroupNorm_0
  wrappers have none), then the torch leaf name. An unmapped module is a ConversionError naming
  the path and `source` (the file format)."""
  parts = [prefix]
  for name in path[1:-1]:
    if name == 'GroupNorm_0':
      continue
    if name not in submodules:
      raise ConversionError(f'our parameter {"/".join(path)} has no {source} counterpart.')
    parts.append(submodules[name])
  parts.append(LEAF_NAMES[path[-1]])
  return '.'.join(parts)


def abstract_params(config: ml_collections.ConfigDict) -> PyTree:
  """Shapes and dtypes of our parameters for `config` (nothing is computed or allocated): the
  params of the run's train state, so an import is exactly what a run of `config` restores."""
  return train_state.abstract_train_state(config).params


def _dtype_name(tensor: Any) -> str:
  name = getattr(tensor, 'dtype_name', None)  # torch_pickle.Tensor: the file's element type.
  return name if name is not None else np.dtype(tensor.dtype).name


def _read(tensor: Any) -> np.ndarray:
  return tensor.numpy() if hasattr(tensor, 'numpy') else np.asarray(tensor)


def params_from_state_dict(
    state_dict: Mapping[str, Any], target: PyTree, key_of: Callable[[Path], str],
    shape_of: Callable[[Path, Tuple[int, ...]], Tuple[int, ...]],
    convert: Callable[[Path, np.ndarray, Tuple[int, ...]], np.ndarray], *,
    missing_hint: str, shape_hint: str = '', extra_hint: str = '',
    describe: Callable[[str], str] = repr) -> PyTree:
  """Our parameter tree (numpy, each leaf in `target`'s dtype) from a state dict.

  state_dict: {key: tensor with .shape (numpy array or torch_pickle.Tensor)}; target: the
  abstract tree (`abstract_params`). For each of our leaves at `path`, the file must hold
  `key_of(path)` with shape `shape_of(path, our shape)` and a floating-point dtype, and every
  tensor of the file must be one of those; otherwise ConversionError names the key
  (`describe(key)`) and adds the importer's hint. Only when all of that holds is any tensor
  read, then `convert(path, float32 array, our shape)` puts it in our layout.
  """
  rows = []
  for path, leaf in leaf_paths(target):
    key, expected = key_of(path), tuple(shape_of(path, tuple(leaf.shape)))
    name = '/'.join(path)
    if key not in state_dict:
      raise ConversionError(f'The checkpoint has no tensor {describe(key)} (our {name}, shape '
                            f'{expected}): {missing_hint}')
    tensor = state_dict[key]
    if tuple(tensor.shape) != expected:
      raise ConversionError(f'Tensor {describe(key)} has shape {tuple(tensor.shape)}, expected '
                            f'{expected} for our {name}{shape_hint}.')
    if _dtype_name(tensor) not in FLOAT_DTYPES:
      raise ConversionError(f'Tensor {describe(key)} holds {_dtype_name(tensor)} values; a '
                            f'weight (our {name}) is one of {FLOAT_DTYPES}.')
    rows.append((path, leaf, tensor))
  extra = sorted(set(state_dict) - {key_of(path) for path, _, _ in rows})
  if extra:
    shown = [describe(k) for k in extra[:5]]
    raise ConversionError(f'The checkpoint has tensors our model does not: [{", ".join(shown)}]'
                          f'{" ..." if len(extra) > 5 else ""} ({len(extra)} in all){extra_hint}.')
  leaves = [convert(path, _read(tensor).astype(np.float32), tuple(leaf.shape)).astype(leaf.dtype)
            for path, leaf, tensor in rows]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


def check_empty_workdir(workdir: str) -> None:
  """Raises ConversionError unless `workdir` holds no run (no config.json, no checkpoints/)."""
  if not workdir:
    raise ConversionError('--workdir is empty: name the run directory to write.')
  if run_config.config_path(workdir).exists() or checkpoints.checkpoint_dir(workdir).exists():
    raise ConversionError(f'{workdir} already holds a run (config.json or checkpoints/); '
                          'choose an empty --workdir.')


def write_run(config: ml_collections.ConfigDict, params: PyTree, workdir: str) -> None:
  """Saves `<workdir>/config.json` and a step-0 checkpoint: params = `params`, the EMA and every
  extra EMA of config.optim (float32) start at them, a fresh optimizer state and no updates
  counted (the state `train_state.create_train_state` would start from), so sampling,
  evaluation and fine-tuning (`--mode=train` resumes step 0) all read the imported weights."""
  check_empty_workdir(workdir)
  params = jax.tree.map(jnp.asarray, params)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  keys = ema_lib.ema_keys(config.optim)
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema_params=jax.tree.map(lambda p: p.astype(jnp.float32), params), opt_state=tx.init(params),
      extra_emas=ema_lib.init_emas(params, keys) if keys else None,
      num_updates=jnp.zeros((), jnp.int32))
  run_config.save_run_config(config, workdir)
  manager = checkpoints.create_manager(workdir, keep=1, async_save=False)
  checkpoints.save(manager, 0, state, config)
  manager.wait_until_finished()
  manager.close()
