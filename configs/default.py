"""The library defaults (every field, documented in diffusion_jax/config/defaults.py).

  python main.py --config=configs/default.py --workdir=runs/default

The other configs here start from these defaults and override what differs.
"""

from diffusion_jax.config import defaults


def get_config():
  return defaults.get_config()
