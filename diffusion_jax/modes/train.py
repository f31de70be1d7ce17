"""`--mode=train`: checks the config, then trains with the in-training eval as its eval hook
(training/loop.py, evaluation/sample_metrics.py)."""

from __future__ import annotations

from diffusion_jax.evaluation import sample_metrics
from diffusion_jax.modes.validation import validate_config
from diffusion_jax.training import loop, train_state


def train_and_evaluate(config, workdir: str) -> train_state.TrainState:
  """Trains (or resumes training) as `config` says, writing everything under `workdir`;
  scores the EMA samples every training.eval_every_steps. Returns the final state (or the one
  saved when the run was preempted)."""
  validate_config(config, mode='train')
  return loop.train(config, workdir, make_evaluator=sample_metrics.TrainingEvaluator)
