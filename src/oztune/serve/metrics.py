"""The server's counters and histograms, rendered in the Prometheus text format (version 0.0.4).

Request metrics change only in the event loop; batch metrics and texts classified in the batch workers (one
thread per model replica), under a lock.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """Cumulative-bucket histogram.

    Args:
        name: metric name.
        help: one-line description.
        buckets: increasing upper bounds (``+Inf`` is added).
    """

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip([*map(str, self.buckets), "+Inf"], self.counts):
            total += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]


class Metrics:
    """Requests by HTTP status, texts, request latency, batch sizes and times, queue depth."""

    def __init__(self):
        self.requests: Counter[int] = Counter()  # by HTTP status
        self.texts = 0  # classified: the model returned their predictions (counted in the batch workers)
        self.latency = Histogram("oztune_request_duration_seconds", "Time from request to response of POST /predict.",
                                 LATENCY_BUCKETS)
        self.batch_size = Histogram("oztune_batch_size", "Texts per batch taken from the queue (a model call may split it).",
                                    BATCH_BUCKETS)
        self.batch_time = Histogram("oztune_batch_duration_seconds", "Tokenization plus forward pass per batch.",
                                    LATENCY_BUCKETS)
        self._batch_lock = threading.Lock()

    def on_request(self, status: int, seconds: float) -> None:
        self.requests[status] += 1
        self.latency.observe(seconds)

    def on_batch(self, texts: int, seconds: float, classified: int | None = None) -> None:
        """A batch of ``texts`` texts run in ``seconds``, of which the model classified ``classified`` (the rest
        were in a model call that failed; None: all of them)."""
        with self._batch_lock:
            self.batch_size.observe(texts)
            self.batch_time.observe(seconds)
            self.texts += texts if classified is None else classified

    def render(self, queue_depth: int) -> str:
        with self._batch_lock:  # a batch worker may be halfway through on_batch: +Inf would not equal _count
            texts, batches = self.texts, self.batch_size.render() + self.batch_time.render()
        lines = ["# HELP oztune_requests_total POST /predict requests by HTTP status (499: the client disconnected "
                 "before its answer).",
                 "# TYPE oztune_requests_total counter"]
        lines += [f'oztune_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        errors = sum(n for s, n in self.requests.items() if s >= 400)
        lines += ["# HELP oztune_request_errors_total POST /predict requests with an error status (4xx, 5xx; 499 too: "
                  "clients that disconnected before their answer).",
                  "# TYPE oztune_request_errors_total counter", f"oztune_request_errors_total {errors}",
                  "# HELP oztune_texts_total Texts the model classified, whether or not the answer reached its "
                  "client (also those of clients that disconnected first, 499, or of a model call that returned "
                  "past the batch timeout, 504); not those of a model call that failed.",
                  "# TYPE oztune_texts_total counter", f"oztune_texts_total {texts}",
                  "# HELP oztune_queue_texts Texts waiting for a batch, not counting those of clients that have "
                  "disconnected (they will not be run).", "# TYPE oztune_queue_texts gauge",
                  f"oztune_queue_texts {queue_depth}"]
        lines += self.latency.render() + batches
        return "\n".join(lines) + "\n"
