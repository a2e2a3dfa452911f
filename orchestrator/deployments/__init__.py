"""Serving deployments' control loop: the reconciler that makes Ray Serve run exactly the stored
deployments (reconciler.py) and what Serve reports about them (serve_status.py). The resource's other
layers share its name: its API in api/routes/deployments.py and api/schemas/deployments.py, its rows
in store/deployments.py (the one database's, under its one write lock and migration chain)."""
