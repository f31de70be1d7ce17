"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom.

Each notebook is executed in a fresh Jupyter kernel (nbclient, the `python3` kernelspec of the
environment running the tests, so the kernel imports the same installed diffusion_jax) with
`DIFFUSION_JAX_NOTEBOOK_CI=1`, which the notebooks read to shorten training and draw fewer
samples. The kernel runs in a temporary folder, so runs/ and exported files never land in the
repository. A cell that raises fails the test, as does a cell running past CELL_TIMEOUT_S.
"""

import json
import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip('nbformat', reason="the notebooks need the 'test' extra")
nbclient = pytest.importorskip('nbclient', reason="the notebooks need the 'test' extra")

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'notebooks'
NOTEBOOKS = sorted(p.name for p in NOTEBOOKS_DIR.glob('*.ipynb'))
EXPECTED = ('01_quickstart.ipynb', '02_samplers_and_guidance.ipynb',
            '03_pretrained_and_fid.ipynb', '04_scaling_to_a_pod.ipynb')
COLAB = 'https://colab.research.google.com/github/diffusion-jax/diffusion-jax/blob/main/notebooks/'
CELL_TIMEOUT_S = 900  # Generous: a shared CI machine can be several times slower than an idle one.
CI_ENV = 'DIFFUSION_JAX_NOTEBOOK_CI'


def _read(name):
  return nbformat.read(str(NOTEBOOKS_DIR / name), as_version=4)


def test_every_notebook_is_listed():
  assert NOTEBOOKS == sorted(EXPECTED)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_committed_without_outputs_and_opens_with_badge_and_install(name):
  nb = _read(name)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [], f'{name} cell {i} has outputs: strip them before committing.'
      assert cell.execution_count is None, f'{name} cell {i} has an execution count.'
  first, install = nb.cells[0], nb.cells[1]
  assert first.cell_type == 'markdown' and COLAB + name in first.source
  # The one-cell install: pip from GitHub in Colab, skipped (with a message) where installed.
  assert install.cell_type == 'code' and 'find_spec' in install.source
  assert 'git+https://github.com/diffusion-jax/diffusion-jax' in install.source
  assert 'skipping the install' in install.source


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
  nb = _read(name)
  # Checks that the kernel is this environment's Python (so it runs the diffusion_jax under
  # test), after the notebook's own cells.
  nb.cells.append(nbformat.v4.new_code_cell(
      'import json, resource, sys\nimport diffusion_jax\n'
      'cpu = resource.getrusage(resource.RUSAGE_SELF)\n'
      'print(json.dumps([sys.prefix, diffusion_jax.__file__, cpu.ru_utime + cpu.ru_stime]))'))
  env = dict(os.environ)
  env[CI_ENV] = '1'
  # tests/conftest.py forces 8 virtual CPU devices on this process; the notebooks choose
  # their own (04 sets 8 in its first cell, the others run as on a one-device Colab CPU).
  env.pop('XLA_FLAGS', None)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  start = time.time()
  client.execute(env=env)  # A cell error raises CellExecutionError: the test fails there.
  stdout = ''.join(o.get('text', '') for o in nb.cells[-1].outputs if o.output_type == 'stream')
  prefix, module, cpu_s = json.loads(stdout.strip().splitlines()[-1])
  print(f'{name}: {time.time() - start:.0f} s wall, {cpu_s:.0f} s CPU in the kernel')
  assert prefix == sys.prefix  # The same environment (a venv's prefix is its own folder).
  assert pathlib.Path(module).resolve() == (
      pathlib.Path(__file__).resolve().parents[1] / 'diffusion_jax' / '__init__.py')
  assert not (NOTEBOOKS_DIR / 'runs').exists()
