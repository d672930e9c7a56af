"""Prometheus metrics of the serving core, on an injected registry (never the global one).

Names start with ``rnnserve_``, use base units and end counters in ``_total``;
labels are model and version, never a session id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                   2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ("model", "version")
        self.batch_size = Histogram("rnnserve_batch_size", "Sessions stepped in one run",
                                    labels, buckets=BATCH_BUCKETS, registry=registry)
        self.queue_wait = Histogram("rnnserve_queue_wait_seconds",
                                    "Time the oldest step of a batch waited", labels,
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.compute = Histogram("rnnserve_compute_seconds", "onnxruntime time per batch",
                                 labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.sessions = Counter("rnnserve_sessions_total",
                                "Sessions by what happened: created, closed, expired, evicted",
                                ("model", "version", "event"), registry=registry)
        self.active_sessions = Gauge("rnnserve_active_sessions", "Live sessions",
                                     registry=registry)

    def batch_hook(self, model: str, version: int):  # type: ignore[no-untyped-def]
        size = self.batch_size.labels(model, str(version))
        wait = self.queue_wait.labels(model, str(version))
        compute = self.compute.labels(model, str(version))

        def on_batch(n: int, waited: float, seconds: float) -> None:
            size.observe(n)
            wait.observe(waited)
            compute.observe(seconds)

        return on_batch
