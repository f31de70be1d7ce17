"""Test set-up: 8 virtual CPU devices, so multi-device code runs on any machine.

The flag must be set before JAX initialises its backend, hence here and not in a fixture.
Tests that want one device build a one-device mesh explicitly.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
