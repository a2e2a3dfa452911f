"""Local development: a Ray head on this machine for ``orch up`` without RAY_ADDRESS (head.py), and the
fake multi-node autoscaler that adds real raylets on this machine as worker nodes (autoscale.py)."""
