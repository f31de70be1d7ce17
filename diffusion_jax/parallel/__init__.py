"""Devices and hosts: the mesh and sharding rules for data parallel and FSDP (sharding.py), the
per-backend compile policy (policy.py), multi-host start-up (distributed.py) and cross-host
helpers (multihost.py)."""
