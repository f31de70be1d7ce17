"""Backend policy: every choice that depends on where the programs run, in one place.

The train step's maths is the same on every backend; how XLA is asked to run it is not. These
choices were measured on XLA:CPU (benchmarks/RESULTS.md, benchmarks/scan_backward_cpu.py) and
are read by the train-state init, the train step and the loops, never decided there:

* per_device_grads: on a multi-device CPU mesh with a replicated state and no dropout, each
  device takes the gradient of its own rows in a `shard_map` and the devices average it as one
  flat vector. XLA:CPU's in-process all-reduce costs ~30 us per tensor and the devices wait on
  each other in it (a sixth of a digits step on two devices): 1.15x the digits step. Not with
  dropout: inside the shard_map each device would draw its own masks, which would then depend
  on the device count. Not under FSDP (the state is sharded there).
* check_vma: that shard_map's check of varying mesh axes. On for model.conv_backend='xla'; off
  for the oneDNN backends, whose custom VJP does not annotate varying axes.
* unroll_loops: XLA:CPU runs a convolution's weight gradient inside a while loop tens of times
  slower than outside one, so on the CPU the k steps of a call and the micro-batches of
  gradient accumulation are unrolled; other backends keep rolled loops (one copy of the body to
  compile).
* skip_with_cond: a non-finite step leaves the state untouched. On the CPU a `lax.cond` does
  that in place; a `where(finite, new, old)` over the donated state makes XLA copy the old
  parameters and Adam moments every step (3x the model's size, 429 MB for cifar10_ddpm). Other
  backends keep the `where`: XLA's conditional there reads the predicate back to the host
  before the update's kernels.
* init_compiler_options: the state init runs once and is mostly inlined threefry rounds; on
  XLA:CPU, LLVM's optimisation of it took ~3x longer than without (11.4 s -> 4.3 s for the
  digits U-Net, whose run is milliseconds either way); the values agree to float rounding
  (relative 2e-7).
* serialize_programs: XLA:CPU's in-process collectives can deadlock when a program is
  dispatched on a multi-device mesh while the previous one still runs on some device (the
  tests' two-device train runs hung in the gradient all-reduce), so loops wait for each program
  before dispatching the next there (`finish_before_next_program`); elsewhere dispatch stays
  asynchronous.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
from jax.sharding import Mesh

from diffusion_jax.parallel import sharding

PyTree = Any
# model.conv_backend values whose custom VJP does not annotate varying axes (contrib/onednn).
UNANNOTATED_VJP_BACKENDS = ('onednn', 'onednn_winograd')


@dataclasses.dataclass(frozen=True)
class BackendPolicy:
  """How the train-state init, the train step and the loops run on one mesh (module docstring:
  why each choice is what it is). Build it with `policy_for(mesh, config)`."""
  per_device_grads: bool = False
  check_vma: bool = True
  unroll_loops: bool = False
  skip_with_cond: bool = False
  init_compiler_options: Tuple[Tuple[str, Any], ...] = ()
  serialize_programs: bool = False

  def compiler_options(self) -> Optional[Dict[str, Any]]:
    """`init_compiler_options` as `Lowered.compile` takes them (None: XLA's defaults)."""
    return dict(self.init_compiler_options) or None

  def finish_before_next_program(self, outputs: PyTree) -> None:
    """Waits for the last program (whose results are `outputs`) when `serialize_programs`.

    One output is waited for: every output of a program on the mesh has a shard on each device,
    ready when the program ends there, and waiting for all of a train state's leaves slowed the
    digits loop by ~5% (benchmarks/RESULTS.md).
    """
    if self.serialize_programs:
      leaves = jax.tree.leaves(outputs)
      if leaves:
        jax.block_until_ready(leaves[0])


def _active_dropout(model_config) -> float:
  """The dropout rate of the backbone `model.arch` selects (0 when its section has none)."""
  section = model_config.get(model_config.arch)
  return float(section.get('dropout', 0.0)) if section is not None else 0.0


def policy_for(mesh: Mesh, config=None) -> BackendPolicy:
  """The backend policy of `mesh` for a run of `config` (None: no model-dependent choice, as for
  a loop that only samples: a rolled, asynchronous, XLA-default program but for the CPU's
  deadlock guard)."""
  on_cpu = mesh.devices.flat[0].platform == 'cpu'
  multi_device = mesh.size > 1
  replicated_state = mesh.shape.get(sharding.FSDP_AXIS, 1) == 1
  per_device_grads = False
  check_vma = True
  if config is not None:
    per_device_grads = (on_cpu and multi_device and replicated_state
                        and _active_dropout(config.model) == 0)
    check_vma = config.model.conv_backend not in UNANNOTATED_VJP_BACKENDS
  return BackendPolicy(
      per_device_grads=per_device_grads, check_vma=check_vma, unroll_loops=on_cpu,
      skip_with_cond=on_cpu,
      init_compiler_options=(('xla_backend_optimization_level', 0),) if on_cpu else (),
      serialize_programs=on_cpu and multi_device)


def finish_before_next_program(mesh: Mesh, outputs: PyTree) -> None:
  """`policy_for(mesh).finish_before_next_program(outputs)`: for loops that dispatch program
  after program on `mesh` (the sampling and training loops), called before each dispatch."""
  policy_for(mesh).finish_before_next_program(outputs)
