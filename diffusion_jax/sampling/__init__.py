"""Samplers as single XLA loops over a denoiser: the loop (loop.py), ODE/SDE solvers registered
by `sample.sampler` name (solvers.py), Karras/EDM time grids (karras.py), classifier-free
guidance (guidance.py) and class-label batches (class_labels.py)."""
