"""Runtime builders: the Ray and torch objects a job runs (the TorchTrainer and the driver's Ray
connection, the progress display, a sweep's Tuner and its trial function, a serve spec's Serve
application), for the entry points beside this package, the sweep's Tune actors, tests and benchmarks.

Import rule: modules here import Ray, Tune, Serve and torch at their top; the control plane never
imports this package (tests/unit/test_boundaries.py), and an entry point imports it inside ``main``,
once its spec is known good, so ``--help`` and a bad spec answer without loading them.
"""
