"""Inception features sharded over 2 processes x 2 CPU devices (gloo) equal the unsharded ones.

Each process runs `inception.make_feature_fn` on a 4-device global mesh with the same 8 images;
every process gets every row's features back (as `--mode=eval` needs for its host-side
statistics). Randomly initialised weights are enough: the sharding is under test, not the weights.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
import numpy as np
from jax.sharding import Mesh
sys.path.insert(0, sys.argv[4])
import test_fid_multiprocess as t
from diffusion_jax.evaluation import inception
mesh = Mesh(np.array(jax.devices()), ('data',))
out = inception.make_feature_fn(t.random_params(), 0, 'tf_legacy', mesh)(t.images())
np.save(sys.argv[3] + f'/pool3_p{jax.process_index()}.npy', out['pool3'])
"""


def images() -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)


def random_params():
  from diffusion_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  return inception.InceptionV3(0).init(jax.random.PRNGKey(0), np.zeros((1, 299, 299, 3),
                                                                      np.float32))['params']


def test_two_process_features_equal_one_device(tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    address = f'localhost:{s.getsockname()[1]}'
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  procs = [subprocess.Popen([sys.executable, '-c', _SCRIPT, address, str(i), str(tmp_path),
                             os.path.join(REPO, 'tests')], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]

  from diffusion_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  expected = inception.make_feature_fn(random_params(), 0, 'tf_legacy')(images())['pool3']
  assert np.std(expected) > 0  # Distinct, non-trivial features.
  for i in range(2):
    got = np.load(tmp_path / f'pool3_p{i}.npy')
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
