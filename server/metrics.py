"""Prometheus metrics of the server, on an injected registry (never the global one).

Names start with ``rnnserve_``, use base units and end counters in ``_total``;
labels are model and version (plus api, method and status code where they apply),
never a session id. The catalogue, with the recording rules and dashboard built on
it, is in docs/monitoring.md.

Three sources feed it:

- the gRPC interceptor (``server/interceptor.py``): one count per RPC by api, method,
  model, version and status code; open streams; unary RPC durations;
- the core and the batchers, through hooks: every chunk by its status code, the
  latency of answered chunks only (a rejected chunk is never a latency sample),
  queue wait per step, compute time and size per batch, time to first output;
- a collector read at scrape time: queue depth, live sessions and state bytes per
  model, the configured limits beside them (for saturation ratios), model info.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from rnnserve.server.sessions import ENDED_REASONS

# Sub-millisecond to seconds, dense around the 100 ms streaming budget so that
# histogram_quantile interpolates within a few per cent of the measured value.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                   0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SLO_SECONDS = 0.1  # the streaming latency budget; a bucket boundary (rules use le="0.1")
assert SLO_SECONDS in LATENCY_BUCKETS


# why the store refused a step's write (shared.py): SessionHeld, SessionMoved,
# SessionTaken, SessionRelocated (a server on the shards' previous list, resharding online)
STORE_REFUSALS = ("held", "moved", "taken", "relocated")

class _LoopCount:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _LoopObservations:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last: +Inf
        self.sum = 0.0

    def observe(self, amount: float, n: int = 1) -> None:
        """``n`` observations of ``amount``."""
        self.counts[bisect_left(self.bounds, amount)] += n
        self.sum += amount * n


class LoopFamily(Collector):
    """A labelled counter or histogram for the per-chunk path, changed by the event loop
    thread alone: an observation is a bisect and two additions, where prometheus_client's
    takes a lock for each value it changes (several microseconds a chunk, a tenth of a
    StreamMany item's host time). Scrapes (another thread) read a copy; the exposition
    is the one prometheus_client gives (names, le labels, +Inf, _count, _sum)."""

    def __init__(self, kind: str, name: str, doc: str, labelnames: Iterable[str],
                 registry: CollectorRegistry, buckets: Iterable[float] = ()) -> None:
        self.kind, self.name, self.doc = kind, name, doc
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (
                _LoopCount() if self.kind == "counter" else _LoopObservations(self.bounds))
        return child

    def describe(self) -> Iterator[Any]:
        if self.kind == "counter":
            yield CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        else:
            yield HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)

    def collect(self) -> Iterator[Any]:
        children = list(self._children.items())
        if self.kind == "counter":
            counter = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
            for key, child in children:
                counter.add_metric(list(key), child.value)
            yield counter
            return
        histogram = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, child in children:
            counts, total, cumulative, buckets = list(child.counts), child.sum, 0, []
            for le, n in zip(self._le, counts, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            histogram.add_metric(list(key), buckets, total)
        yield histogram


@dataclass(frozen=True)
class Limits:
    """The configured limits, exported beside the values they bound."""

    max_batch_size: int
    max_queue: int
    max_sessions: int
    max_state_bytes: int


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        mv = ("model", "version")
        self.requests = Counter(
            "rnnserve_requests_total", "RPCs by api, method, model, version and status code",
            ("api", "method", "model", "version", "code"), registry=registry)
        self.request_duration = Histogram(
            "rnnserve_request_duration_seconds", "Duration of unary RPCs",
            ("api", "method"), buckets=LATENCY_BUCKETS, registry=registry)
        self.streams = Gauge("rnnserve_open_streams", "Streaming RPCs in progress",
                             ("api", "method"), registry=registry)
        # the per-chunk and per-batch series: changed by the event loop alone (LoopFamily)
        self.chunks = LoopFamily(
            "counter", "rnnserve_chunks_total",
            "Chunks by api, model, version and status code",
            ("api", "model", "version", "code"), registry)
        self.chunk_latency = LoopFamily(
            "histogram", "rnnserve_chunk_latency_seconds",
            "Server time per answered chunk, from receipt to answer (answered chunks only)",
            ("api", *mv), registry, LATENCY_BUCKETS)
        self.first_output = LoopFamily(
            "histogram", "rnnserve_time_to_first_output_seconds",
            "From opening a session to its first answered chunk", mv, registry,
            LATENCY_BUCKETS)
        self.queue_wait = LoopFamily(
            "histogram", "rnnserve_queue_wait_seconds",
            "Time each step waited for its batch to start", mv, registry, LATENCY_BUCKETS)
        self.compute = LoopFamily(
            "histogram", "rnnserve_compute_seconds", "onnxruntime time per batch run", mv,
            registry, LATENCY_BUCKETS)
        self.batch_size = LoopFamily(
            "histogram", "rnnserve_batch_size", "Session steps in one onnxruntime run", mv,
            registry, BATCH_BUCKETS)
        self.sessions_started = Counter(
            "rnnserve_sessions_started_total", "Sessions opened", mv, registry=registry)
        self.sessions_ended = Counter(
            "rnnserve_sessions_ended_total",
            "Sessions ended, by reason: closed (by the client), expired (idle), evicted (caps)",
            (*mv, "reason"), registry=registry)
        self.resumes = Counter(
            "rnnserve_session_resumes_total",
            "Sessions resumed, by where the state came from: memory (this server held it) "
            "or store (loaded from the shared session store)", (*mv, "source"),
            registry=registry)
        self.store_seconds = Histogram(
            "rnnserve_store_seconds", "Shared session store round trips that succeeded, by "
            "operation (write: one script call for the new sessions, steps and closes that "
            "are ready together; load; release; ping; move: a session handed off to its "
            "new shard while resharding online), and shard (its index in the list of store "
            "URLs, 0 for one store; fromJ: shard J of the list before an online "
            "resharding)", ("op", "shard"),
            buckets=LATENCY_BUCKETS, registry=registry)
        self.store_errors = Counter(
            "rnnserve_store_errors_total", "Shared session store operations that failed "
            "(unreachable, timed out), by operation and shard", ("op", "shard"),
            registry=registry)
        self.store_refusals = Counter(
            "rnnserve_store_refusals_total", "Step writes the session store refused, by "
            "reason: held (another server holds the lease), moved (another server advanced "
            "the session), taken (another server took a session this one served from memory "
            "while the store failed), relocated (an online resharding moved the session to "
            "another shard; this server runs with the previous list)", ("reason",),
            registry=registry)
        self.store_degraded = Counter(
            "rnnserve_store_degraded_total", "Steps and opens served from memory alone "
            "because the store failed (--store-failure degrade): not durable", ("op",),
            registry=registry)
        self.model_load_failures = Counter(
            "rnnserve_model_load_failures_total", "Failed attempts to load a model version "
            "found in the repository while serving (--repo-poll-s), by model and version: "
            "the log says why; tried again when the file changes or 5 minutes later",
            ("model", "version"), registry=registry)
        self._chunk_series: dict[tuple[str, str, int, str], tuple[Any, Any, Any]] = {}
        build = Info("rnnserve_build", "Versions of the server and what it runs on",
                     registry=registry)
        build.info(_versions())

    def add_model(self, model: str, version: int) -> None:
        """Create the per-model series at zero, so rates exist before the first event."""
        v = str(version)
        self.sessions_started.labels(model, v)
        for reason in ENDED_REASONS:
            self.sessions_ended.labels(model, v, reason)
        for source in ("memory", "store"):
            self.resumes.labels(model, v, source)

    def add_store(self, shards: int = 1) -> None:
        for shard in range(shards):
            for op in ("write", "load", "release"):
                self.store_seconds.labels(op, str(shard))
                self.store_errors.labels(op, str(shard))
        for op in ("create", "load", "checkpoint"):
            self.store_degraded.labels(op)
        for reason in STORE_REFUSALS:
            self.store_refusals.labels(reason)

    def store_hook(self, shard: int | str) -> Callable[[str, float, bool], None]:
        """The operations hook of the store's shard ``shard`` (shared.open_store: its
        index, or "fromJ" for shard J of the previous list while resharding online)."""
        seconds, errors, label = self.store_seconds, self.store_errors, str(shard)

        def hook(op: str, took: float, ok: bool) -> None:
            if ok:
                seconds.labels(op, label).observe(took)
            else:
                errors.labels(op, label).inc()
        return hook

    def store_refused(self, reason: str) -> None:
        self.store_refusals.labels(reason).inc()

    def store_degraded_hook(self, op: str) -> None:
        self.store_degraded.labels(op).inc()

    def resumed(self, model: str, version: int, source: str) -> None:
        self.resumes.labels(model, str(version), source).inc()

    def observe_chunk(self, api: str, model: str, version: int, code: str, seconds: float,
                      first: float | None, n: int = 1) -> None:
        """``n`` chunks (a packed request's answered together) by their status code;
        each answered one a latency sample of ``seconds``."""
        # the per-chunk path: label children are looked up once per label set, not per
        # chunk; latency series exist only for answered chunks
        key = (api, model, version, code)
        series = self._chunk_series.get(key)
        if series is None:
            v = str(version) if version else ""
            answered = code == "OK"
            series = self._chunk_series[key] = (
                self.chunks.labels(api, model, v, code),
                self.chunk_latency.labels(api, model, v) if answered else None,
                self.first_output.labels(model, v) if answered else None)
        count, latency, first_output = series
        count.inc(n)
        if latency is None:
            return
        latency.observe(seconds, n)
        if first is not None and first_output is not None:
            first_output.observe(first)

    def observe_rpc(self, api: str, method: str, model: str, version: int, code: str,
                    seconds: float | None) -> None:
        self.requests.labels(api, method, model, str(version) if version else "", code).inc()
        if seconds is not None:
            self.request_duration.labels(api, method).observe(seconds)

    def session_event(self, event: str, model: str, version: int) -> None:
        if event == "created":
            self.sessions_started.labels(model, str(version)).inc()
        else:
            self.sessions_ended.labels(model, str(version), event).inc()

    def batch_hook(self, model: str, version: int) -> Callable[[list[float], float], None]:
        size = self.batch_size.labels(model, str(version))
        wait = self.queue_wait.labels(model, str(version))
        compute = self.compute.labels(model, str(version))

        def on_batch(waits: list[float], seconds: float) -> None:
            size.observe(len(waits))
            last, same = None, 0  # a block's sessions waited alike: counted at once
            for w in waits:
                if w == last:
                    same += 1
                    continue
                if same:
                    wait.observe(last, same)
                last, same = w, 1
            if same:
                wait.observe(last, same)
            compute.observe(seconds)

        return on_batch


def _versions() -> dict[str, str]:
    import grpc
    import onnxruntime

    from rnnserve import __version__

    return {"version": __version__, "onnxruntime": onnxruntime.__version__,
            "grpcio": grpc.__version__, "python": platform.python_version()}


class ServingCollector(Collector):
    """Read at scrape time: per model version, queue, sessions, state and what it runs on."""

    def __init__(self, models: Callable[[], Iterable[tuple[Any, Any]]],
                 sessions: Callable[[], dict[tuple[str, int], tuple[int, int]]],
                 limits: Limits,
                 withdrawn: Callable[[], Iterable[tuple[str, int]]] = lambda: ()) -> None:
        self._models = models  # -> (runtime, batcher) pairs
        self._sessions = sessions  # -> (live sessions, state bytes) per (model, version)
        self._limits = limits
        self._withdrawn = withdrawn  # -> the versions removed from the repository

    def collect(self) -> Iterator[Any]:
        labels = ["model", "version"]
        lim = self._limits

        def family(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        depth = family("rnnserve_queue_depth", "Steps waiting for a batch")
        queue_cap = family("rnnserve_queue_capacity",
                           "Queued steps beyond which chunks get RESOURCE_EXHAUSTED")
        max_batch = family("rnnserve_max_batch_size", "Most session steps in one run")
        active = family("rnnserve_active_sessions", "Live sessions")
        state = family("rnnserve_state_bytes", "Recurrent state held for live sessions")
        pool_used = family("rnnserve_state_pool_rows",
                           "State pool rows held by live sessions and steps in flight")
        pool_cap = family("rnnserve_state_pool_capacity_rows",
                          "State pool rows allocated on the model's device (it doubles "
                          "when full)")
        load = family("rnnserve_model_load_seconds", "Time to load the model")
        info = InfoMetricFamily("rnnserve_model", "Served model versions and their provider",
                                labels=labels)
        gone = family("rnnserve_model_withdrawn", "1 for a version removed from the model "
                      "repository while serving (--repo-poll-s): requests that name no "
                      "version get another of its model's, unless all were removed; its "
                      "sessions are served until a restart")
        held = dict(self._sessions())  # one copy, made under the GIL
        withdrawn = set(self._withdrawn())
        for runtime, batcher in self._models():
            lbl = [runtime.name, str(runtime.version)]
            depth.add_metric(lbl, batcher.queue_depth)
            queue_cap.add_metric(lbl, lim.max_queue)
            max_batch.add_metric(lbl, lim.max_batch_size)
            n, nbytes = held.get(runtime.key, (0, 0))
            active.add_metric(lbl, n)
            state.add_metric(lbl, nbytes)
            pool_used.add_metric(lbl, runtime.pool.used)
            pool_cap.add_metric(lbl, runtime.pool.capacity)
            load.add_metric(lbl, runtime.load_seconds)
            gone.add_metric(lbl, 1 if runtime.key in withdrawn else 0)
            info.add_metric(lbl, {"arch": runtime.meta.arch, "task": runtime.meta.task,
                                  "input_kind": runtime.meta.input.kind,
                                  "provider": runtime.provider})
        yield from (depth, queue_cap, max_batch, active, state, pool_used, pool_cap, load, info,
                    gone)
        yield GaugeMetricFamily("rnnserve_session_capacity",
                                "Live sessions beyond which the least recently used is evicted",
                                value=lim.max_sessions)
        yield GaugeMetricFamily("rnnserve_state_bytes_capacity",
                                "State memory beyond which sessions are evicted",
                                value=lim.max_state_bytes)
