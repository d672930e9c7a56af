"""Prometheus metrics of the serving core, on an injected registry (never the global one).

Names start with ``rnnserve_``, use base units and end counters in ``_total``;
labels are model and version, never a session id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

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
        self.chunk_latency = Histogram("rnnserve_chunk_latency_seconds",
                                       "Server time per answered chunk, receipt to answer",
                                       labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.first_output = Histogram("rnnserve_time_to_first_output_seconds",
                                      "From opening a session to its first answered chunk",
                                      labels, buckets=LATENCY_BUCKETS, registry=registry)

    def observe_chunk(self, runtime: Any, seconds: float, first: float | None) -> None:
        key = (runtime.name, str(runtime.version))
        self.chunk_latency.labels(*key).observe(seconds)
        if first is not None:
            self.first_output.labels(*key).observe(first)

    def batch_hook(self, model: str, version: int):  # type: ignore[no-untyped-def]
        size = self.batch_size.labels(model, str(version))
        wait = self.queue_wait.labels(model, str(version))
        compute = self.compute.labels(model, str(version))

        def on_batch(n: int, waited: float, seconds: float) -> None:
            size.observe(n)
            wait.observe(waited)
            compute.observe(seconds)

        return on_batch


class ServingCollector(Collector):
    """Read at scrape time: per model version, queue depth, state bytes and what it runs on."""

    def __init__(self, models: Callable[[], Iterable[tuple[Any, Any]]],
                 state_bytes: Callable[[], dict[tuple[str, int], int]]) -> None:
        self._models = models  # -> (runtime, batcher) pairs
        self._state_bytes = state_bytes  # -> bytes held per (model, version)

    def collect(self) -> Iterator[Any]:
        labels = ["model", "version"]
        depth = GaugeMetricFamily("rnnserve_queue_depth", "Steps waiting for a batch",
                                  labels=labels)
        state = GaugeMetricFamily("rnnserve_state_bytes", "Recurrent state held for live sessions",
                                  labels=labels)
        load = GaugeMetricFamily("rnnserve_model_load_seconds", "Time to load the model",
                                 labels=labels)
        info = InfoMetricFamily("rnnserve_model", "Served model versions", labels=labels)
        held = dict(self._state_bytes())  # one copy, made under the GIL
        for runtime, batcher in self._models():
            lbl = [runtime.name, str(runtime.version)]
            depth.add_metric(lbl, batcher.queue_depth)
            state.add_metric(lbl, held.get(runtime.key, 0))
            load.add_metric(lbl, runtime.load_seconds)
            info.add_metric(lbl, {"arch": runtime.meta.arch, "task": runtime.meta.task,
                                  "input_kind": runtime.meta.input.kind,
                                  "provider": runtime.provider})
        yield from (depth, state, load, info)
