"""Train-step throughput of diffusion-jax, optionally side by side with diffusers + PyTorch.

  python benchmarks/train_throughput.py --config=configs/cifar10_ddpm.py --batch_size=16 \\
      --steps=10 --warmup=2

Builds the model, optimizer, train state and compiled train step with the library's own
functions (`backbones.create_model`, `train_state.create_optimizer / create_train_state /
make_train_step`) on a mesh of all devices, times the step after warm-up and prints one JSON line.

With `--compare_diffusers` (default: on when `diffusers` and `torch` can be imported) the same
architecture is built as a `diffusers.UNet2DModel` (its parameter count is checked against ours)
and an equivalent PyTorch train step (q_sample, forward with dropout, MSE on epsilon, backward,
global-norm clipping, Adam, EMA) is timed on the same batch in the same process. The two sides
are timed in alternating rounds, so that load from other processes on a shared machine hits both
about equally and `ratio_ours_over_diffusers` (images/s ours / images/s theirs; > 1 = we are
faster) stays meaningful even when absolute numbers move.

Any config field can be overridden: `--config.model.unet.dropout=0.0`,
`--config.model.dtype=bfloat16`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `configs` and `diffusion_jax` live at the repository root.
  sys.path.insert(0, _ROOT)

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from diffusion_jax.processes import discrete  # pylint: disable=g-import-not-at-top
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.training import train_state


# ------------------------------------------------------------------------------ shared helpers
# (sample_throughput.py imports these; flags are defined only when this file is run as a script.)


def diffusers_available() -> bool:
  """True when both diffusers and torch are installed (checked without importing them)."""
  return all(importlib.util.find_spec(m) is not None for m in ('torch', 'diffusers'))


def resolve_compare(flag_value: str) -> bool:
  """`--compare_diffusers` auto | true | false -> bool (auto: on when the packages exist)."""
  value = str(flag_value).lower()
  if value == 'auto':
    return diffusers_available()
  if value in ('1', 'true', 'yes', 'on'):
    if not diffusers_available():
      raise SystemExit('--compare_diffusers=true needs `pip install torch diffusers`.')
    return True
  if value in ('0', 'false', 'no', 'off'):
    return False
  raise SystemExit(f'--compare_diffusers={flag_value!r}: use auto, true or false.')


def comparison_blocker() -> Optional[str]:
  """Why the torch side cannot be compared like for like here, or None.

  The torch step and sampler run on the CPU only, so a ratio against a GPU/TPU run of ours
  would be meaningless.
  """
  platform = jax.devices()[0].platform
  if platform != 'cpu':
    return f'the diffusers side runs on the CPU only; ours runs on {platform}.'
  return None


def config_name(config_path: str) -> str:
  return os.path.splitext(os.path.basename(config_path))[0]


def config_file() -> str:
  """The path given to --config (without any '--config.x=y' overrides)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return config_flags.get_config_filename(flags.FLAGS['config'])


def max_rss_bytes() -> int:
  """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024)


def peak_memory() -> tuple[int, str]:
  """(bytes, source): device peak_bytes_in_use where the backend reports it, else process max RSS."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  if peaks:
    return max(peaks), 'device_memory_stats.peak_bytes_in_use (max over local devices)'
  return max_rss_bytes(), 'process_max_rss (resource.getrusage; includes XLA compilation)'


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def paired_ratio(ours_s: List[float], theirs_s: List[float]) -> float:
  """Median over call pairs of time_theirs / time_ours (= throughput ours / theirs).

  With strict alternation each pair ran under about the same machine load, so this is the
  ratio least disturbed by other processes on a shared machine.
  """
  return statistics.median(t / o for o, t in zip(ours_s, theirs_s))


def summarize(times_s: List[float], batch_size: int) -> Dict[str, float]:
  """Median-based throughput (robust to a noisy neighbour) plus mean/min for reference."""
  med = statistics.median(times_s)
  return {'median_s': med, 'mean_s': statistics.fmean(times_s), 'min_s': min(times_s),
          'images_per_sec': batch_size / med}


