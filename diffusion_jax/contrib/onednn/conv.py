"""oneDNN convolutions for XLA:CPU (`model.conv_backend = 'onednn'`).

XLA:CPU computes the U-Net's 3x3 convolutions, and above all their kernel gradients, 1.2-2.6x
slower than oneDNN, the library PyTorch uses on the CPU (benchmarks/RESULTS.md). This module swaps
`lax.conv_general_dilated` for three XLA FFI custom calls into oneDNN (csrc/onednn_conv.cc): the
forward convolution, its input gradient and its kernel gradient, tied together by a
`jax.custom_vjp`. The parameters, their layout and the maths are unchanged, so a checkpoint
trained with one backend loads into the other.

`model.conv_backend = 'onednn_winograd'` also lets the kernel compute the 3x3, stride-1 convolutions
of all but the smallest layers (all three directions) with Winograd's F(4x4, 3x3) algorithm: 2.25
multiplications per output instead of 9, 1.4-2.6x faster on those layers (benchmarks/RESULTS.md),
at a rounding error about 10x the direct convolution's (~1e-5 of the output's scale in float32).
csrc/onednn_conv.cc (`WinogradApplies`) says which layers qualify.

The kernel is compiled with the system C++ compiler on first use, against the jaxlib FFI headers
and the oneDNN of the `onednn` extra (`pip install 'diffusion-jax[onednn]'`), and cached under
`$XDG_CACHE_HOME/diffusion_jax` (default `~/.cache/diffusion_jax`). Under a device mesh each call
is partitioned over the batch (`custom_partitioning`): every device convolves its own rows, and the
kernel gradient is summed over the batch axes, so data parallelism over CPU devices keeps working.
CPU only: the custom calls exist for no other platform (and `jax.export` cannot serialize them).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Any, List, Optional, Sequence, Tuple

import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from diffusion_jax.parallel import sharding

INSTALL_HINT = "pip install 'diffusion-jax[onednn]' (or onednn-cpu-gomp and onednn-devel-cpu-gomp)"
_LIBRARY_DIST = 'onednn-cpu-gomp'
_HEADERS_DIST = 'onednn-devel-cpu-gomp'
_SOURCE = pathlib.Path(__file__).parent / 'csrc' / 'onednn_conv.cc'
# FFI target name -> symbol in the compiled library.
_TARGETS = {'dj_onednn_conv_forward': 'DjConvForward',
            'dj_onednn_conv_input_grad': 'DjConvInputGradient',
            'dj_onednn_conv_kernel_grad': 'DjConvKernelGradient'}
# Dimension names of each target's operands and result (custom_partitioning's sharding rule):
# b batch, h w input size, p q output size, i j kernel size, c in channels, o out channels.
_RULES = {'dj_onednn_conv_forward': 'b h w c, i j c o -> b p q o',
          'dj_onednn_conv_input_grad': 'b p q o, i j c o -> b h w c',
          'dj_onednn_conv_kernel_grad': 'b h w c, b p q o -> i j c o'}


def _dist_file(dist_name: str, suffix: str) -> Optional[pathlib.Path]:
  """The installed file of `dist_name` whose path ends with `suffix` (None if not installed)."""
  try:
    files = importlib.metadata.distribution(dist_name).files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if str(f).replace(os.sep, '/').endswith(suffix):
      return pathlib.Path(f.locate()).resolve()
  return None


def _compiler() -> Optional[str]:
  return shutil.which(os.environ['CXX']) if 'CXX' in os.environ else (
      shutil.which('g++') or shutil.which('c++'))


def unavailable_reason() -> Optional[str]:
  """Why the oneDNN backend cannot be built here, with the fix; None when it can."""
  if not sys.platform.startswith('linux'):
    return f'model.conv_backend=onednn is built for Linux only, not {sys.platform}; use xla.'
  if _dist_file(_LIBRARY_DIST, 'libdnnl.so.3') is None or _dist_file(
      _HEADERS_DIST, 'oneapi/dnnl/dnnl.hpp') is None:
    return f'model.conv_backend=onednn needs the oneDNN wheels: {INSTALL_HINT}.'
  if _compiler() is None:
    return ('model.conv_backend=onednn compiles a small C++ kernel on first use, and no compiler '
            'was found: install g++ (or set CXX), or use model.conv_backend=xla.')
  return None


def _cache_dir() -> pathlib.Path:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(root) / 'diffusion_jax'


def compile_command(source: pathlib.Path, output: pathlib.Path, shared: bool = True) -> List[str]:
  """The compiler command line that builds `source` against the jaxlib FFI headers and oneDNN
  (a shared library, or with `shared=False` a program: benchmarks/winograd_phases.py)."""
  library = _dist_file(_LIBRARY_DIST, 'libdnnl.so.3')
  headers = _dist_file(_HEADERS_DIST, 'oneapi/dnnl/dnnl.hpp').parents[2]
  return [_compiler(), '-O3', '-std=c++17', *(['-shared', '-fPIC'] if shared else []),
          '-fopenmp', str(source), '-o', str(output), '-I', jax.ffi.include_dir(), '-I',
          str(headers), str(library), f'-Wl,-rpath,{library.parent}']


def build() -> pathlib.Path:
  """Compiles csrc/onednn_conv.cc once per source, jaxlib and oneDNN; returns the shared library."""
  reason = unavailable_reason()
  if reason:
    raise RuntimeError(reason)
  library = _dist_file(_LIBRARY_DIST, 'libdnnl.so.3')
  source = _SOURCE.read_bytes()
  digest = hashlib.sha256(source + jax.ffi.include_dir().encode() + str(library).encode() +
                          importlib.metadata.version('jaxlib').encode()).hexdigest()[:16]
  target = _cache_dir() / f'onednn_conv_{digest}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = pathlib.Path(tmp) / target.name
    command = compile_command(_SOURCE, partial)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
      raise RuntimeError('Compiling the oneDNN convolution kernel failed (model.conv_backend='
                         f'onednn; use xla to go on without it):\n{" ".join(command)}\n'
                         f'{result.stderr[-4000:]}')
    os.replace(partial, target)  # Atomic: concurrent processes never load a half-written file.
  return target


@functools.cache
def _register() -> None:
  """Builds (or finds) the kernel and registers its three FFI targets for the CPU, once."""
  import ctypes  # pylint: disable=g-import-not-at-top
  lib = ctypes.cdll.LoadLibrary(str(build()))
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')


def _threads() -> int:
  """OpenMP threads per call: the usable cores shared among this process's CPU devices."""
  return max(1, sharding.usable_cores() // max(1, jax.local_device_count('cpu')))


def _call(target: str, a: jax.Array, b: jax.Array, out_shape: Tuple[int, ...],
          attrs: Tuple[Tuple[str, int], ...]) -> jax.Array:
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, a.dtype))(
      a, b, **{k: np.int64(v) for k, v in attrs})


