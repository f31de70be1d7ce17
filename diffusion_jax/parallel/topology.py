"""Pods described without their chips: the chip table and the names users type for a slice.

`describe(parse('v5p-128'))` gives the device list JAX would see on that pod, built by the
accelerator's own compiler plugin with no accelerator present (`jax.experimental.topologies`;
the `compile` extra: libtpu for TPUs, the CUDA plugin without its NVIDIA libraries for GPUs),
so a program can be lowered and compiled for the pod on a laptop CPU (modes/compile.py).

Names: `<kind>-<n>` is the Cloud TPU accelerator type. Its number counts TensorCores for v4
and v5p (two per chip: v5p-128 is 64 chips) and chips for v5e and v6e (v5e-256 is 256 chips),
as `gcloud compute tpus` does; `<kind>:<AxB[xC]>` names the chip grid itself. GPUs are
`h100-<n>` / `h200-<n>`: n GPUs, 8 per host (n = 1, 2, 4 or a multiple of 8).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

GiB, MiB = 2**30, 2**20


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator kind, from its vendor's published per-chip figures."""
  kind: str                  # 'v5p', 'h100'
  platform: str              # 'tpu' | 'cuda'
  device_kind: str           # What jax.Device.device_kind reports: 'TPU v5'.
  hbm_bytes: int             # Memory per chip.
  peak_bf16_flops: float     # Dense bf16 FLOP/s per chip.
  hbm_bandwidth: float       # Bytes/s per chip.
  ici_bandwidth: float       # Bidirectional chip-to-chip bytes/s per chip (ICI; NVLink).
  cores_per_chip: int = 1    # TensorCores per chip (the accelerator type counts cores if 2).
  grid_rank: int = 2         # TPU torus: 2 (v5e, v6e) or 3 (v4, v5p); GPUs: hosts x GPUs.
  chips_per_host: int = 8    # Chips one host drives in a multi-host slice.


CHIPS: Dict[str, Chip] = {
    'v4': Chip('v4', 'tpu', 'TPU v4', 32 * GiB, 275e12, 1200e9, 600e9, 2, 3, 4),
    'v5e': Chip('v5e', 'tpu', 'TPU v5 lite', 16 * GiB, 197e12, 819e9, 400e9, 1, 2, 8),
    'v5p': Chip('v5p', 'tpu', 'TPU v5', 95 * GiB, 459e12, 2765e9, 1200e9, 2, 3, 4),
    'v6e': Chip('v6e', 'tpu', 'TPU v6 lite', 32 * GiB, 918e12, 1640e9, 800e9, 1, 2, 8),
    # SXM parts; memory is what the driver reports as the device's total.
    'h100': Chip('h100', 'cuda', 'NVIDIA H100 80GB HBM3', 81559 * MiB, 989e12, 3352e9, 900e9),
    'h200': Chip('h200', 'cuda', 'NVIDIA H200', 143771 * MiB, 989e12, 4800e9, 900e9),
}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'trillium': 'v6e'}

# The chip grid Cloud TPU builds for a chip count (the default slice shape of each size).
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)}

# What the CUDA compiler needs to know of a GPU it cannot query (Hopper GH100, SXM5): its
# streaming multiprocessors, caches and limits. H100 and H200 share the die.
_HOPPER = {'core_count': 132, 'clock_rate_ghz': 1.98, 'l2_cache_size': 50 * MiB,
           'shared_memory_per_core': 228 * 1024, 'shared_memory_per_block_optin': 227 * 1024,
           'shared_memory_per_block': 48 * 1024, 'threads_per_core_limit': 2048,
           'threads_per_block_limit': 1024, 'threads_per_warp': 32, 'fpus_per_core': 128,
           'registers_per_core_limit': 65536, 'registers_per_block_limit': 65536,
           'block_dim_limit_x': 2**31 - 1, 'block_dim_limit_y': 65535,
           'block_dim_limit_z': 65535, 'compute_capability': (9, 0)}

INSTALL_HINT = ("pip install -e '.[compile]' (libtpu and the CUDA compiler plugin, about "
                '400 MB; no TPU or GPU needed to compile for one)')
# What --mode=compile can compile (modes/compile.py); eval_features only when the in-training
# eval has an Inception metric.
PROGRAMS = ('train', 'sample_grid', 'sample', 'eval_features')


