"""`--mode=compile`: compile a config's programs for a TPU pod on any machine, before booking it.

With `--config.compile.topology=v5p-128` (parallel/topology.py: the names users type) the mode
builds the mesh the pod would build (the same `mesh.*` fields and device-order rule as
training: `sharding.create_mesh`), lowers the train step, the grid sampler, the sampler of
--mode=sample / the in-training eval and the eval's Inception program with abstract sharded
inputs, compiles each for that TPU with libtpu, and reports per chip: the train state by kind
(parameters, optimizer state, EMA), the batch, XLA's temporaries, the total against the chip's
HBM, FLOPs per step, the collectives by kind and bytes, the compile times and XLA's own cost
model estimate of the step time and the MFU it implies. No data is read and no checkpoint is
written; the report goes to `<workdir>/compile/<topology>.json`. A program that does not fit
raises `DoesNotFitError` (exit non-zero) naming the levers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import Mesh

from diffusion_jax import objectives
from diffusion_jax.config.errors import ConfigError
from diffusion_jax.evaluation import checks as eval_checks
from diffusion_jax.evaluation import inception
from diffusion_jax.modes.validation import validate_config
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.parallel import topology as topology_lib
from diffusion_jax.pipelines import sampler
from diffusion_jax.training import hooks, loop, train_state

PyTree = Any
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
                'f8e4m3fn': 1, 'f8e5m2': 1, 's4': 1, 'u4': 1}
_SHAPE = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')


class DoesNotFitError(ConfigError):
  """A program needs more memory per chip than the chip has; `.report` is the report (its
  message: the table and the levers)."""
  report: Dict[str, Any] = {}


def compile_for_topology(config, workdir: str) -> Dict[str, Any]:
  """Compiles the programs of a run of `config` for `compile.topology` and returns the report
  (also written as JSON; `format_report` makes the table main.py prints). Raises ConfigError
  for a bad topology or config before compiling anything, and DoesNotFitError after writing
  the report when a program does not fit in HBM."""
  ccfg = config.compile
  errors = topology_lib.check_compile_config(ccfg)
  if errors:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))
  target = topology_lib.parse(ccfg.topology, ccfg.num_slices)
  platform = target.chip.platform
  try:
    devices = topology_lib.describe(target)
  except topology_lib.CompilerMissingError as e:
    raise ConfigError(str(e)) from None
  except ValueError as e:
    raise ConfigError(f'compile.topology={ccfg.topology!r}: {e}') from e
  num_hosts = len({d.process_index for d in devices})
  validate_config(config, 'train', num_devices=len(devices), num_processes=num_hosts)
  mesh = sharding.create_mesh(config.mesh, devices)
  report = {
      'topology': target.name, 'chip': dataclasses.asdict(target.chip),
      'num_chips': target.num_chips, 'num_hosts': num_hosts, 'num_slices': target.num_slices,
      'mesh': dict(mesh.shape), 'jax': jax.__version__,
      'compiler': f'{"libtpu" if platform == "tpu" else "jax-cuda12-plugin"} '
                  f'{topology_lib.compiler_version(platform)}',
      'estimate_note': ("'xla_estimated_*' come from XLA's cost model for the compiled "
                        'program, not from a measurement on the chip.'),
  }
  abstract = train_state.abstract_train_state(config, mesh)
  report['state_bytes_per_chip'] = state_bytes_per_chip(abstract)
  report['budget_bytes'], report['budget'] = topology_lib.memory_budget(target.chip)
  programs = {}
  # Executables for devices this process cannot address cannot be loaded from the persistent
  # compilation cache: keep them out of it.
  cache_was = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    if report['state_bytes_per_chip']['total'] <= report['budget_bytes']:
      for name, build in _programs(config, mesh, abstract).items():
        if name in ccfg.programs:
          programs[name] = _compile_and_measure(build, report['budget_bytes'],
                                                target.chip.peak_bf16_flops)
  finally:
    jax.config.update('jax_enable_compilation_cache', cache_was)
  report['programs'] = programs
  _add_fit(report, config, target.chip)
  out = epath.Path(workdir) / 'compile' / f'{_slug(ccfg.topology, ccfg.num_slices)}.json'
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  report['path'] = str(out)
  if not report['fits']:
    error = DoesNotFitError(format_report(report) + '\n' + _levers(report, config))
    error.report = report
    raise error
  return report


def state_bytes_per_chip(abstract: train_state.TrainState) -> Dict[str, int]:
  """Bytes one chip holds of each part of the sharded train state (from each leaf's shard
  shape): parameters, optimizer state, EMA (primary and extra) and the counters."""
  def per_chip(tree) -> int:
    return int(sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                   for a in jax.tree.leaves(tree)))
  out = {'parameters': per_chip(abstract.params), 'optimizer_state': per_chip(abstract.opt_state),
         'ema': per_chip(abstract.ema_params) + per_chip(abstract.extra_emas or {}),
         'counters': per_chip((abstract.step, abstract.num_updates))}
  out['total'] = sum(out.values())
  return out


def collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
  """Collective instructions of a compiled program's HLO, by kind: how many, and the bytes
  per chip of the full buffer each works on (all-gather: its output; reduce-scatter: its
  input; all-reduce: its operands). An async `-start` is counted once. XLA:TPU writes a
  reduce-scatter as an all-reduce inside a fused `all-reduce-scatter` computation; it is
  counted as the reduce-scatter it is. A loop body is counted once however often it runs."""
  out = {kind: {'count': 0, 'bytes': 0} for kind in COLLECTIVES}
  computation = ''
  for line in hlo_text.splitlines():
    if ' = ' not in line and line.rstrip().endswith('{'):  # A computation's header.
      computation = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      continue
    match = re.search(r'=\s*(.*?)\s(' + '|'.join(COLLECTIVES) + r')(-start)?\(', line)
    if not match:
      continue
    sizes = [_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
             for dtype, dims in _SHAPE.findall(match.group(1))]
    kind, started = match.group(2), bool(match.group(3))
    if kind == 'all-reduce' and computation.startswith('all-reduce-scatter'):
      kind = 'reduce-scatter'
    if started and kind in ('all-gather', 'collective-permute'):
      size = max(sizes, default=0)  # (operand, output[, contexts]): the output is the largest.
    else:
      size = sum(sizes)  # A combined collective returns a tuple of all its operands.
    out[kind]['count'] += 1
    out[kind]['bytes'] += size
  return out


def format_report(report: Dict[str, Any]) -> str:
  """The report as the table the mode prints."""
  gib = _bytes_text
  chip = report['chip']
  lines = [f"{report['topology']}: {report['num_chips']} chips ({chip['device_kind']}, "
           f"{gib(chip['hbm_bytes']).strip()} HBM, {chip['peak_bf16_flops'] / 1e12:g} bf16 "
           f"TFLOP/s), {report['num_hosts']} host(s), mesh {report['mesh']}, jax "
           f"{report['jax']}, {report['compiler']}",
           'Train state per chip:']
  lines += [f'  {k:18s}{gib(v)}' for k, v in report['state_bytes_per_chip'].items()]
  lines.append(f"Memory a program may use per chip: {gib(report['budget_bytes']).strip()} "
               f"({report['budget']})")
  for name, p in report['programs'].items():
    m = p['memory']
    lines.append(f"{name}: compiled in {p['compile_seconds']:.1f} s")
    lines.append(f"  arguments {gib(m['argument_bytes'])}  outputs {gib(m['output_bytes'])}  "
                 f"aliased {gib(m['alias_bytes'])}  temporaries {gib(m['temp_bytes'])}  "
                 f"code {gib(m['generated_code_bytes'])}")
    lines.append(f"  peak per chip {gib(p['peak_bytes'])} of {gib(report['budget_bytes'])}: "
                 f"headroom {gib(p['headroom_bytes'])} ({'fits' if p['fits'] else 'DOES NOT FIT'})")
    if p.get('flops_per_step') is not None:
      estimate = (f"; XLA's estimated step {p['xla_estimated_step_seconds'] * 1e3:.4g} ms -> "
                  f"estimated MFU {p['xla_estimated_mfu']:.1%} (XLA cost model, not a "
                  'measurement)' if p.get('xla_estimated_step_seconds') else
                  "; XLA gave no time estimate")
      lines.append(f"  {p['flops_per_step'] / 1e12:.4g} TFLOP per step per chip{estimate}")
    used = {k: v for k, v in p['collectives'].items() if v['count']}
    lines.append('  collectives: ' + (', '.join(
        f"{k} x{v['count']} {v['bytes'] / 2**20:.4g} MiB" for k, v in used.items()) or 'none'))
  lines.append(f"Report: {report.get('path', '')}")
  return '\n'.join(lines)


# ------------------------------------------------------------------ the programs


def _programs(config, mesh: Mesh, abstract: train_state.TrainState) -> Dict[str, Any]:
  """name -> () -> (Lowered, steps per call, resident bytes besides its arguments): each
  program a run of `config` compiles, lowered from abstract inputs only."""
  model = backbones.create_model(config.model, config.data.channels)
  k = int(config.training.steps_per_call)
  rng = _abstract_key(mesh)
  # The state stays in HBM while the samplers run; their argument is its EMA, counted there.
  state = state_bytes_per_chip(abstract)
  resident, resident_besides_ema = state['total'], state['total'] - state['ema']

  def train():
    tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
    step = train_state.make_train_step(model, tx, config, mesh, steps_per_call=k)
    return step.lower(abstract, loop.abstract_batch(config, mesh, k)), k, 0

  def sample_at(batch):
    def build():
      fn = sampler.make_sample_fn(model, config, mesh, batch)
      labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharding(mesh))
      return fn.lower(abstract.ema_params, rng, labels), None, resident_besides_ema
    return build

  def eval_features():
    ecfg = config.eval
    num_logits = inception.NUM_LOGITS if 'is' in eval_checks.as_tuple(ecfg.train_metrics) else 0
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)),
        inception.abstract_params(num_logits))
    res, channels = config.data.resolution, config.data.channels
    images = jax.ShapeDtypeStruct((ecfg.feature_batch_size, res, res, channels), jnp.uint8,
                                  sharding=sharding.batch_sharding(mesh))
    program = inception.feature_program(num_logits, ecfg.fid_resize, mesh)
    return program.lower(params, images), None, resident

  programs = {'train': train}
  if objectives.draws_samples(config.diffusion.objective):  # A noisy classifier draws none.
    programs['sample_grid'] = sample_at(hooks.grid_batch_size(config.training.num_grid_samples,
                                                              mesh.devices.size))
    programs['sample'] = sample_at(int(config.sample.batch_size))
  if any(m in eval_checks.INCEPTION_METRICS for m in eval_checks.as_tuple(
      config.eval.train_metrics)):
    programs['eval_features'] = eval_features
  return programs


def _abstract_key(mesh: Mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def _compile_and_measure(build, budget: int, peak_flops: float) -> Dict[str, Any]:
  """Lowers and compiles one program; its memory_analysis, cost_analysis and collectives."""
  start = time.perf_counter()
  lowered, steps, resident = build()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  m = {'argument_bytes': int(memory.argument_size_in_bytes),
       'output_bytes': int(memory.output_size_in_bytes),
       'alias_bytes': int(memory.alias_size_in_bytes),
       'temp_bytes': int(memory.temp_size_in_bytes),
       'generated_code_bytes': int(memory.generated_code_size_in_bytes)}
  # Live at once: inputs, the outputs not written over donated inputs, the temporaries and
  # the program; a sampler also runs next to the resident train state.
  peak = (m['argument_bytes'] + m['output_bytes'] - m['alias_bytes'] + m['temp_bytes']
          + m['generated_code_bytes'] + resident)
  out = {'memory': m, 'resident_state_bytes': resident, 'peak_bytes': peak,
         'headroom_bytes': budget - peak, 'fits': peak <= budget,
         'compile_seconds': round(seconds, 2), 'collectives': collectives(compiled.as_text())}
  cost = loop.compiled_cost(compiled)
  out['xla_flops'] = float(cost['flops']) if 'flops' in cost else None
  out['xla_bytes_accessed'] = float(cost.get('bytes accessed', 0.0))
  out['xla_estimated_seconds'] = float(cost['optimal_seconds']) if cost.get(
      'optimal_seconds', -1) > 0 else None
  if steps and out['xla_flops'] is not None:
    out['flops_per_step'] = out['xla_flops'] / steps
    if out['xla_estimated_seconds']:
      out['xla_estimated_step_seconds'] = out['xla_estimated_seconds'] / steps
      out['xla_estimated_mfu'] = out['xla_flops'] / (out['xla_estimated_seconds']
                                                     * peak_flops)
  return out


def _add_fit(report: Dict[str, Any], config, chip: topology_lib.Chip) -> None:
  state_fits = report['state_bytes_per_chip']['total'] <= report['budget_bytes']
  report['fits'] = state_fits and all(p['fits'] for p in report['programs'].values())
  report['hbm_bytes'] = chip.hbm_bytes
  report['config'] = {'model.arch': config.model.arch, 'model.param_dtype':
                      config.model.param_dtype, 'model.remat': bool(config.model.remat),
                      'training.batch_size': int(config.training.batch_size),
                      'training.grad_accum_steps': int(config.training.grad_accum_steps)}


def _levers(report: Dict[str, Any], config) -> str:
  """Which programs do not fit, by how much, and what would shrink each part."""
  gib = _bytes_text
  over = {n: p for n, p in report['programs'].items() if not p['fits']}
  lines = [f"Does not fit {report['topology']}: {gib(report['budget_bytes']).strip()} per chip "
           f"({report['budget']})."]
  state = report['state_bytes_per_chip']
  if state['total'] > report['budget_bytes']:
    lines.append(f"  the train state alone needs {gib(state['total']).strip()} per chip; nothing "
                 'was compiled.')
  lines += [f'  {n}: needs {gib(p["peak_bytes"])} per chip, {gib(-p["headroom_bytes"])} over'
            for n, p in over.items()]
  fsdp, chips = report['mesh'].get(sharding.FSDP_AXIS, 1), report['num_chips']
  lines.append('Levers:')
  if fsdp < chips:  # The smallest FSDP size whose state (if it shards evenly) fits in half.
    sizes = [f for f in range(2 * fsdp, chips + 1) if chips % f == 0]
    fit = [f for f in sizes if state['total'] * fsdp / f <= report['budget_bytes'] / 2]
    f = fit[0] if fit else chips
    lines.append(f'  mesh.fsdp={f}: shards parameters, optimizer state and EMA '
                 f'({gib(state["total"]).strip()} per chip now) {f} ways instead of {fsdp}: '
                 f'about {gib(state["total"] * fsdp / f).strip()} per chip.')
  temp = max([p['memory']['temp_bytes'] for p in report['programs'].values()], default=0)
  if not config.model.remat and temp:
    lines.append(f'  model.remat=True: recomputes activations in the backward pass '
                 f'(temporaries now up to {gib(temp).strip()} per chip).')
  per_chip = int(config.training.batch_size) // max(chips, 1)
  lines.append(f'  a smaller per-chip batch ({per_chip} now): training.batch_size, or '
               'training.grad_accum_steps > 1 for the same global batch; sample.batch_size for '
               'the samplers.')
  if str(config.model.param_dtype) == 'float32':
    lines.append('  model.param_dtype=bfloat16: halves parameter (and moment) bytes '
                 f'({gib(state["parameters"])} of parameters per chip now).')
  return '\n'.join(lines)


def _bytes_text(n: float) -> str:
  """'12.3 GiB' / '456.7 MiB' / '8.9 KiB', right-aligned."""
  for unit, size in (('GiB', 2**30), ('MiB', 2**20)):
    if abs(n) >= size:
      return f'{n / size:7.2f} {unit}'
  return f'{n / 2**10:7.2f} KiB'


def _slug(name: str, num_slices: int) -> str:
  slug = re.sub(r'[^a-z0-9]+', '_', str(name).lower()).strip('_')
  return f'{slug}_x{num_slices}' if num_slices > 1 else slug
