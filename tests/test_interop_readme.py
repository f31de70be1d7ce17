"""The README's diffusers commands (section "## Models in and out (diffusers)"), run as written.

Its bash block converts `ddpm-cifar10-32` with --config=configs/cifar10_ddpm.py, samples the run
with that same --config and exports it again. Here `ddpm-cifar10-32` is a pipeline root of a tiny
random UNet2DModel with diffusers' default options (tests/fixtures/diffusers/
unet2d_defaults_pipeline, made by make_diffusers_fixture.py), whose dropout, norm_eps,
freq_shift, flip_sin_to_cos, downsample_padding and attention heads all differ from
configs/cifar10_ddpm.py: the sample command must take the run's values, not the --config's.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
from safetensors import numpy as safetensors_numpy

from configs import cifar10_ddpm
from diffusion_jax.config import run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / 'tests' / 'fixtures' / 'diffusers' / 'unet2d_defaults_pipeline'
SECTION = '## Models in and out (diffusers)'


def readme_commands():
  """The commands of the section's first bash block: continuation lines joined, comments cut,
  each split as the shell would."""
  text = (ROOT / 'README.md').read_text()
  section = text[text.index(SECTION):]
  section = section[:section.index('\n## ', len(SECTION))]
  block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
  commands = []
  for line in block.replace('\\\n', ' ').splitlines():
    words = shlex.split(line, comments=True)
    if words:
      commands.append(words)
  return commands


def test_readme_block_is_convert_sample_export():
  """The block is the three commands this test runs, in that order."""
  commands = readme_commands()
  assert [c[:3] for c in commands] == [['python', '-m', 'diffusion_jax.convert'],
                                       ['python', 'main.py', '--config=configs/cifar10_ddpm.py'],
                                       ['python', '-m', 'diffusion_jax.convert']]
  assert '--from=diffusers' in commands[0] and '--mode=sample' in commands[1]
  assert '--to=diffusers' in commands[2]


def test_readme_commands_run_as_written_on_a_default_options_pipeline(tmp_path):
  """convert -> sample -> export exactly as the README writes them succeed on a pipeline root
  whose options are UNet2DModel's defaults; the run keeps those options (not the --config's),
  the samples are images, and the export is the source's tensors bit for bit."""
  shutil.copytree(FIXTURE, tmp_path / 'ddpm-cifar10-32')
  (tmp_path / 'configs').symlink_to(ROOT / 'configs')
  (tmp_path / 'main.py').symlink_to(ROOT / 'main.py')
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  for words in readme_commands():
    assert words[0] == 'python'
    done = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=False, timeout=900)
    assert done.returncode == 0, (words, done.stdout[-2000:], done.stderr[-4000:])

  run = run_config.load_run_config(str(tmp_path / 'runs' / 'ddpm_cifar10'))
  source = json.loads((FIXTURE / 'unet' / 'config.json').read_text())
  cifar = cifar10_ddpm.get_config()
  u = run.model.unet
  assert (u.dropout, u.norm_eps, u.downsample_padding, u.num_head_channels) == (
      source['dropout'], source['norm_eps'], source['downsample_padding'],
      source['attention_head_dim'])
  assert (run.model.flip_sin_to_cos, run.model.freq_shift) == (source['flip_sin_to_cos'],
                                                               source['freq_shift'])
  assert (u.dropout, u.norm_eps, run.model.freq_shift) != (
      cifar.model.unet.dropout, cifar.model.unet.norm_eps, cifar.model.freq_shift)
  assert run.sample.num_samples == cifar.sample.num_samples  # The override did not persist.

  [samples] = (tmp_path / 'runs' / 'ddpm_cifar10' / 'samples').glob('*/samples.npz')
  images = np.load(samples)['arr_0']
  assert images.shape == (16, 8, 8, 3) and images.dtype == np.uint8
  assert len(np.unique(images)) > 10

  exported = safetensors_numpy.load_file(
      str(tmp_path / 'exported_unet' / 'diffusion_pytorch_model.safetensors'))
  original = safetensors_numpy.load_file(
      str(FIXTURE / 'unet' / 'diffusion_pytorch_model.safetensors'))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  unet = json.loads((tmp_path / 'exported_unet' / 'config.json').read_text())
  for key, value in unet.items():
    if key in source and not key.startswith('_'):
      assert source[key] == value, key
