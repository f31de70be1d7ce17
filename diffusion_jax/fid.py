"""`python -m diffusion_jax.fid A B`: sample-quality figures of two image sets (evaluation/cli.py)."""

from diffusion_jax.evaluation import cli

if __name__ == '__main__':
  cli.main()
