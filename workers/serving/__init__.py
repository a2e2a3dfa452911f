"""Serving a checkpoint over HTTP with Ray Serve: OpenAI-compatible routes (app), the chat route's
bodies and template (chat), the batched KV-cache generation engine (engine) and its prompt-prefix
reuse (prefix), request and response schemas (schemas), log-probability shapes (logprobs), the
HTTP edges: body limit, 422 renderer (http), Ray metrics (metrics), int8 weights (int8).

``config`` is torch-free (the control plane validates serve specs with it); the other modules
import torch or Ray and run inside Serve replicas.
"""
