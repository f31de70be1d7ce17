"""Input: data sources, one module each behind the registry in sources.py (digits.py, folder.py,
tfds_source.py; protocol in base.py), the host-sharded, step-indexed batch stream (pipeline.py),
and the `data.*` config checks (checks.py)."""
