"""The jobs: what runs on the Ray cluster, one entry point per job kind, laid out by role.

- ``train.py``, ``serve.py``, ``sweep.py``, ``prepare.py``: the entry points, ``python -m jobs.<kind>
  --spec FILE --out DIR`` (parse the arguments, validate the spec, build, run, exit code);
- ``kinds/``: the job-kind registry, each kind's rules in one file;
- ``specs/``: each kind's spec model (torch-free);
- ``contracts/``: what the control plane and the jobs share (torch-free);
- ``runtime/``: the builders of the Ray and torch objects a job runs.

jobs/ reaches the model only through workers/; the control plane imports ``kinds``, ``specs`` and
``contracts`` only (tests/unit/test_boundaries.py).
"""
