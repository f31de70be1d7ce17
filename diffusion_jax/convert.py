"""`python -m diffusion_jax.convert`: the model converters' command line (interop/cli.py)."""

from diffusion_jax.interop import cli

if __name__ == '__main__':
  cli.run()
