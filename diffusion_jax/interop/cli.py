"""`python -m diffusion_jax.convert`: import diffusers / improved- and guided-diffusion models into
a run directory, and export a run as a diffusers folder.

  python -m diffusion_jax.convert --from=diffusers --source=DIR --workdir=RUN \\
      [--config=configs/cifar10_ddpm.py]   # the fields the diffusers folder does not set
  python -m diffusion_jax.convert --to=diffusers --workdir=RUN --out=DIR
  python -m diffusion_jax.convert --from=openai --source=MODEL.pt --workdir=RUN \\
      --model_flags="..." [--diffusion_flags="..."]   # see interop/openai.py
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from diffusion_jax.interop import diffusers, openai, torch_pickle


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  if (f['from'].value is None) == (f.to is None):
    raise SystemExit('Give exactly one of --from=diffusers (with --source, --workdir) or '
                     '--to=diffusers (with --workdir, --out).')
  try:
    if f['from'].value is not None:
      if not f.source:
        raise app.UsageError('--from=diffusers needs --source=DIR (a UNet2DModel folder); '
                             '--from=openai needs --source=MODEL.pt.')
      if f['from'].value == 'openai':
        if not f.model_flags:
          raise app.UsageError('--from=openai needs --model_flags="..." (the MODEL_FLAGS the '
                               "checkpoint's README gives).")
        config = openai.import_openai(f.source, f.workdir, f.model_flags,
                                      f.diffusion_flags or '', base=f.config)
      else:
        config = diffusers.import_diffusers(f.source, f.workdir, base=f.config)
      print(f'Imported {f.source} into {f.workdir}: ch {config.model.unet.ch}, ch_mult '
            f'{tuple(config.model.unet.ch_mult)}, {config.data.resolution}px; its config is '
            f'{f.workdir}/config.json.')
    else:
      if not f.out:
        raise app.UsageError('--to=diffusers needs --out=DIR.')
      diffusers.export_diffusers(f.workdir, f.out)
      print(f'Wrote a diffusers UNet2DModel folder to {f.out}')
  except (diffusers.ConversionError, FileNotFoundError, torch_pickle.UnsafePickleError) as e:
    raise app.UsageError(str(e)) from e
