"""Serving a checkpoint over HTTP with Ray Serve: OpenAI-compatible routes (app), the batched
KV-cache generation engine (engine), request and response schemas (schemas), int8 weights (int8).

``config`` is torch-free (the control plane validates serve specs with it); the other modules
import torch and run inside Serve replicas.
"""
