"""Sampling throughput of diffusion-jax, optionally side by side with a diffusers sampling loop.

  python benchmarks/sample_throughput.py --config=configs/cifar10_ddpm.py --batch_size=16 \\
      --samplers=ddim --steps=10

For each sampler in --samplers and each count in --steps, builds `sampler_lib.make_sample_fn(...)`
(the library's compiled, batch-sharded sampler; parameters are a fresh random init, which costs
the same as trained ones), measures the first call (compilation + one run) separately from the
timed calls, and prints one JSON line. Any sampler of the config's objective can be named
(`objectives.get(config.diffusion.objective).SAMPLERS`; for ddpm `solvers.SAMPLERS`); for
`ddpm`, steps 0 means all `diffusion.ddpm.num_timesteps` steps (slow on a CPU for full-size models).

With diffusers + torch installed (`--compare_diffusers`, default auto), ddim and ddpm lines also
time the same network as a `diffusers.UNet2DModel` in the scheduler loop that DDIMPipeline /
DDPMPipeline run (`DDIMScheduler` with set_alpha_to_one, clip_sample and the clipped model
output, or `DDPMScheduler` with the configured variance; our betas, our `sample.spacing`, hence
the same timesteps), under torch.inference_mode, on the same batch size. The two sides alternate
between timed calls and the line gets `ratio_ours_over_diffusers` (images/s ours over images/s
theirs; > 1 = we are faster). Configs with no like-for-like diffusers loop (other samplers,
guidance, dynamic thresholding, learned variance) get `diffusers_skipped` instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # pylint: disable=g-import-not-at-top  (also puts the repo on sys.path)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from diffusion_jax import objectives  # pylint: disable=g-import-not-at-top
from diffusion_jax.nn import backbones
from diffusion_jax.parallel import sharding
from diffusion_jax.pipelines import sampler as sampler_lib
from diffusion_jax.processes import discrete
from diffusion_jax.sampling import solvers


class DiffusersSampler:
  """The DDIMPipeline / DDPMPipeline loop, minus image post-processing, on our schedule."""

  def __init__(self, unet, config, sampler: str, steps: int, batch_size: int):
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import DDIMScheduler, DDPMScheduler  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.unet = unet.eval()
    dcfg, scfg = config.diffusion.ddpm, config.sample
    spacing = str(scfg.spacing)
    thresholding = scfg.thresholding
    if thresholding == 'auto':
      thresholding = solvers.default_thresholding(sampler)
    if not scfg.clip_denoised:
      thresholding = 'none'
    if config.diffusion.objective != 'ddpm':
      raise NotImplementedError('the diffusers loop covers diffusion.objective=ddpm only, not '
                                f'{config.diffusion.objective!r}.')
    if sampler not in ('ddim', 'ddpm'):
      raise NotImplementedError(f'no like-for-like diffusers loop for sampler {sampler!r}.')
    if dcfg.prediction_type != 'epsilon' or config.model.learn_sigma:
      raise NotImplementedError('the diffusers loop covers epsilon prediction, fixed variance.')
    if spacing not in ('leading', 'trailing', 'linspace'):
      raise NotImplementedError(f'sample.spacing={spacing!r} has no diffusers timestep_spacing.')
    if thresholding not in ('static', 'none') or float(scfg.guidance_scale) != 1.0:
      raise NotImplementedError('the diffusers loop covers static clipping without guidance.')
    betas = discrete.beta_schedule(dcfg.beta_schedule, dcfg.num_timesteps, dcfg.beta_start,
                                   dcfg.beta_end).astype(np.float32)
    common = dict(num_train_timesteps=dcfg.num_timesteps, trained_betas=betas,
                  clip_sample=thresholding == 'static', prediction_type='epsilon',
                  timestep_spacing=spacing, steps_offset=0)
    if sampler == 'ddim':
      # The same DDIM as ours: diffusers' timestep_spacing, set_alpha_to_one and
      # use_clipped_model_output from sample.*.
      self.scheduler = DDIMScheduler(set_alpha_to_one=bool(scfg.set_alpha_to_one), **common)
      self.scheduler.set_timesteps(steps)
      self.step_kwargs = dict(eta=float(scfg.eta),
                              use_clipped_model_output=bool(scfg.use_clipped_model_output))
    else:  # ddpm; steps 0 = every timestep, else the respaced schedule.
      self.scheduler = DDPMScheduler(variance_type=scfg.variance, **common)
      self.scheduler.set_timesteps(steps or dcfg.num_timesteps)
      self.step_kwargs = {}
    res, ch = config.data.resolution, config.data.channels
    self.shape = (batch_size, ch, res, res)
    self.labels = None
    if config.model.num_classes > 0:
      self.labels = torch.arange(batch_size) % config.model.num_classes
    self.generator = torch.Generator().manual_seed(config.sample.seed)

  def __call__(self):
    torch = self.torch
    with torch.inference_mode():
      x = torch.randn(self.shape, generator=self.generator)
      for t in self.scheduler.timesteps:
        eps = self.unet(x, t, class_labels=self.labels).sample
        x = self.scheduler.step(eps, t, x, generator=self.generator, **self.step_kwargs).prev_sample
      return x.clamp(-1, 1)

  def warmup(self):
    with self.torch.inference_mode():
      x = self.torch.zeros(self.shape)
      self.unet(x, self.scheduler.timesteps[0], class_labels=self.labels)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config
  batch_size, repeats = f.batch_size, f.repeats
  tt.split_cpu(config, batch_size)
  if repeats <= 0:
    raise SystemExit('--repeats must be > 0.')
  compare = tt.resolve_compare(f.compare_diffusers)

  runs = [(sampler, max(int(s), 0)) for sampler in f.samplers for s in f.steps]
  known = objectives.get(config.diffusion.objective).SAMPLERS
  for sampler, steps in runs:
    if sampler not in known:
      raise SystemExit(f'--samplers: {sampler!r} is unknown for diffusion.objective='
                       f'{config.diffusion.objective}; use some of {sorted(known)}.')
    if steps == 0 and sampler != 'ddpm':
      raise SystemExit(f'--steps must be > 0 for {sampler} (0 = all T is for ddpm only).')

  mesh = sharding.create_mesh(config.mesh)
  if batch_size % mesh.devices.size:
    raise SystemExit(f'--batch_size={batch_size} must be divisible by the '
                     f'{mesh.devices.size} devices of the mesh.')
  res, ch = config.data.resolution, config.data.channels
  model = backbones.create_model(config.model, ch)
  params = jax.jit(lambda k: backbones.init_params(model, k, (res, res, ch)),
                   out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(config.seed))
  n_params = tt.count_params(params)
  labels = np.zeros((batch_size,), np.int32)
  if config.model.num_classes > 0:
    labels = (np.arange(batch_size) % config.model.num_classes).astype(np.int32)

  # FLOPs of one network call on the whole batch (XLA's cost analysis of the compiled forward;
  # a sampler's while loop is counted once by XLA, so MFU multiplies this by its calls).
  x_probe = jax.ShapeDtypeStruct((batch_size, res, res, ch), np.float32)
  forward = jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y, train=False))
  gflops_per_eval = tt.gflops(forward.lower(params, x_probe, np.zeros((batch_size,), np.int32),
                                            labels).compile())
  if gflops_per_eval is not None:
    gflops_per_eval = round(gflops_per_eval / mesh.devices.size, 4)  # Per device.

  unet, unet_error = None, None
  if compare and tt.comparison_blocker():
    compare, unet_error = False, tt.comparison_blocker()
  if compare:
    try:
      unet, _, theirs_params = tt.build_diffusers_unet(config, f.torch_threads)
    except NotImplementedError as e:  # No UNet2DModel equivalent of this network.
      compare, unet_error = False, str(e)

  for sampler, steps in runs:
    config.sample.sampler = sampler
    config.sample.steps = steps
    # Network evaluations per sample, the objective's count: heun makes 2 per step but the
    # last, flow matching's midpoint 2 per step; ddpm 0 = all T.
    evals = objectives.get(config.diffusion.objective).network_evaluations(config)
    theirs = None
    skipped = unet_error
    if compare:
      try:
        theirs = DiffusersSampler(unet, config, sampler, steps, batch_size)
      except NotImplementedError as e:
        skipped = str(e)
    sample_fn = sampler_lib.make_sample_fn(model, config, mesh, batch_size)
    rng = jax.random.PRNGKey(config.sample.seed)
    calls = {'n': 0}

    def run_ours():
      calls['n'] += 1
      jax.block_until_ready(sample_fn(params, jax.random.fold_in(rng, calls['n']), labels))

    t0 = time.perf_counter()
    run_ours()  # Compilation + one run.
    first_call_s = time.perf_counter() - t0
    tt.log(f'ours: {sampler} {steps} steps: first call (compile + run) {first_call_s:.1f} s')
    runners = {'ours': run_ours}
    if theirs is not None:
      theirs.warmup()
      runners['diffusers'] = theirs
    times = tt.interleaved_timing(runners, repeats, 0)  # Strictly alternating.
    ours = tt.summarize(times['ours'], batch_size)
    line: Dict[str, Any] = {
        'benchmark': 'sample',
        'config': tt.config_name(tt.config_file()),
        'sampler': sampler,
        'steps': steps,
        'network_evals': evals,
        'batch_size': batch_size,
        'devices': int(mesh.devices.size),
        'platform': jax.devices()[0].platform,
        'dtype': str(config.model.dtype),
        'images_per_sec': round(ours['images_per_sec'], 3),
        'batch_s': round(ours['median_s'], 3),
        'batch_s_min': round(ours['min_s'], 3),
        'ms_per_network_eval': round(1e3 * ours['median_s'] / evals, 2),
        'first_call_s': round(first_call_s, 2),
        'gflops_per_network_eval': gflops_per_eval,
        'mfu': tt.mfu(None if gflops_per_eval is None else gflops_per_eval * evals,
                      ours['median_s'], jax.devices()[0].device_kind, str(config.model.dtype)),
        'compile_s': round(max(first_call_s - ours['median_s'], 0.0), 2),
        'params': n_params,
        'repeats': repeats,
    }
    if theirs is not None:
      th = tt.summarize(times['diffusers'], batch_size)
      line.update({
          'diffusers_params': theirs_params,
          'params_match': theirs_params == n_params,
          'diffusers_scheduler': type(theirs.scheduler).__name__,
          'diffusers_images_per_sec': round(th['images_per_sec'], 3),
          'diffusers_batch_s': round(th['median_s'], 3),
          'diffusers_batch_s_min': round(th['min_s'], 3),
          'ratio_ours_over_diffusers': round(ours['images_per_sec'] / th['images_per_sec'], 3),
          'ratio_paired_median': round(tt.paired_ratio(times['ours'], times['diffusers']), 3),
      })
    if skipped:
      line['diffusers_skipped'] = skipped
    line['versions'] = tt.library_versions(compare)
    print(json.dumps(line), flush=True)


if __name__ == '__main__':
  from absl import app, flags as absl_flags  # pylint: disable=g-import-not-at-top
  tt.define_flags(train=False)
  absl_flags.DEFINE_list('samplers', ['ddim'], 'Samplers to time (sample.sampler names of the '
                         "config's objective).")
  absl_flags.DEFINE_list('steps', ['10'], 'Step counts to time, one JSON line per sampler and '
                         'count (ddpm: 0 = all diffusion.ddpm.num_timesteps).')
  absl_flags.DEFINE_integer('repeats', 2, 'Timed sampling calls per side and line.')
  app.run(main)
