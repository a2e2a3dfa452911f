"""What one replica has seen, recorded in one place for both readers: Ray's metrics (the Prometheus
scrape and Grafana's serving row, workers/serving/metrics.py) and ``GET /v1/stats`` (which the
control plane reads for the web dashboard's deployment page). So the page and Grafana show the
same figures: time to first token, time per output token, queue wait, batch size, tokens per
second and requests by status.

Percentiles cover the latest ``WINDOW_ROWS`` rows (a sliding window, not since start: an operator
asks how the replica serves now); rates cover the last ``RATE_WINDOW_S`` seconds.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

from workers.serving.metrics import ServingMetrics

WINDOW_ROWS = 1000
RATE_WINDOW_S = 60.0


def _pct_ms(values: deque[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


class ReplicaFigures:
    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics
        self.started_s = time.perf_counter()
        self.ttft_s: deque[float] = deque(maxlen=WINDOW_ROWS)
        self.tpot_s: deque[float] = deque(maxlen=WINDOW_ROWS)
        self.queue_wait_s: deque[float] = deque(maxlen=WINDOW_ROWS)
        self.batch_sizes: Counter[int] = Counter()
        self.statuses: Counter[str] = Counter()
        self.recent: deque[tuple[float, int, int]] = deque()  # (when, prompt tokens, completion tokens)
        self.requests = self.rows = self.completion_tokens = self.tokens_generated = 0

    def _tokens(self, prompt: int, completion: int) -> None:
        now = time.perf_counter()
        self.recent.append((now, prompt, completion))
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def accepted(self, rows: int, prompt_tokens: int) -> None:
        """A request passed its checks and its rows are about to queue."""
        self.requests += 1
        self.rows += rows
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self._tokens(prompt_tokens, 0)

    def answered(self, route: str, status: int) -> None:
        self.statuses[str(status)] += 1
        self.metrics.requests.inc(tags={"route": route, "status": str(status)})

    def batch_started(self, waits_s: list[float]) -> None:
        self.batch_sizes[len(waits_s)] += 1
        self.metrics.batch_rows.observe(len(waits_s))
        for wait in waits_s:
            self.queue_wait_s.append(wait)
            self.metrics.queue_wait.observe(wait)

    def generated(self, tokens: int) -> None:
        """One step's tokens, over the rows still running (cancelled rows' included)."""
        self.tokens_generated += tokens
        if tokens:
            self.metrics.completion_tokens.inc(tokens)
            self._tokens(0, tokens)

    def first_token(self, since_enqueue_s: float) -> None:
        self.ttft_s.append(since_enqueue_s)
        self.metrics.ttft.observe(since_enqueue_s)

    def finished(self, completion_tokens: int, after_first_s: float) -> None:
        self.completion_tokens += completion_tokens
        if completion_tokens > 1:
            per_token = after_first_s / (completion_tokens - 1)
            self.tpot_s.append(per_token)
            self.metrics.tpot.observe(per_token)

    def snapshot(self) -> dict[str, Any]:
        """The figures of ReplicaStats (workers/serving/schemas.py), bar what the replica adds itself."""
        now = time.perf_counter()
        window = max(1e-9, min(RATE_WINDOW_S, now - self.started_s))
        recent = [r for r in self.recent if r[0] >= now - RATE_WINDOW_S]
        batches = sum(self.batch_sizes.values())
        return {
            "requests": self.requests, "rows": self.rows, "completion_tokens": self.completion_tokens,
            "tokens_generated": self.tokens_generated, "batch_sizes": dict(sorted(self.batch_sizes.items())),
            "mean_batch_rows": round(sum(k * n for k, n in self.batch_sizes.items()) / batches, 2) if batches else None,
            "ttft_ms_p50": _pct_ms(self.ttft_s, 0.5), "ttft_ms_p95": _pct_ms(self.ttft_s, 0.95),
            "tpot_ms_p50": _pct_ms(self.tpot_s, 0.5), "tpot_ms_p95": _pct_ms(self.tpot_s, 0.95),
            "queue_wait_ms_p50": _pct_ms(self.queue_wait_s, 0.5), "queue_wait_ms_p95": _pct_ms(self.queue_wait_s, 0.95),
            "prompt_tokens_per_s": round(sum(r[1] for r in recent) / window, 2),
            "completion_tokens_per_s": round(sum(r[2] for r in recent) / window, 2),
            "requests_by_status": dict(sorted(self.statuses.items())),
        }