class CompilerMissingError(RuntimeError):
  """The compiler plugin that describes a topology's chips is not installed (the message says
  how to install it)."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """A parsed topology: the chip kind, its grid and how many such slices (DCN between)."""
  chip: Chip
  grid: Tuple[int, ...]      # TPU: the chip torus; GPU: (hosts, GPUs per host).
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.grid)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def accelerator_type(self) -> str:
    """'v5p-128' (TensorCores for v4/v5p), 'v5e-16', 'h100-16'."""
    return f'{self.chip.kind}-{self.chips_per_slice * self.chip.cores_per_chip}'

  @property
  def name(self) -> str:
    """The accelerator type with its grid and slice count: 'v5p-128 (4x4x4) x 2 slices'."""
    grid = 'x'.join(map(str, self.grid))
    slices = f' x {self.num_slices} slices' if self.num_slices > 1 else ''
    return f'{self.accelerator_type} ({grid}){slices}'


def examples() -> List[str]:
  """Names `parse` accepts, for error messages."""
  return ['v4-32', 'v5e-256', 'v5p-128', 'v6e-64', 'v5e:4x4', 'v5p:4x4x8', 'h100-8',
          'h200-16']


def parse(name: str, num_slices: int = 1) -> Slice:
  """'v5p-128' / 'v5litepod-16' / 'v6e:8x8' / 'h100-16' -> Slice; ValueError naming the
  valid forms."""
  text = str(name).strip().lower()
  match = re.fullmatch(r'([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+){1,2}))', text)
  kind = _ALIASES.get(match.group(1), match.group(1)) if match else None
  if kind not in CHIPS:
    raise ValueError(
        f'compile.topology={name!r} is not a known topology; use <kind>-<count> or '
        f'<kind>:<grid> with kind one of {tuple(CHIPS)}, e.g. {", ".join(examples())}.')
  chip = CHIPS[kind]
  if num_slices < 1:
    raise ValueError(f'compile.num_slices={num_slices} must be >= 1.')
  if chip.platform == 'cuda':
    return _parse_gpus(name, chip, match.group(2), num_slices)
  grids = _GRIDS_3D if chip.grid_rank == 3 else _GRIDS_2D
  if match.group(2):
    count = int(match.group(2))
    chips, rest = divmod(count, chip.cores_per_chip)
    if rest or chips not in grids:
      unit = 'TensorCores (2 per chip)' if chip.cores_per_chip == 2 else 'chips'
      sizes = ', '.join(f'{kind}-{n * chip.cores_per_chip}' for n in sorted(grids))
      raise ValueError(f'compile.topology={name!r}: the number after {kind}- counts {unit}; '
                       f'Cloud TPU slices are {sizes} (or name a grid: {kind}:AxB'
                       f'{"xC" if chip.grid_rank == 3 else ""}).')
    return Slice(chip, grids[chips], num_slices)
  grid = tuple(int(s) for s in match.group(3).split('x'))
  if len(grid) != chip.grid_rank or min(grid) < 1:
    shape = 'AxBxC (3D torus)' if chip.grid_rank == 3 else 'AxB (2D torus)'
    raise ValueError(f'compile.topology={name!r}: {kind} slices are {shape} chip grids, '
                     f'e.g. {kind}:{"x".join(map(str, grids[16]))}.')
  return Slice(chip, grid, num_slices)


def _parse_gpus(name: str, chip: Chip, count: Optional[str], num_slices: int) -> Slice:
  n = int(count) if count else 0
  per_host = chip.chips_per_host
  if n < 1 or (n > per_host and n % per_host) or (n < per_host and per_host % n):
    raise ValueError(f'compile.topology={name!r}: name GPUs as {chip.kind}-<n>, n = 1, 2, 4 '
                     f'or a multiple of {per_host} ({per_host} per host), e.g. {chip.kind}-16.')
  if num_slices != 1:
    raise ValueError(f'compile.num_slices={num_slices}: GPU clusters have no slices; name the '
                     f'GPUs of all hosts ({chip.kind}-{n * num_slices}).')
  return Slice(chip, (max(n // per_host, 1), min(n, per_host)))


def compiler_available(platform: str) -> bool:
  """Whether the compiler plugin that describes `platform` ('tpu', 'cuda') is installed."""
  module = 'libtpu' if platform == 'tpu' else 'jax_cuda12_plugin'
  return importlib.util.find_spec(module) is not None


def compiler_version(platform: str) -> Optional[str]:
  """The installed libtpu's / CUDA plugin's version (None when it is not installed)."""
  try:
    return importlib.metadata.version('libtpu' if platform == 'tpu' else 'jax-cuda12-plugin')
  except importlib.metadata.PackageNotFoundError:
    return None


def describe(topology: Slice) -> Sequence:
  """The devices of `topology` as its compiler plugin describes them (no accelerator needed):
  what `jax.devices()` would return on the pod, with process_index (and a TPU's coords and
  slice_index).

  Raises CompilerMissingError with the install command when the plugin is missing, and
  ValueError when it cannot describe the topology (a grid it does not know, multi-slice
  support).
  """
  platform = topology.chip.platform
  if not compiler_available(platform):
    raise CompilerMissingError(f'--mode=compile needs the {platform} compiler plugin to '
                               f'describe {topology.accelerator_type}: {INSTALL_HINT}.')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if platform == 'tpu':
    kwargs = _tpu_options(topology)
  else:
    kwargs = {'target_config': _gpu_target_config(topology.chip),
              'topology': f'1x{topology.grid[0]}x{topology.grid[1]}'}
  try:
    desc = topologies.get_topology_desc(platform=platform, **kwargs)
  except Exception as e:  # The plugin's own error: an unknown grid or unsupported option.
    raise ValueError(f'the {platform} plugin cannot describe {topology.name}: {e}') from e
  devices = list(desc.devices)
  if len(devices) != topology.num_chips:
    raise ValueError(f'the {platform} plugin described {len(devices)} devices for '
                     f'{topology.name}, not {topology.num_chips}.')
  return devices


def _tpu_options(topology: Slice) -> Dict[str, object]:
  """get_topology_desc's options for a TPU slice: grid, host bounds, megacore, slices."""
  # Off a TPU VM libtpu warns about the accelerator type and workers it cannot look up; say
  # what the pod would (a TPU VM sets these itself, and wins).
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', topology.accelerator_type)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  host = min(topology.chip.chips_per_host, topology.chips_per_slice)
  host_bounds = {1: (1, 1, 1), 4: (2, 2, 1)}.get(host, (2, 4, 1))
  if topology.chip.grid_rank == 2 and topology.grid[1] < host_bounds[1]:
    host_bounds = (2, 2, 1)
  grid = 'x'.join(map(str, topology.grid + (1,) * (3 - len(topology.grid))))
  options: Dict[str, object] = {'topology_name': f'{topology.chip.kind}:{grid}',
                                'chips_per_host_bounds': host_bounds}
  if topology.chip.kind == 'v4':
    options['chip_config_name'] = 'megacore'  # One JAX device per v4 chip, as on the pod.
  if topology.num_slices > 1:
    options['num_slices'] = topology.num_slices
  return options


