"""`python -m diffusion_jax.convert`: import diffusers / improved- and guided-diffusion models into
a run directory, and export a run as a diffusers folder.

  python -m diffusion_jax.convert --from=diffusers --source=DIR --workdir=RUN \\
      [--config=configs/cifar10_ddpm.py]   # the fields the diffusers folder does not set
      [--null_class=auto|true|false]       # class-conditional models: is the last row a null?
  python -m diffusion_jax.convert --to=diffusers --workdir=RUN --out=DIR
  python -m diffusion_jax.convert --from=openai --source=MODEL.pt --workdir=RUN \\
      --model_flags="..." [--diffusion_flags="..."]   # see interop/openai.py
  python -m diffusion_jax.convert --from=openai_classifier --source=CLASSIFIER.pt --workdir=RUN \\
      --classifier_flags="..." [--diffusion_flags="..."]   # see interop/openai_classifier.py

DIR is a UNet2DModel folder or a pipeline root (model_index.json, unet/, scheduler/). A source
that cannot be converted exactly (a weight file that is corrupt, crafted or of another model,
an option ours cannot express) ends the command with one line `convert: error: ...` naming the
tensor, key or option, exit status 1, and nothing written.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax.config import run_config
from diffusion_jax.interop import common, diffusers, openai, openai_classifier, torch_pickle

# What a bad source or run raises: reported as one line, not a traceback.
SOURCE_ERRORS = (common.ConversionError, FileNotFoundError, torch_pickle.UnsafePickleError,
                 torch_pickle.CorruptFileError, run_config.LockedFieldError)
NULL_CLASS = {'auto': None, 'true': True, 'false': False}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when it runs, so importing this module defines none)."""
  flags.DEFINE_enum('from', None, ['diffusers', 'openai', 'openai_classifier'],
                    'Import a model of this format (openai_classifier: a guided-diffusion noisy '
                    'classifier).', flag_values=flag_values)
  flags.DEFINE_enum('to', None, ['diffusers'], 'Export the run to this format.',
                    flag_values=flag_values)
  flags.DEFINE_string('source', None, '--from=diffusers: a UNet2DModel folder or pipeline root; '
                      '--from=openai: the .pt file.', flag_values=flag_values)
  flags.DEFINE_string('workdir', None, 'Run directory (written by import, read by export).',
                      flag_values=flag_values)
  flags.DEFINE_string('out', None, '--to=diffusers: the folder the export writes.',
                      flag_values=flag_values)
  flags.DEFINE_string('model_flags', None, '--from=openai: the MODEL_FLAGS string of the '
                      'improved/guided-diffusion README (diffusion flags may be included).',
                      flag_values=flag_values)
  flags.DEFINE_string('diffusion_flags', None, '--from=openai / openai_classifier: the '
                      'DIFFUSION_FLAGS string (the classifier: its noise schedule).',
                      flag_values=flag_values)
  flags.DEFINE_string('classifier_flags', None, '--from=openai_classifier: the CLASSIFIER_FLAGS '
                      'string of the guided-diffusion README (--classifier_scale included).',
                      flag_values=flag_values)
  flags.DEFINE_enum('null_class', 'auto', list(NULL_CLASS),
                    '--from=diffusers, class-conditional UNet2DModel: true = its last class '
                    'embedding row is the classifier-free-guidance null class, false = every row '
                    'is a class; auto = what the folder says (our export writes it), else false.',
                    flag_values=flag_values)
  config_flags.DEFINE_config_file(
      'config', None, 'Import: the config to start from (data, training, sampling fields); '
      'model, diffusion and data.resolution/channels come from the source. Default: '
      'diffusion_jax/config/defaults.py.', flag_values=flag_values)
  flags.mark_flags_as_required(['workdir'], flag_values=flag_values)


def one_line(error: BaseException) -> str:
  """The error's message on one line (a multi-line message's lines joined by '; ')."""
  return '; '.join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv: Sequence[str], f: Optional[flags.FlagValues] = None) -> None:
  """Runs the import or export the flags ask for; a SOURCE_ERRORS error exits 1 with one line."""
  del argv
  f = flags.FLAGS if f is None else f
  if (f['from'].value is None) == (f['to'].value is None):
    raise app.UsageError('Give exactly one of --from=diffusers|openai|openai_classifier (with '
                         '--source, --workdir) or --to=diffusers (with --workdir, --out).')
  try:
    if f['from'].value is not None:
      if not f['source'].value:
        raise app.UsageError('--from=diffusers needs --source=DIR (a UNet2DModel folder or a '
                             'pipeline root); --from=openai / openai_classifier need '
                             '--source=FILE.pt.')
      notes = []
      if f['from'].value == 'openai_classifier':
        if not f['classifier_flags'].value:
          raise app.UsageError('--from=openai_classifier needs --classifier_flags="..." (the '
                               "CLASSIFIER_FLAGS the guided-diffusion README gives).")
        config = openai_classifier.import_openai_classifier(
            f['source'].value, f['workdir'].value, f['classifier_flags'].value,
            f['diffusion_flags'].value or '', base=f['config'].value)
        c = config.model.classifier
        print(f'Imported the classifier {f["source"].value} into {f["workdir"].value}: width '
              f'{c.ch}, depth {c.num_res_blocks}, ch_mult {tuple(c.ch_mult)}, {c.pool} pool, '
              f'{config.model.num_classes} classes, {config.data.resolution}px; its config is '
              f'{f["workdir"].value}/config.json.')
        return
      if f['from'].value == 'openai':
        if not f['model_flags'].value:
          raise app.UsageError('--from=openai needs --model_flags="..." (the MODEL_FLAGS the '
                               "checkpoint's README gives).")
        config = openai.import_openai(f['source'].value, f['workdir'].value,
                                      f['model_flags'].value, f['diffusion_flags'].value or '',
                                      base=f['config'].value)
      else:
        config = diffusers.import_diffusers(f['source'].value, f['workdir'].value,
                                            base=f['config'].value,
                                            null_class=NULL_CLASS[f['null_class'].value],
                                            notes=notes)
      u = config.model.unet
      print(f'Imported {f["source"].value} into {f["workdir"].value}: ch {u.ch}, ch_mult '
            f'{tuple(u.ch_mult)}, {config.data.resolution}px; its config is '
            f'{f["workdir"].value}/config.json.')
      for note in notes:
        print(f'  note: {note}')
    else:
      if not f['out'].value:
        raise app.UsageError('--to=diffusers needs --out=DIR.')
      diffusers.export_diffusers(f['workdir'].value, f['out'].value)
      print(f'Wrote a diffusers UNet2DModel folder to {f["out"].value}')
  except SOURCE_ERRORS as e:
    print(f'convert: error: {one_line(e)}', file=sys.stderr)
    sys.exit(1)


def run() -> None:
  """The program: defines the flags and runs `main` under absl."""
  define_flags()
  app.run(main)
