"""Contracts: what the control plane and the jobs agree on. The records they exchange (a training
run's progress, summary and "checkpoint now" channel; a sweep's trial events), the cluster's
vocabulary and arithmetic (pools, a job's demand, a training job's size bounds), the terminal-state
marker of state enums, and the one door to Ray's private modules.

Import rule: torch-free at import, and Ray only inside ``ray_private``'s functions, since the control
plane imports every module here (tests/unit/test_boundaries.py imports each with torch made
unimportable). Nothing here imports ``jobs.runtime`` or the entry points.
"""
