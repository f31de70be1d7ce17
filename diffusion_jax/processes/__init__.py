"""Diffusion processes as pure functions with no network: the discrete-time Gaussian process
(discrete.py: schedules, q(x_t|x_0), posteriors, KLs, the continuous-time helpers) and timestep
respacing (respacing.py)."""