def log(msg: str) -> None:
  """Progress on stderr (stdout carries only the JSON lines)."""
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def interleaved_timing(runners: Dict[str, Callable[[], None]], total: int, rounds: int
                       ) -> Dict[str, List[float]]:
  """Calls each runner `total` times, alternating between them in `rounds` chunks.

  rounds <= 0 means strict alternation (one call of each per round). Each runner must block
  until its work is done; returns the per-call wall times per runner.
  """
  rounds = total if rounds <= 0 else max(1, min(rounds, total))
  chunks = [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]
  times = {name: [] for name in runners}
  for chunk in chunks:
    for name, run in runners.items():
      for _ in range(chunk):
        t0 = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - t0)
        log(f'{name}: call {len(times[name])}/{total} took {times[name][-1]:.3f} s')
  return times


def diffusers_unet_kwargs(config) -> Dict[str, Any]:
  """`diffusers.UNet2DModel` arguments for the network that `config.model` describes.

  Ours is the DDPM / ADM U-Net; diffusers' UNet2DModel with sinusoidal [sin, cos] timestep
  features (flip_sin_to_cos=False, freq_shift=1), GroupNorm eps 1e-6 and TF-style 'SAME'
  stride-2 downsampling (downsample_padding=0) is the same network (as in google/ddpm-cifar10-32).
  Raises NotImplementedError for what UNet2DModel cannot express.
  """
  m, u, res = config.model, config.model.unet, config.data.resolution
  if m.arch != 'unet':
    raise NotImplementedError(f'model.arch={m.arch!r} has no UNet2DModel equivalent (unet only).')
  if u.resblock_updown:
    raise NotImplementedError('model.unet.resblock_updown=True has no exact UNet2DModel '
                              'equivalent.')
  block_out = tuple(int(u.ch * mult) for mult in u.ch_mult)
  level_res = [res // 2**i for i in range(len(u.ch_mult))]
  attn = [r in tuple(u.attn_resolutions) for r in level_res]
  down_types = tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in attn)
  up_types = tuple('AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn))
  # Attention head size: UNet2DModel takes one head size for every attention layer.
  attn_channels = [c for c, a in zip(block_out, attn) if a] + [block_out[-1]]  # + middle block
  if u.num_head_channels > 0:
    head_dim = int(u.num_head_channels)
  elif u.num_heads == 1:
    head_dim = None  # One head of all the channels, at every level.
  else:
    dims = {c // u.num_heads for c in attn_channels}
    if len(dims) != 1:
      raise NotImplementedError(f'model.unet.num_heads={u.num_heads} gives head sizes '
                                f'{sorted(dims)}; '
                                'UNet2DModel has a single attention_head_dim.')
    head_dim = dims.pop()
  channels = config.data.channels
  kwargs = dict(
      sample_size=res, in_channels=channels,
      out_channels=channels * (2 if m.learn_sigma else 1),
      time_embedding_type='positional', flip_sin_to_cos=False, freq_shift=1,
      down_block_types=down_types, up_block_types=up_types, block_out_channels=block_out,
      layers_per_block=int(u.num_res_blocks), mid_block_scale_factor=1, downsample_padding=0,
      dropout=float(u.dropout), act_fn='silu', attention_head_dim=head_dim,
      norm_num_groups=int(u.num_groups), norm_eps=1e-6,
      resnet_time_scale_shift='scale_shift' if u.use_scale_shift_norm else 'default',
      add_attention=True)
  if m.num_classes > 0:  # Ours has one extra (null) class for classifier-free guidance.
    kwargs['num_class_embeds'] = int(m.num_classes) + 1
  return kwargs


def build_diffusers_unet(config, torch_threads: int = 0):
  """(torch module, kwargs, parameter count) of the equivalent diffusers UNet2DModel."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(torch_threads if torch_threads > 0 else (os.cpu_count() or 1))
  kwargs = diffusers_unet_kwargs(config)
  torch.manual_seed(config.seed)
  unet = UNet2DModel(**kwargs)
  return unet, kwargs, int(sum(p.numel() for p in unet.parameters()))


def library_versions(compare: bool) -> Dict[str, str]:
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  versions = {'jax': jax.__version__, 'jaxlib': getattr(jaxlib, '__version__', ''),
              'flax': flax.__version__, 'optax': optax.__version__}
  if compare:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    versions.update(torch=torch.__version__, diffusers=diffusers.__version__,
                    torch_threads=str(torch.get_num_threads()))
  return {k: v for k, v in versions.items() if v}


# ------------------------------------------------------------------------------ ours


def build_ours(config, batch_size: int):
  """(train_step, state, batch, mesh, model) built with the library's own functions."""
  mesh = sharding.create_mesh(config.mesh)
  n = mesh.devices.size
  if batch_size % n:
    raise SystemExit(f'--batch_size={batch_size} must be divisible by the {n} devices of the mesh.')
  channels, res = config.data.channels, config.data.resolution
  model = backbones.create_model(config.model, channels)
  tx = train_state.create_optimizer(config.optim, config.training.num_train_steps)
  state = train_state.create_train_state(config, mesh)
  # One optimizer step per call (training.steps_per_call > 1 would scan k steps over [k, B] data).
  train_step = train_state.make_train_step(model, tx, config, mesh, steps_per_call=1)
  images = np.random.default_rng(config.seed).uniform(
      -1.0, 1.0, (batch_size, res, res, channels)).astype(np.float32)
  batch = {'image': images}
  if config.model.num_classes > 0:
    batch['label'] = (np.arange(batch_size) % config.model.num_classes).astype(np.int32)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  return train_step, state, batch, mesh, model


def gflops(compiled) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return round(float(cost['flops']) / 1e9, 2)
  except Exception:  # pylint: disable=broad-except
    return None


# Dense peak FLOP/s per JAX device (one chip; a TPU v2/v3 core is half a chip) from the
# vendors' data sheets: (substring of device_kind, bf16 peak, fp32 peak or None when fp32 matmuls
# do not run on the matrix units at a published rate). Order matters: first match wins.
PEAK_FLOPS = (
    ('H200', 989.4e12, 66.9e12), ('H100', 989.4e12, 66.9e12),  # SXM; TF32 off for fp32.
    ('A100', 312e12, 19.5e12), ('L4', 121e12, 30.3e12),
    ('TPU v6', 918e12, None), ('TPU v5p', 459e12, None), ('TPU v5', 197e12, None),
    ('TPU v4', 275e12, None), ('TPU v3', 61.5e12, None), ('TPU v2', 22.5e12, None),
)


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """The device's dense peak FLOP/s for `dtype` ('bfloat16' / 'float32'), None when unknown
  (every CPU: its peak depends on cores, clocks and vector width, so no MFU is claimed)."""
  for name, bf16, fp32 in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else fp32
  return None


def mfu(gflops_per_call: Optional[float], seconds_per_call: float, device_kind: str,
        dtype: str) -> Optional[float]:
  """Model FLOPs utilisation: XLA's FLOP count of one call (per device, as the SPMD-partitioned
  module's cost analysis reports it) over the time of the call, divided by the device's peak."""
  peak = peak_flops(device_kind, dtype)
  if peak is None or gflops_per_call is None or seconds_per_call <= 0:
    return None
  return round(gflops_per_call * 1e9 / seconds_per_call / peak, 4)


# ------------------------------------------------------------------------------ theirs


class TorchTrainStep:
  """The PyTorch/diffusers counterpart of our train step, step for step.

  q_sample with fresh timesteps and noise, forward in train mode (dropout), mean squared error on
  epsilon, backward, clip_grad_norm_(grad_clip), Adam with the same betas/eps/learning rate, and
  an EMA update of a float32 copy of the parameters.
  """

  def __init__(self, unet, config, images_nhwc: np.ndarray, labels: Optional[np.ndarray]):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.unet = unet.train()
    if config.diffusion.objective != 'ddpm':
      raise NotImplementedError(f'the diffusers train step implements diffusion.objective=ddpm '
                                f'only, not {config.diffusion.objective!r}.')
    ocfg, dcfg = config.optim, config.diffusion.ddpm
    betas = discrete.beta_schedule(dcfg.beta_schedule, dcfg.num_timesteps, dcfg.beta_start,
                                   dcfg.beta_end)
    abar = np.cumprod(1.0 - betas)
    self.sqrt_abar = torch.tensor(np.sqrt(abar), dtype=torch.float32)
    self.sqrt_1m_abar = torch.tensor(np.sqrt(1.0 - abar), dtype=torch.float32)
    self.num_timesteps = dcfg.num_timesteps
    if (dcfg.prediction_type != 'epsilon' or dcfg.loss_weighting != 'simple'
        or config.model.learn_sigma):
      raise NotImplementedError('the diffusers train step implements epsilon prediction with the '
                                'simple (unweighted) loss and a fixed variance only.')
    if int(config.training.grad_accum_steps) != 1:
      raise NotImplementedError('the diffusers train step has no gradient accumulation.')
    if ocfg.optimizer == 'adamw':
      self.opt = torch.optim.AdamW(unet.parameters(), lr=ocfg.learning_rate,
                                   betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps,
                                   weight_decay=ocfg.weight_decay)
    else:
      self.opt = torch.optim.Adam(unet.parameters(), lr=ocfg.learning_rate,
                                  betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps)
    self.grad_clip = ocfg.grad_clip
    self.ema_decay = ocfg.ema_decay
    self.params = [p for p in unet.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    self.x0 = torch.from_numpy(np.array(images_nhwc.transpose(0, 3, 1, 2), np.float32))
    self.labels = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    self.generator = torch.Generator().manual_seed(config.seed)

  def __call__(self) -> float:
    torch = self.torch
    x0 = self.x0
    b = x0.shape[0]
    t = torch.randint(0, self.num_timesteps, (b,), generator=self.generator)
    noise = torch.randn(x0.shape, generator=self.generator)
    x_t = (self.sqrt_abar[t].view(b, 1, 1, 1) * x0 +
           self.sqrt_1m_abar[t].view(b, 1, 1, 1) * noise)
    out = self.unet(x_t, t, class_labels=self.labels).sample
    loss = torch.nn.functional.mse_loss(out, noise)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - self.ema_decay)  # pylint: disable=protected-access
    return loss.detach().item()  # Synchronous on CPU anyway; .item() makes sure it is done.


# ------------------------------------------------------------------------------ main


def split_cpu(config, batch_size: int) -> None:
  """Splits the CPU into XLA devices as `main.py` does (`mesh.cpu_devices`; 0 = one per core
  that `batch_size` splits over), before JAX starts its backend; `--config.mesh.cpu_devices=1`
  times one device."""
  sharding.configure_cpu_devices(config.mesh, [batch_size])


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config
  batch_size, steps, warmup = f.batch_size, f.steps, f.warmup
  split_cpu(config, batch_size)
  if steps <= 0 or warmup < 0:
    raise SystemExit('--steps must be > 0 and --warmup >= 0.')
  compare = resolve_compare(f.compare_diffusers)

  result: Dict[str, Any] = {}
  if compare and comparison_blocker():
    compare, result['diffusers_skipped'] = False, comparison_blocker()
  train_step, state, batch, mesh, _ = build_ours(config, batch_size)
  n_params = count_params(state.params)

  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  log(f'ours: compiled in {compile_s:.1f} s; {n_params:,} parameters')
  holder = {'state': state}

  def run_ours():
    new_state, metrics = compiled(holder['state'], batch)
    jax.block_until_ready((new_state, metrics))
    holder['state'] = new_state

  for _ in range(warmup):
    run_ours()
  # Peak memory of our side, taken before torch is imported so that RSS is ours alone.
  peak_bytes, memory_source = peak_memory()

  runners = {'ours': run_ours}
  if compare:
    try:
      unet, kwargs, theirs_params = build_diffusers_unet(config, f.torch_threads)
      images = np.asarray(jax.device_get(batch['image']))
      labels = np.asarray(jax.device_get(batch['label'])) if 'label' in batch else None
      log(f'diffusers: UNet2DModel with {theirs_params:,} parameters')
      torch_step = TorchTrainStep(unet, config, images, labels)
    except NotImplementedError as e:  # This config has no like-for-like diffusers counterpart.
      compare, result['diffusers_skipped'] = False, str(e)
    else:
      for _ in range(warmup):
        torch_step()
      runners['diffusers'] = torch_step
      result['diffusers_params'] = theirs_params
      result['params_match'] = theirs_params == n_params
      result['diffusers_unet_kwargs'] = kwargs

  times = interleaved_timing(runners, steps, f.rounds)
  ours = summarize(times['ours'], batch_size)
  step_gflops = gflops(compiled)
  line: Dict[str, Any] = {
      'benchmark': 'train_step',
      'config': config_name(config_file()),
      'batch_size': batch_size,
      'devices': int(mesh.devices.size),
      'platform': jax.devices()[0].platform,
      'device_kind': jax.devices()[0].device_kind,
      'dtype': str(config.model.dtype),
      'images_per_sec': round(ours['images_per_sec'], 3),
      'step_ms': round(1e3 * ours['median_s'], 2),
      'step_ms_mean': round(1e3 * ours['mean_s'], 2),
      'step_ms_min': round(1e3 * ours['min_s'], 2),
      'compile_s': round(compile_s, 2),
      'gflops_per_step': step_gflops,
      'mfu': mfu(step_gflops, ours['median_s'], jax.devices()[0].device_kind,
                 str(config.model.dtype)),
      'peak_memory_bytes': peak_bytes,
      'memory_source': memory_source,
      'params': n_params,
      'steps': steps, 'warmup': warmup, 'rounds': f.rounds,
  }
  if compare:
    theirs = summarize(times['diffusers'], batch_size)
    line.update({
        'diffusers_params': result['diffusers_params'],
        'params_match': result['params_match'],
        'diffusers_images_per_sec': round(theirs['images_per_sec'], 3),
        'diffusers_step_ms': round(1e3 * theirs['median_s'], 2),
        'diffusers_step_ms_mean': round(1e3 * theirs['mean_s'], 2),
        'diffusers_step_ms_min': round(1e3 * theirs['min_s'], 2),
        'ratio_ours_over_diffusers': round(ours['images_per_sec'] / theirs['images_per_sec'], 3),
        'ratio_paired_median': round(paired_ratio(times['ours'], times['diffusers']), 3),
        'diffusers_peak_rss_bytes_whole_process': max_rss_bytes(),
    })
    if f.print_kwargs:
      line['diffusers_unet_kwargs'] = result['diffusers_unet_kwargs']
  if 'diffusers_skipped' in result:
    line['diffusers_skipped'] = result['diffusers_skipped']
  line['versions'] = library_versions(compare)
  if compare and not line['params_match']:
    print(f'WARNING: parameter counts differ: ours {n_params:,}, diffusers '
          f'{line["diffusers_params"]:,}; the comparison is not like for like.', file=sys.stderr)
  print(f'params: ours {n_params:,}' + (f', diffusers {line["diffusers_params"]:,}'
                                         if compare else ''), file=sys.stderr)
  print(json.dumps(line), flush=True)


def define_flags(default_config: str = 'configs/cifar10_ddpm.py', train: bool = True):
  """Flags shared by both benchmarks (--rounds and --print_kwargs only with `train`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', os.path.join(_ROOT, default_config),
                                  'Path to an ml_collections config file.', lock_config=True)
  flags.DEFINE_integer('batch_size', 16, 'Global batch size (split over all devices).')
  flags.DEFINE_string('compare_diffusers', 'auto',
                      'auto | true | false: also time diffusers.UNet2DModel in PyTorch.')
  flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads for the diffusers side '
                       '(0 = os.cpu_count()).')
  if not train:
    return
  flags.DEFINE_integer('rounds', 0, 'Timed calls are split into this many alternating rounds '
                       '(ours x n, theirs x n, ...); 0 = strict alternation, one call each.')
  flags.DEFINE_bool('print_kwargs', False, 'Add the UNet2DModel arguments to the JSON line.')


if __name__ == '__main__':
  from absl import app, flags as absl_flags  # pylint: disable=g-import-not-at-top
  define_flags()
  absl_flags.DEFINE_integer('steps', 10, 'Timed train steps (per side).')
  absl_flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation (per side).')
  app.run(main)
