"""The web dashboard's static files (``ui/``) and the Grafana dashboard (``grafana/``).

A package only so that both install as package data beside the service (editable or wheel) and the
API finds ``ui/`` with ``importlib.resources`` (orchestrator/api/routes/ui.py). No Python code."""