def _partitioned(target: str):
  """`target` as a `custom_partitioning` op that keeps the batch sharding of its first operand.

  Forward and input gradient: per-device rows in, per-device rows out, kernel replicated. Kernel
  gradient: per-device partial sums, then a psum over the batch's mesh axes.
  """
  sums_over_batch = target == 'dj_onednn_conv_kernel_grad'

  @functools.partial(custom_partitioning, static_argnums=(2, 3))
  def op(a, b, out_shape, attrs):
    return _call(target, a, b, out_shape, attrs)

  def batch_axes(arg_shapes):
    spec = getattr(arg_shapes[0].sharding, 'spec', None)
    return spec[0] if spec else None

  def infer(out_shape, attrs, mesh, arg_shapes, result_shape):
    del out_shape, attrs, result_shape
    return NamedSharding(mesh, PartitionSpec() if sums_over_batch else
                         PartitionSpec(batch_axes(arg_shapes), None, None, None))

  def partition(out_shape, attrs, mesh, arg_shapes, result_shape):
    del result_shape
    axes = batch_axes(arg_shapes)
    rows = NamedSharding(mesh, PartitionSpec(axes, None, None, None))
    whole = NamedSharding(mesh, PartitionSpec())

    def lower(a, b):
      if sums_over_batch:
        out = _call(target, a, b, out_shape, attrs)
        return lax.psum(out, axes) if axes is not None else out
      return _call(target, a, b, (a.shape[0],) + tuple(out_shape[1:]), attrs)

    if sums_over_batch:
      return mesh, lower, whole, (rows, rows)
    return mesh, lower, rows, (rows, whole)

  rule = _RULES[target]
  factors = list(dict.fromkeys(rule.replace(',', ' ').replace('->', ' ').split()))
  op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                   reduction_factors=('b',) if sums_over_batch else (),
                   need_replication_factors=tuple(f for f in factors if f != 'b'))
  return op


_forward_op = _partitioned('dj_onednn_conv_forward')
_input_grad_op = _partitioned('dj_onednn_conv_input_grad')
_kernel_grad_op = _partitioned('dj_onednn_conv_kernel_grad')

Pads = Tuple[Tuple[int, int], Tuple[int, int]]


def _attrs(strides: Tuple[int, int], pads: Pads, winograd: bool) -> Tuple[Tuple[str, int], ...]:
  (top, bottom), (left, right) = pads
  return (('stride_h', strides[0]), ('stride_w', strides[1]), ('pad_top', top),
          ('pad_bottom', bottom), ('pad_left', left), ('pad_right', right),
          ('threads', _threads()), ('winograd', int(winograd)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int], pads: Pads,
           winograd: bool = False) -> jax.Array:
  """y[n, p, q, o] = sum_{i, j, c} xpad[n, p*sh + i, q*sw + j, c] kernel[i, j, c, o] (f32 NHWC/HWIO).

  `winograd`: the kernel may use Winograd's algorithm where it applies (3x3, stride 1, padding 1,
  large enough), in all three directions.
  """
  _register()
  n, h, w, _ = x.shape
  kh, kw, _, co = kernel.shape
  out_shape = (n, (h + sum(pads[0]) - kh) // strides[0] + 1,
               (w + sum(pads[1]) - kw) // strides[1] + 1, co)
  return _forward_op(x, kernel, out_shape, _attrs(strides, pads, winograd))


def _conv2d_fwd(x, kernel, strides, pads, winograd):
  return conv2d(x, kernel, strides, pads, winograd), (x, kernel)


def _conv2d_bwd(strides, pads, winograd, residuals, dy):
  x, kernel = residuals
  attrs = _attrs(strides, pads, winograd)
  return (_input_grad_op(dy, kernel, x.shape, attrs),
          _kernel_grad_op(x, dy, kernel.shape, attrs))


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None,
                         winograd: bool = False) -> jax.Array:
  """`lax.conv_general_dilated` (as `flax.linen.Conv` calls it) through oneDNN where it can be.

  oneDNN takes float32 NHWC x HWIO 2-D convolutions without dilation or groups, the U-Net's;
  anything else goes to `lax.conv_general_dilated` unchanged. `winograd`: see `conv2d`.
  """
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  plain = (lhs.ndim == 4 and feature_group_count == 1 and preferred_element_type is None and
           lhs.dtype == np.float32 and rhs.dtype == np.float32 and
           dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC')) and
           all(d == 1 for d in (lhs_dilation or (1, 1))) and
           all(d == 1 for d in (rhs_dilation or (1, 1))))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), pads, winograd)
