"""Training: the train state with EMA (train_state.py, ema.py), the jit-compiled step and the
loop around it (loop.py, hooks.py), checkpoints and resume (checkpoints.py, restore.py), post-hoc
EMA (posthoc_ema.py), the metrics log (run_log.py) and the `optim.*`/`training.*` checks."""
