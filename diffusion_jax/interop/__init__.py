"""Models in and out: read PyTorch checkpoints without torch (torch_pickle.py, which treats every
file as untrusted), import and export diffusers UNet2DModel pipelines (diffusers.py) and openai
guided/improved-diffusion checkpoints (openai.py) into run directories; cli.py is
`python -m diffusion_jax.convert`."""