def _gpu_target_config(chip: Chip) -> str:
  """The GpuTargetConfig (text proto) the CUDA compiler reads instead of querying a GPU."""
  info = dict(_HOPPER)
  major, minor = info.pop('compute_capability')
  fields = ''.join(f'  {k}: {v}\n' for k, v in sorted(info.items()))
  return (f'gpu_device_info {{\n{fields}  memory_bandwidth: {int(chip.hbm_bandwidth)}\n'
          f'  device_memory_size: {chip.hbm_bytes}\n'
          f'  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n'
          f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 }}\n'
          f'device_description_str: "{chip.device_kind}"\n')


def memory_budget(chip: Chip) -> Tuple[int, str]:
  """(bytes a JAX program may use on `chip`, why): all of a TPU's HBM; on a GPU the share
  JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75, unless preallocation
  is off)."""
  if chip.platform != 'cuda':
    return chip.hbm_bytes, 'the chip\'s HBM'
  if os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE', '').lower() == 'false':
    return chip.hbm_bytes, 'all of it (XLA_PYTHON_CLIENT_PREALLOCATE=false)'
  fraction = float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.75'))
  return int(chip.hbm_bytes * fraction), (f'{fraction:g} of it (JAX preallocates that share; '
                                          'XLA_PYTHON_CLIENT_MEM_FRACTION sets it)')


def check_compile_config(compile_config) -> List[str]:
  """Problems with `config.compile` (empty list = fine), before anything is compiled."""
  errors = []
  if not compile_config.topology:
    errors.append('compile.topology is empty; name the pod to compile for, e.g. '
                  f'--config.compile.topology=v5p-128 (forms: {", ".join(examples())}).')
  else:
    try:
      parse(compile_config.topology, int(compile_config.num_slices))
    except ValueError as e:
      errors.append(str(e))
  unknown = [p for p in compile_config.programs if p not in PROGRAMS]
  if unknown or not compile_config.programs:
    errors.append(f'compile.programs={tuple(compile_config.programs)} must be a non-empty '
                  f'subset of {PROGRAMS}.')
  return errors
