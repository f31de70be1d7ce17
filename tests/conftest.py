"""Test set-up: 8 virtual CPU devices, so multi-device code runs on any machine.

The flag must be set before JAX initialises its backend, hence here and not in a fixture.
Tests that want one device build a one-device mesh explicitly.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# The `compile` extra installs libtpu and the CUDA plugin: tests run on the CPU backend only
# (tests/test_compile_mode.py describes TPUs and GPUs through them explicitly), and several
# workers may load libtpu at once.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One on-disk XLA compilation cache for the whole session (and the CLI subprocesses that
  tests point at it): the same tiny model is compiled once instead of once per file."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.getbasetemp() / 'jax_compilation_cache'
  path.mkdir(exist_ok=True)
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(path))
  compilation_cache.reset_cache()
  yield path
  jax.config.update('jax_compilation_cache_dir', previous)
  compilation_cache.reset_cache()
