"""Job specs: what a user asks for, one typed and bounded model per kind (``train``, ``serve``,
``sweep``, ``prepare``; ``base`` holds what they share: names, ``SpecError``, YAML and ``--set``),
validated before any Ray work starts, by the driver and by the control plane alike.

Import rule: torch-free and Ray-free at import, since the control plane imports every module here
(tests/unit/test_boundaries.py imports each with torch made unimportable). A spec module may import
the workers' pydantic configs, ``jobs.contracts`` and nothing from ``jobs.runtime`` or the entry points.
"""
