"""Runs a sampler written by `--mode=export`, importing only jax, numpy and safetensors.

  from diffusion_jax import serving
  sampler = serving.load('RUN/export/step6_ddim_5_seed0_ema')
  images = sampler.sample(16, seed=0)                    # uint8 [16, H, W, C]
  images = sampler.sample(4, seed=0, labels=[3, 3, 7, 7], as_uint8=False)  # float in [-1, 1]

This module imports nothing else from diffusion_jax (not the model, diffusion or sampler
code), so it can be copied alone next to an export folder. Before anything is deserialized,
`load` checks that this JAX can run the artifact as card.json describes it (`check_runtime`:
its jax.export calling convention, its PRNG implementation; another jax version is a warning)
and the sha256 of the artifact and the weights against the card.

With an int seed, `sample(n, seed, batch_index=k)` uses the key `fold_in(PRNGKey(seed), k)`
and, by default, the labels of sample indices k*n .. k*n + n-1 — exactly batch k of
`--mode=sample` with `sample.batch_size=n` and `sample.seed=seed`, so the images are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import jax
import numpy as np

ARTIFACT_FILE = 'sampler.jax_exported'  # The names export.py writes.
WEIGHTS_FILE = 'params.safetensors'
CARD_FILE = 'card.json'
CARD_FORMAT = 'diffusion_jax.export/1'


class ChecksumError(ValueError):
  """A file of an export folder does not match the sha256 its card.json records."""


class IncompatibleExportError(ValueError):
  """This JAX cannot run the artifact as exported: its calling convention or PRNG differ."""


class JaxVersionWarning(UserWarning):
  """The artifact was exported by another jax version (which this one can run)."""


def check_runtime(card: Mapping[str, Any], card_path: str) -> Optional[str]:
  """Compares `card` (a parsed card.json) with the running JAX, before deserializing.

  Raises IncompatibleExportError when the artifact's jax.export calling convention version is
  outside what this JAX runs, or when its PRNG implementation is not this process's
  `jax_default_prng_impl` (a seed would give other keys, or keys of another shape); each
  message names both sides and the fix. Returns the warning to give when only the jax version
  differs (None when it is the same).
  """
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  missing = [name for name in ('jax_version', 'calling_convention_version', 'rng')
             if name not in card]
  if 'rng' in card and 'prng_impl' not in card['rng']:
    missing.append('rng.prng_impl')
  if missing:
    raise ValueError(f'{card_path} has no {", ".join(missing)}: not a card of {CARD_FORMAT} '
                     '(export again with `python main.py ... --mode=export`).')
  exported_by, running = str(card['jax_version']), jax.__version__
  version = int(card['calling_convention_version'])
  low = jax_export.minimum_supported_calling_convention_version
  high = jax_export.maximum_supported_calling_convention_version
  if not low <= version <= high:
    fix = (f'upgrade jax (e.g. `pip install jax=={exported_by}`)' if version > high else
           f'export the run again with this jax ({running}), or load it with jax '
           f'{exported_by}')
    raise IncompatibleExportError(
        f'{card_path}: the artifact has jax.export calling convention version {version} '
        f'(exported by jax {exported_by}), but jax {running} runs versions {low}..{high}: '
        f'{fix}.')
  impl, running_impl = str(card['rng']['prng_impl']), str(jax.config.jax_default_prng_impl)
  if impl != running_impl:
    raise IncompatibleExportError(
        f"{card_path}: the artifact was exported with jax_default_prng_impl={impl!r}, but this "
        f'process uses {running_impl!r}, whose keys for a seed differ: set '
        f"jax.config.update('jax_default_prng_impl', {impl!r}) (or JAX_DEFAULT_PRNG_IMPL="
        f'{impl}) before loading, or export again with {running_impl!r}.')
  if exported_by != running:
    return (f'{card_path}: exported by jax {exported_by}, loaded by jax {running}; its calling '
            f'convention {version} runs on both, but the images of a seed may differ in the '
            f'last bits. Export again with jax {running} for bit-identical samples.')
  return None


def sha256(path: str) -> str:
  """Hex sha256 of a local file."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def unflatten_params(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}: the params tree the artifact was exported with."""
  tree: Dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] -> uint8 by clip(round((x + 1) * 127.5), 0, 255), as --mode=sample's samples.npz."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class Sampler:
  """A loaded export: `sample(...)` draws images; `card` is the parsed card.json."""

  def __init__(self, export_dir: str, card: Dict[str, Any], exported: Any,
               params: Dict[str, Any]):
    self.export_dir = export_dir
    self.card = card
    self._exported = exported
    self._params = params
    self._call = jax.jit(exported.call)  # Compiled once per batch size.
    labels = card['labels']
    self.num_classes = int(labels['num_classes'])
    self.class_labels = (None if labels['class_labels'] is None
                         else np.asarray(labels['class_labels'], np.int32))
    self.default_seed = int(card['rng']['default_seed'])

  def default_labels(self, batch_size: int, batch_index: int = 0) -> np.ndarray:
    """--mode=sample's labels of sample indices batch_index*batch_size + [0, batch_size):
    cycling `sample.class_labels` (all classes when it was empty); zeros if unconditional."""
    indices = batch_index * batch_size + np.arange(batch_size, dtype=np.int64)
    if self.num_classes <= 0:
      return np.zeros((batch_size,), np.int32)
    if self.class_labels is None:
      return (indices % self.num_classes).astype(np.int32)
    return self.class_labels[indices % len(self.class_labels)].astype(np.int32)

  def _labels(self, batch_size: int, labels: Optional[Sequence[int]],
              batch_index: int) -> np.ndarray:
    if labels is None:
      return self.default_labels(batch_size, batch_index)
    if self.num_classes <= 0:
      raise ValueError('labels were given but this model is unconditional (num_classes=0 in '
                       f'{CARD_FILE}); leave labels=None.')
    array = np.asarray(labels)
    if array.shape != (batch_size,) or not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f'labels must be {batch_size} integer class ids (one per sample), got '
                       f'shape {array.shape} dtype {array.dtype}.')
    bad = array[(array < 0) | (array >= self.num_classes)]
    if bad.size:
      raise ValueError(f'labels {sorted(set(bad.tolist()))} are outside the classes 0..'
                       f'{self.num_classes - 1}.')
    return array.astype(np.int32)

  def _key(self, seed: Union[int, None, Any], batch_index: int) -> jax.Array:
    if seed is None:
      seed = self.default_seed
    if isinstance(seed, (int, np.integer)):
      return jax.random.fold_in(jax.random.PRNGKey(int(seed)), batch_index)
    key = seed  # A key given as is: raw uint32 data or a typed key.
    if jax.dtypes.issubdtype(getattr(key, 'dtype', None), jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    spec = self.card['inputs']['rng']
    key = np.asarray(key)
    if list(key.shape) != list(spec['shape']) or str(key.dtype) != spec['dtype']:
      raise ValueError(f'rng must be an int seed or a key of shape {tuple(spec["shape"])} '
                       f'{spec["dtype"]} (jax.random.PRNGKey), got {key.shape} {key.dtype}.')
    return key

  def sample(self, batch_size: int, seed: Union[int, None, Any] = None,
             labels: Optional[Sequence[int]] = None, *, batch_index: int = 0,
             as_uint8: bool = True) -> np.ndarray:
    """`batch_size` images [N, H, W, C]: uint8, or float32 in [-1, 1] with as_uint8=False.

    seed: an int (the key is fold_in(PRNGKey(seed), batch_index), as --mode=sample's batch
    `batch_index`), None for the run's sample.seed, or a PRNG key used as is.
    labels: class ids [N] for a class-conditional model; None = --mode=sample's labels.
    """
    if int(batch_size) < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1.')
    batch_size = int(batch_size)
    key = self._key(seed, batch_index)
    images = np.asarray(self._call(self._params, key, self._labels(batch_size, labels,
                                                                   batch_index)))
    return to_uint8(images) if as_uint8 else images


def load(export_dir: Union[str, os.PathLike]) -> Sampler:
  """Reads an export folder: card.json, then the artifact and weights after their checksums.

  Raises FileNotFoundError naming a missing file, IncompatibleExportError when this JAX cannot
  run the artifact (`check_runtime`; another jax version that can is a JaxVersionWarning) and
  ChecksumError naming a file whose sha256 differs from the card's (a corrupted or replaced
  file).
  """
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  export_dir = os.fspath(export_dir)
  paths = {name: os.path.join(export_dir, name) for name in (CARD_FILE, ARTIFACT_FILE,
                                                               WEIGHTS_FILE)}
  for name, path in paths.items():
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} is missing: {export_dir} is not a complete export '
                              '(write one with `python main.py ... --mode=export`).')
  with open(paths[CARD_FILE]) as f:
    card = json.load(f)
  if card.get('format') != CARD_FORMAT:
    raise ValueError(f'{paths[CARD_FILE]} has format {card.get("format")!r}; this loader reads '
                     f'{CARD_FORMAT!r}.')
  version_warning = check_runtime(card, paths[CARD_FILE])
  if version_warning:
    warnings.warn(version_warning, JaxVersionWarning, stacklevel=2)
  for name in (ARTIFACT_FILE, WEIGHTS_FILE):
    want, got = card['files'][name]['sha256'], sha256(paths[name])
    if got != want:
      raise ChecksumError(f'{paths[name]} has sha256 {got} but {CARD_FILE} records {want}: the '
                          'file was modified or corrupted; export again.')
  with open(paths[ARTIFACT_FILE], 'rb') as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  params = unflatten_params(safetensors_numpy.load_file(paths[WEIGHTS_FILE]))
  return Sampler(export_dir, card, exported, _as_inputs(params, exported, paths[WEIGHTS_FILE]))


def _as_inputs(params: Dict[str, Any], exported: Any, path: str) -> Dict[str, Any]:
  """`params` in the artifact's input dtypes (bfloat16 weights are stored as float32), after
  checking that their names and shapes are the ones it was exported with."""
  (want, _, _), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
  names = lambda tree: {jax.tree_util.keystr(k, simple=True, separator='/'): v
                        for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  have, want = names(params), names(want)
  if set(have) != set(want):
    raise ValueError(f'{path} does not hold the parameters the artifact was exported with: '
                     f'missing {sorted(set(want) - set(have))[:5]}, unexpected '
                     f'{sorted(set(have) - set(want))[:5]}.')
  for name, aval in want.items():
    if tuple(have[name].shape) != tuple(aval.shape):
      raise ValueError(f'{path}: {name} has shape {have[name].shape}; the artifact expects '
                       f'{tuple(aval.shape)}.')
  return unflatten_params({name: np.asarray(have[name]).astype(aval.dtype)
                     for name, aval in want.items()})
