"""What an operator watches per deployment, exported through Ray's metrics (``ray.util.metrics``):
each replica's figures reach the node's metrics agent, which the cluster's Prometheus scrape
already reads (named ``ray_<name>``; dashboards/grafana/orch.json plots them). Every series carries
the deployment's name (``deployment``).

Why these: time to first token and time per output token are what a user of a stream feels; queue
wait splits the first from the model's work; batch size says how well batching fills the model;
tokens and requests by status are the load and its failures.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Histogram

# Latency buckets in seconds: 1 ms to 60 s.
SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
# The names as Prometheus sees them (Ray prefixes ``ray_``; histograms add _bucket/_sum/_count).
EXPORTED = ("ray_serving_ttft_seconds", "ray_serving_time_per_output_token_seconds", "ray_serving_queue_wait_seconds",
            "ray_serving_batch_rows", "ray_serving_prompt_tokens_total", "ray_serving_completion_tokens_total",
            "ray_serving_requests_total")


class ServingMetrics:
    def __init__(self, deployment: str):
        tags = {"deployment": deployment}

        def histogram(name: str, description: str, boundaries: list[float]) -> Histogram:
            h = Histogram(name, description=description, boundaries=boundaries, tag_keys=("deployment",))
            h.set_default_tags(tags)
            return h

        def counter(name: str, description: str, *keys: str) -> Counter:
            c = Counter(name, description=description, tag_keys=("deployment", *keys))
            c.set_default_tags(tags)
            return c

        self.ttft = histogram("serving_ttft_seconds", "From a row's arrival to its first token", SECONDS)
        self.tpot = histogram("serving_time_per_output_token_seconds",
                              "A finished row's time per token after its first", SECONDS)
        self.queue_wait = histogram("serving_queue_wait_seconds", "From a row's arrival to its batch's start", SECONDS)
        self.batch_rows = histogram("serving_batch_rows", "Rows in a generation batch when it starts", BATCH_ROWS)
        self.prompt_tokens = counter("serving_prompt_tokens", "Prompt tokens of accepted requests")
        self.completion_tokens = counter("serving_completion_tokens", "Tokens generated")
        self.requests = counter("serving_requests", "Requests answered, by route and HTTP status", "route", "status")
