"""Evaluation: FID/KID/precision-recall/IS feature statistics and metrics in JAX (metrics.py,
inception.py, feature_sets.py, fid_resize.py, classifier_fd.py), sample metrics during training
(sample_metrics.py), likelihoods in bits/dim (likelihood.py, likelihood_metrics.py), and the
`eval.*` checks (checks.py)."""
