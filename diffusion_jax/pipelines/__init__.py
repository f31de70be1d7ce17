"""Pipelines join a network to an objective's sampler: sampler.py builds the one compiled,
sharded sampling program that train-time grids, --mode=sample, eval and export all run."""
