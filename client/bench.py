"""``rnnserve bench``: real-time streams swept over concurrency, with a latency plot.

For each number of concurrent streams, every stream sends one chunk per chunk
duration (open loop, see ``client/load.py``) for ``duration_s``; the report gives
the chunk latency percentiles (p50, p90, p99, p99.9, max, measured from when each
chunk was due), the throughput, the errors by status code and the chunks that went
out late, and the capacity: the most streams served with p99 <= 100 ms and no error.
A closed-loop run (each stream sends as soon as it is answered) gives the
throughput at saturation. It writes ``bench.json`` and ``bench.png``.

With ``--baselines`` the same invocation also measures, on the same machine with
the same messages: the transport ceiling (``client/echo.py``: the API with no
model; its levels and a closed loop, with the echo server's CPU per chunk), rnnserve
unbatched (max batch size 1), and the compute ceiling (onnxruntime alone running full
batches in a loop), and prints the ratios.

The server is one already running (``--server``) or one this command starts on
127.0.0.1 from a model repository (``--repo``, or a reference ``--workload`` built
on first use) and stops at the end. The load runs in ``--load-procs`` processes;
the report says how busy the busiest was, so a saturated load generator is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from rnnserve.client.client import AsyncClient, Data, add_many_item, new_session_id, status_of
from rnnserve.client.load import LoadGenerator, LoadResult
from rnnserve.errors import RnnserveError
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

BUDGET_S = 0.1  # capacity: p99 within this, and no errors
SKEW_NOTE = 0.05  # of a level's duration: a later start of a load process is noted
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
START_TIMEOUT_S = 120.0  # for a started server to print its ready line
BUSY = 0.85  # a load process this busy (CPU / wall) may be what limits the figures

# The reference workloads of docs/DESIGN: (arch, input, hidden size, layers, chunk).
# speech-tiny is speech-small's input and front end on an 8-unit LSTM: its compute is
# next to nothing, so it measures the host's part of a chunk (what a GPU leaves to it).
WORKLOADS = {
    "speech-small": ("lstm", "pcm16", 256, 2, 40),
    "speech-large": ("lstm", "pcm16", 768, 3, 40),
    "text-small": ("gru", "bytes", 512, 2, 16),
    "speech-tiny": ("lstm", "pcm16", 8, 1, 40),
}


@dataclass
class Level:
    streams: int
    duration_s: float
    answered: int
    sessions: int
    late: int
    unsent: int  # chunks due but never sent: the stream fell more than 2 s behind
    errors: dict[str, int]
    throughput: float  # answered chunks per second
    latency_ms: dict[str, float]  # p50, p90, p99, p99.9, max
    load_busy: float  # the busiest load process: CPU time / wall time
    timeline: list[tuple[float, float]] = field(default_factory=list, repr=False)
    p99_repeats: list[float] = field(default_factory=list)  # every repeat's p99 (ms)
    # streams per server worker process, by index (empty: one process)
    worker_streams: list[int] = field(default_factory=list)
    # seconds between the first and the last load process's start (one connected late):
    # they overlapped for duration_s less this
    start_skew_s: float = 0.0
    # CPU per answered chunk over the run's window, where the bench runs the processes:
    # the server's (every thread and worker process) and its redis-servers' together
    server_cpu_us_per_chunk: float | None = None
    redis_cpu_us_per_chunk: float | None = None

    @property
    def within_budget(self) -> bool:
        return not self.errors and not self.unsent and self.answered > 0 and \
            self.latency_ms["p99"] <= BUDGET_S * 1000


def chunk_maker(meta: pb.ModelMetadata, chunk_ms: int, chunk_bytes: int,
                seed: int = 0) -> tuple[Callable[[int], Data], bool]:
    """A function giving chunk k for this model, and whether chunks are PCM16 bytes.

    Audio: ``chunk_ms`` of noise at the model's rate; features: one frame per hop
    (10 ms unless the metadata says otherwise); text: ``chunk_bytes`` bytes of prose.
    """
    rng = np.random.default_rng(seed)
    if meta.input_kind == "pcm16":
        n = meta.sample_rate * chunk_ms // 1000
        if meta.hop_samples:
            n -= n % meta.hop_samples
        pool = [(rng.standard_normal(n) * 3000).astype("<i2").tobytes() for _ in range(8)]
        return (lambda k: pool[k % len(pool)]), True
    if meta.input_kind == "features":
        hop_ms = 1000 * meta.hop_samples / meta.sample_rate if meta.sample_rate else 10.0
        frames = max(1, round(chunk_ms / hop_ms))
        shape = [frames, *[d if d > 0 else 1 for d in meta.input.shape[1:]]]
        feats = [rng.standard_normal(shape).astype(np.float32) for _ in range(8)]
        return (lambda k: feats[k % len(feats)]), False
    text = (b"Streaming recurrent models keep their state between chunks, so every "
            b"session costs memory but each step is cheap. ")
    text *= chunk_bytes // len(text) + 2
    pieces = [text[i:i + chunk_bytes] for i in range(0, len(text) - chunk_bytes, chunk_bytes)]
    return (lambda k: pieces[k % len(pieces)]), False


def summarize(streams: int, duration_s: float, result: LoadResult) -> Level:
    lat = np.asarray(result.latencies) * 1000
    pct = {f"p{q:g}": float(np.percentile(lat, q)) if lat.size else float("nan")
           for q in PERCENTILES}
    pct["max"] = float(lat.max()) if lat.size else float("nan")
    # over the time the answers actually took: a server that falls behind answers the
    # last chunks due in the window after it, and that time counts too
    elapsed = max(duration_s, result.ended - result.started)
    return Level(streams, duration_s, result.answered, result.sessions, result.late,
                 result.unsent, dict(result.errors), result.answered / elapsed, pct,
                 round(result.busy, 3),
                 timeline=list(zip(result.times, result.latencies, strict=True)),
                 worker_streams=[result.workers.get(i, 0)
                                 for i in range(max(result.workers) + 1)]
                 if len(result.workers) > 1 else [],
                 start_skew_s=round(max(0.0, result.latest_start - result.started), 3)
                 if result.started else 0.0)


async def fetch_metadata(server: str, model: str, version: int) -> pb.ModelMetadata:
    """The model's metadata; a server that cannot give it (unreachable, no such model)
    is the bench's one-line error, with its status."""
    async with AsyncClient(server, timeout=30) as client:
        try:
            return await client.model_metadata(model, version)
        except grpc.aio.AioRpcError as exc:
            raise RnnserveError(f"model {model!r} at {server}: {exc.code().name}: "
                                f"{exc.details()}") from None


async def server_workers(server: str) -> int:
    """How many worker processes the server runs (1 when it does not say)."""
    async with AsyncClient(server, timeout=30) as client:
        where = await client.worker()
    return where[1] if where is not None and where[1] > 0 else 1


def sweep(gen: LoadGenerator, targets: dict[str, str], meta: pb.ModelMetadata,
          levels: list[int], duration_s: float, chunk_ms: int, chunk_bytes: int,
          log: Callable[[str], None], repeats: int = 1,
          pids: dict[str, tuple[list[int], list[int]]] | None = None
          ) -> dict[str, list[Level]]:
    """Each level on each target (servers running side by side), ``repeats`` times,
    the targets taking turns, so that a slow minute on a shared machine hits them
    alike. Per level and target the repeat with the median p99 stands for the level,
    with every repeat's errors and unsent chunks counted in it and every repeat's p99
    kept. A target is left out of the higher levels once far beyond capacity.
    ``pids``: per target, the server's process and its redis-servers, whose CPU per
    answered chunk each level then reports."""
    blob = meta.SerializeToString()
    out: dict[str, list[Level]] = {name: [] for name in targets}
    live = dict(targets)
    tagged = len(targets) > 1 or repeats > 1
    for n in levels:
        runs: dict[str, list[Level]] = {name: [] for name in live}
        for r in range(repeats):
            for name, target in live.items():
                server_pids, redis_pids = (pids or {}).get(name, ([], []))
                with CpuSampler(*server_pids) as server_cpu, \
                        CpuSampler(*redis_pids) as redis_cpu:
                    result = gen.run(target, meta.name, blob, streams=n, chunk_ms=chunk_ms,
                                     chunk_bytes=chunk_bytes, duration_s=duration_s)
                level = replace(summarize(n, duration_s, result),
                                server_cpu_us_per_chunk=server_cpu.per_chunk(result),
                                redis_cpu_us_per_chunk=redis_cpu.per_chunk(result))
                runs[name].append(level)
                if tagged:
                    log(f"{row(level)}  [{name}{f' {r + 1}/{repeats}' if repeats > 1 else ''}]")
        for name, done in runs.items():
            level = median_level(done)
            out[name].append(level)
            if not tagged:
                log(row(level))
            skew = level.start_skew_s  # the most of its repeats (median_level)
            if skew > SKEW_NOTE * duration_s:
                log(f"{'':>8} note: a load process of {name} started {skew:.2f} s after "
                    f"the first: the load overlapped for {max(0.0, duration_s - skew):.2f} "
                    f"of {duration_s:g} s (a slow machine? fewer --load-procs)")
            if level.unsent or level.latency_ms["p99"] > 10 * BUDGET_S * 1000:
                del live[name]
                rest = [m for m in levels if m > n]
                if rest:
                    log(f"{'':>8} {name}: skipped {', '.join(map(str, rest))}: far beyond "
                        "capacity already")
        if not live:
            break
    return out


def median_level(repeats: list[Level]) -> Level:
    """The repeat with the median p99 (the upper one of an even count), charged with
    every repeat's errors and unsent chunks: a level with an error anywhere is never
    within budget."""
    ordered = sorted(repeats, key=lambda lv: lv.latency_ms["p99"])
    mid = ordered[len(ordered) // 2]
    return replace(mid, errors=_all_errors(repeats), unsent=sum(lv.unsent for lv in repeats),
                   p99_repeats=[lv.latency_ms["p99"] for lv in repeats],
                   start_skew_s=max(lv.start_skew_s for lv in repeats))


def _all_errors(levels: list[Level]) -> dict[str, int]:
    """Every run's errors, by status code."""
    errors: dict[str, int] = {}
    for lv in levels:
        for code, k in lv.errors.items():
            errors[code] = errors.get(code, 0) + k
    return errors


ClosedRun = tuple[Level, float]  # a closed loop's run and when it started (wall clock)


def paired_median(tries: dict[str, list[ClosedRun]],
                  ratio: Callable[[Level, Level], float | None]) -> float | None:
    """The median (the lower of an even count) of a ratio of rnnserve's closed-loop run
    to the echo server's of the same round; None when a round has none."""
    got = [ratio(a, b) for (a, _), (b, _) in zip(tries["rnnserve"], tries["transport"],
                                                 strict=True)]
    if any(r is None for r in got):
        return None
    return _lower_median([r for r in got if r is not None], key=lambda r: r)


def median_closed(runs: list[ClosedRun]) -> ClosedRun:
    """Of a closed loop's repeats, the one with the median throughput (the lower one of
    an even count), charged with every repeat's errors."""
    level, started = _lower_median(runs, key=lambda t: t[0].throughput)
    return replace(level, errors=_all_errors([lv for lv, _ in runs])), started


T = TypeVar("T")


def _lower_median(items: list[T], key: Callable[[T], float]) -> T:
    """The item with the median key, the lower one of an even count."""
    return sorted(items, key=key)[(len(items) - 1) // 2]


SOAK_FRACTION = 0.7  # of the capacity found, when --soak-streams is not given


def soak(gen: LoadGenerator, target: str, pid: int | None, meta: pb.ModelMetadata,
         streams: int, duration_s: float, chunk_ms: int, chunk_bytes: int,
         log: Callable[[str], None], window_s: float = 30.0) -> dict[str, Any]:
    """One long level: errors, p50/p99 per window, and the server's resident memory
    every 2 s (when it runs here). Sessions are renewed every 250 chunks meanwhile, so
    opens and closes go on all along. Verdict: no error, every window's p99 within the
    budget, and memory at the end within 5% (or 16 MiB) of where the first window left
    it."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while pid is not None and not stop.wait(2.0):
            with contextlib.suppress(OSError, RnnserveError):
                samples.append((time.monotonic() - t0, rss_bytes(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = gen.run(target, meta.name, meta.SerializeToString(), streams=streams,
                         chunk_ms=chunk_ms, chunk_bytes=chunk_bytes, duration_s=duration_s)
    finally:
        stop.set()
        sampler.join()
    t, lat = np.asarray(result.times), np.asarray(result.latencies) * 1000
    windows = []
    for w0 in np.arange(0.0, duration_s, window_s):
        m = (t >= w0) & (t < w0 + window_s)
        if m.any():
            windows.append({"from_s": float(w0), "chunks": int(m.sum()),
                            "p50_ms": float(np.percentile(lat[m], 50)),
                            "p99_ms": float(np.percentile(lat[m], 99))})
    memory = None
    if samples:
        first = next((r for at, r in samples if at >= window_s), samples[-1][1])
        last, peak = samples[-1][1], max(r for _, r in samples)
        memory = {"after_first_window_mib": first / 2**20, "end_mib": last / 2**20,
                  "max_mib": peak / 2**20, "samples": len(samples),
                  "flat": last - first <= max(16 << 20, first // 20)}
    p99s = [w["p99_ms"] for w in windows]
    report = {
        "streams": streams, "duration_s": duration_s, "window_s": window_s,
        "answered": result.answered, "errors": dict(result.errors), "unsent": result.unsent,
        "windows": windows, "memory": memory,
        "p99_ms": {"min": min(p99s, default=float("nan")),
                   "max": max(p99s, default=float("nan"))},
    }
    report["ok"] = bool(not result.errors and not result.unsent and p99s and
                        max(p99s) <= BUDGET_S * 1000 and (memory is None or memory["flat"]))
    log(f"\nsoak: {streams} streams for {duration_s:g} s: {result.answered} chunks, errors "
        f"{dict(result.errors) or 'none'}; p99 per {window_s:g} s window "
        + ", ".join(f"{p:.0f}" for p in p99s) + " ms"
        + (f"; server memory {memory['after_first_window_mib']:.0f} -> "
           f"{memory['end_mib']:.0f} MiB (max {memory['max_mib']:.0f})" if memory else "")
        + f": {'ok' if report['ok'] else 'NOT ok'}")
    return report


HEADER = (f"{'streams':>8} {'chunks/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'p99.9 ms':>9} {'max ms':>8} {'late':>6} {'load':>5}  errors")


def row(level: Level) -> str:
    ms = level.latency_ms
    errors = ", ".join(f"{k} {v}" for k, v in sorted(level.errors.items())) or "-"
    if level.unsent:
        errors = f"{level.unsent} unsent; {errors}"
    spread = level.worker_streams
    where = (f"  [streams per worker {min(spread)}..{max(spread)}]" if spread else "")
    cpu = [f"{who} {us:.0f} us" for who, us in (("server", level.server_cpu_us_per_chunk),
                                                 ("redis", level.redis_cpu_us_per_chunk))
           if us is not None]
    where += f"  [CPU per chunk: {', '.join(cpu)}]" if cpu else ""
    return (f"{level.streams:>8} {level.throughput:>9.1f} {ms['p50']:>8.2f} {ms['p90']:>8.2f} "
            f"{ms['p99']:>8.2f} {ms['p99.9']:>9.2f} {ms['max']:>8.2f} {level.late:>6} "
            f"{level.load_busy:>5.2f}  {errors}{where}")


def capacity(levels: list[Level]) -> int:
    """The most streams of a level within budget whose every smaller level was within
    budget too (0 when the smallest was not): a level that passes above one that failed
    passed by luck of the run, and a fleet sized from it would run where a smaller load
    measurably failed."""
    best = 0
    for lv in sorted(levels, key=lambda lv: lv.streams):
        if not lv.within_budget:
            break
        best = lv.streams
    return best


def capacity_capped(levels: list[Level]) -> bool:
    """Whether every level passed: the capacity is then the top level run, a lower
    bound, not where the budget ends."""
    return bool(levels) and capacity(levels) == max(lv.streams for lv in levels)


def _bound(num_capped: bool, den_capped: bool) -> str:
    """What a ratio of two capacities is when either is only a lower bound."""
    if num_capped and den_capped:
        return "unknown"
    return "at least" if num_capped else "at most" if den_capped else "exact"


def plot(report: dict[str, Any], runs: dict[str, list[Level]], path: Path) -> None:
    """Left: p50/p99 and throughput against streams, for rnnserve and each baseline;
    right: every chunk's latency over time at rnnserve's capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, tl) = plt.subplots(1, 2, figsize=(13, 4.8))
    tp = ax.twinx()
    styles = {"rnnserve": "-", "transport": "--", "unbatched": ":"}
    for name, levels in runs.items():
        xs = [lv.streams for lv in levels]
        style = styles.get(name, "-.")
        for key, color in (("p50", "tab:blue"), ("p99", "tab:red")):
            ax.plot(xs, [lv.latency_ms[key] for lv in levels], marker="o", markersize=3,
                    linestyle=style, color=color, label=f"{name} {key}")
        tp.plot(xs, [lv.throughput for lv in levels], linestyle=style, color="grey",
                marker="s", markersize=3, label=f"{name} chunks/s")
    ax.axhline(BUDGET_S * 1000, color="black", linewidth=0.8, label="100 ms budget")
    every = sorted({lv.streams for levels in runs.values() for lv in levels})
    ax.set_xscale("log", base=2)
    ax.set_xticks(every, [str(x) for x in every])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("concurrent real-time streams")
    ax.set_ylabel("chunk latency (ms)")
    tp.set_ylabel("answered chunks per second")
    ax.set_title(f"{report['model']} ({report['arch']}, {report['input_kind']}), "
                 f"{report['chunk_ms']} ms chunks: capacity "
                 f"{'at least ' if report['capacity_is_lower_bound'] else ''}"
                 f"{report['capacity_streams']}")
    lines, more = ax.get_legend_handles_labels(), tp.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=7)
    cap = report["capacity_streams"]
    top = next((lv for lv in runs["rnnserve"] if lv.streams == cap),
               runs["rnnserve"][0])  # the capacity level (the first when none passed)
    if top.timeline:
        t, lat = zip(*top.timeline, strict=True)
        tl.scatter(t, np.asarray(lat) * 1000, s=2, alpha=0.4)
        tl.axhline(top.latency_ms["p99"], color="orange", linewidth=1,
                   label=f"p99 {top.latency_ms['p99']:.1f} ms")
        tl.legend(loc="upper right", fontsize=8)
    tl.set_yscale("log")
    tl.set_xlabel("seconds since the level started")
    tl.set_ylabel("chunk latency (ms)")
    tl.set_title(f"rnnserve at capacity: every chunk's latency, {top.streams} streams")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Spawned:
    """A server process on 127.0.0.1 that prints a JSON ready line with its gRPC port."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
        try:
            line = self._ready_line(START_TIMEOUT_S)
            if not line:
                raise RnnserveError(f"the server did not start; see {log_path}")
            try:
                ready = json.loads(line)
                self.target = f"127.0.0.1:{ready['grpc_port']}"
                self.metrics_port: int | None = ready.get("metrics_port")
            except (ValueError, KeyError, TypeError, AttributeError):
                raise RnnserveError(f"the server did not start: it printed {line.strip()!r} "
                                    f"instead of its ready line; see {log_path}") from None
        except BaseException:
            self.proc.kill()  # nothing to drain: it never served
            self.proc.wait()
            self._log.close()
            raise

    def _ready_line(self, timeout_s: float) -> str:
        """The first line the server prints, or "" if none comes within ``timeout_s``."""
        stdout = self.proc.stdout
        assert stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if reader.is_alive():
            raise RnnserveError(f"the server did not start within {timeout_s:g} s")
        return lines[0]

    @classmethod
    def rnnserve(cls, repo: str, flags: list[str], log_path: Path) -> Spawned:
        return cls([sys.executable, "-m", "rnnserve", "serve", "--repo", repo, "--host",
                    "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", *flags], log_path)

    def chunks_answered(self) -> int:
        """The chunks the server answered OK so far (its Prometheus endpoint)."""
        import urllib.request

        if not self.metrics_port:
            raise RnnserveError("the server gave no metrics port")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("rnnserve_chunks_total{") and 'code="OK"' in line))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class RedisProcess:
    """A throw-away redis-server on 127.0.0.1 without persistence (for --redis-store and
    the tests); ``stop`` and ``start`` again to play an outage on the same port."""

    def __init__(self, workdir: Path) -> None:
        import socket

        binary = shutil.which("redis-server")
        if binary is None:
            raise RnnserveError("redis-server is missing (apt-get install redis-server)")
        self.binary, self.workdir = binary, workdir
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import socket

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RnnserveError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def as_array(data: Data, meta: pb.ModelMetadata) -> np.ndarray:
    if isinstance(data, bytes):
        return np.frombuffer(data, dtype="<i2" if meta.input_kind == "pcm16" else np.uint8)
    return np.asarray(data)


def compute_ceiling(model_path: Path, meta: pb.ModelMetadata, batch: int, chunk_ms: int,
                    chunk_bytes: int, seconds: float, threads: int) -> dict[str, Any]:
    """onnxruntime alone: full batches of one chunk per session, back to back, no gRPC,
    through the server's own runtime on the server's device (the states gathered from
    and scattered into the state pool there, as the server does)."""
    from rnnserve.server.runtime import CUDA, ModelRuntime, RuntimeOptions

    device = "cuda" if meta.execution_provider == CUDA else "cpu"
    rt = ModelRuntime(model_path, meta.name, meta.version,
                      RuntimeOptions(device=device, intra_op_threads=threads))
    chunk, _ = chunk_maker(meta, chunk_ms, chunk_bytes)
    x = as_array(chunk(0), meta).astype(rt.meta.input.dtype)
    return {**runs_back_to_back(rt, [x] * batch, seconds, chunk_ms), "provider": rt.provider}


def runs_back_to_back(rt: Any, xs: list[np.ndarray], seconds: float, chunk_ms: int = 40,
                      warm_up: int = 1) -> dict[str, Any]:
    """Runs of the chunks ``xs`` (one per session) through ``rt.run_rows`` back to back
    for ``seconds``, each session's state carried from one run to the next in the pool;
    ``warm_up`` runs first (a CUDA graph's capture among them). ``host_cpu_ms`` is the
    process's CPU time per run (every thread): on a GPU, the host's share of a run
    (stacking and copying chunks, launching, and waiting, which CUDA may do spinning)."""
    batch = len(xs)
    rows = [[rt.pool.alloc() for _ in range(batch)] for _ in range(2)]
    for k in range(warm_up):
        rt.run_rows(xs, rows[k % 2], rows[(k + 1) % 2])
    runs, times, started, cpu = 0, [], time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - started) < seconds:
        t = time.perf_counter()
        rt.run_rows(xs, rows[runs % 2], rows[(runs + 1) % 2])  # state carried
        times.append(time.perf_counter() - t)
        runs += 1
    cpu = time.process_time() - cpu
    for row in rows[0] + rows[1]:
        rt.pool.free(row)
    steps = runs * batch / elapsed
    return {"batch": batch, "runs_per_s": runs / elapsed, "steps_per_s": steps,
            "run_ms": 1000 * elapsed / runs, "run_ms_median": 1000 * float(np.median(times)),
            "host_cpu_ms": 1000 * cpu / runs, "streams": steps * chunk_ms / 1000}


def build_workload(name: str, root: Path) -> tuple[Path, int]:
    """The reference workload's model repository (random weights), built on first use
    by the project's own code; returns it and the workload's chunk (ms or bytes)."""
    arch, kind, hidden, layers, chunk = WORKLOADS[name]
    repo = root / name
    if not (repo / name / "1" / "model.onnx").exists():
        from rnnserve.errors import require_train_extra

        require_train_extra(f"building the {name} workload")
        from rnnserve.audio import FRONT_END
        from rnnserve.export.onnx_export import export_checkpoint
        from rnnserve.training.checkpoint import new_model_checkpoint, save_checkpoint
        from rnnserve.training.model import ModelConfig
        from rnnserve.training.speech_data import LABELS
        from rnnserve.training.speech_train import new_speech_checkpoint

        root.mkdir(parents=True, exist_ok=True)
        if kind == "pcm16":
            cfg = ModelConfig(arch=arch, input_kind="features", input_size=FRONT_END.n_mels,
                              output_size=len(LABELS), hidden_size=hidden, num_layers=layers)
            ckpt = new_speech_checkpoint(cfg)
        else:
            cfg = ModelConfig(arch=arch, input_kind="bytes", input_size=256, output_size=256,
                              hidden_size=hidden, num_layers=layers)
            ckpt = new_model_checkpoint(cfg, "text")
        path = root / f"{name}.pt"
        save_checkpoint(path, ckpt)
        export_checkpoint(path, repo, name, 1, overwrite=True, log=lambda _: None)
    return repo, chunk


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (a server's worker processes; Linux:
    /proc/PID/task/*/children); those gone meanwhile are left out."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    pids += process_tree(int(child))
    return pids


def _vmrss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RnnserveError(f"no VmRSS for process {pid}")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants (Linux: /proc/PID/status)."""
    total = _vmrss(pid)
    for child in process_tree(pid)[1:]:
        with contextlib.suppress(OSError, RnnserveError):  # gone meanwhile
            total += _vmrss(child)
    return total


class CpuSampler:
    """Process trees' CPU seconds together, sampled in the background (every
    ``every_s``), to tell what they used between two wall-clock times: a load run's
    window, without the set-up before it or the closing of its sessions after. With no
    process it samples nothing and tells nothing (``per_chunk`` is None)."""

    def __init__(self, *pids: int, every_s: float = 0.25) -> None:
        self.pids, self.every_s = pids, every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), self._cpu()))
            if self._stop.wait(self.every_s):
                self.samples.append((time.time(), self._cpu()))
                return

    def __enter__(self) -> CpuSampler:
        if self.pids:
            self._thread.start()
        return self

    def per_chunk(self, result: LoadResult) -> float | None:
        """Microseconds of CPU per chunk answered over the run's window."""
        if not self.samples or not result.answered or result.ended <= result.started:
            return None
        used = self.at(result.ended) - self.at(result.started)
        return round(1e6 * used / result.answered, 1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def at(self, wall: float) -> float:
        """CPU seconds at wall-clock time ``wall``, interpolated between samples."""
        times = [t for t, _ in self.samples]
        return float(np.interp(wall, times, [c for _, c in self.samples]))


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process and its descendants have used so far
    (Linux: /proc/PID/stat)."""
    ticks = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def _open_idle(target: str, meta: pb.ModelMetadata, n: int, chunk: Data, pcm16: bool,
                     per_request: int = 256, concurrency: int = 4) -> int:
    """Open ``n`` sessions and step each by one chunk, as a session that spoke and then
    paused: it holds a row of the state pool and its last answer (an opened session
    that never stepped holds neither: it reads the pool's shared zero row). Returns how
    many chunks were answered."""
    stepped = 0
    async with AsyncClient(target, timeout=120) as client:
        left = iter(range(n))

        async def opener() -> None:
            async with client.many() as m:
                while True:
                    request = pb.ManyRequest()
                    for _ in range(per_request):
                        if next(left, None) is None:
                            break
                        add_many_item(request, new_session_id(), 0, chunk, pcm16=pcm16,
                                      open_model=meta.name, version=meta.version)
                    if not request.items:
                        return
                    for result in await m.send(request):
                        if result.code:
                            raise RnnserveError(f"an idle session's first chunk failed: "
                                                f"{status_of(result.code).name}: "
                                                f"{result.message}")
                    nonlocal stepped
                    stepped += len(request.items)

        await asyncio.gather(*(opener() for _ in range(concurrency)))
    return stepped


def idle_memory(repo: str, model: str, version: int, sessions: int, serve_flags: list[str],
                out: Path, chunk_ms: int = 40, chunk_bytes: int = 16) -> dict[str, Any]:
    """Resident memory growth of a server holding ``sessions`` idle sessions, each
    stepped once (``_open_idle``), against the raw bytes of their recurrent state."""
    warm = 64  # sessions opened first, to warm every code path once; they stay, so
    # the server holds them and the N measured (none evicted, or refused)
    server = Spawned.rnnserve(repo, [*serve_flags, f"--max-sessions={sessions + warm}",
                                     f"--max-state-bytes={1 << 40}", "--idle-timeout-s=3600"],
                              out / "server-idle.log")
    try:
        meta = asyncio.run(fetch_metadata(server.target, model, version))
        make, pcm16 = chunk_maker(meta, chunk_ms, chunk_bytes)
        asyncio.run(_open_idle(server.target, meta, warm, make(0), pcm16))
        before = rss_bytes(server.proc.pid)
        started = time.perf_counter()
        stepped = asyncio.run(_open_idle(server.target, meta, sessions, make(0), pcm16))
        seconds = time.perf_counter() - started
        after = rss_bytes(server.proc.pid)
    finally:
        server.stop()
    raw = sessions * meta.state_bytes_per_session
    return {"sessions": sessions, "stepped": stepped,
            "state_bytes_per_session": meta.state_bytes_per_session,
            "raw_state_bytes": raw, "rss_before": before, "rss_after": after,
            "rss_growth": after - before, "growth_vs_raw": round((after - before) / raw, 3),
            "opened_per_s": round(sessions / seconds)}


def _levels_json(levels: list[Level]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(lv).items() if k != "timeline"} for lv in levels]


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def run_bench(server: str | None, repo: str | None, model: str, version: int,
              levels: list[int], duration_s: float, chunk_ms: int, chunk_bytes: int,
              out: Path, serve_flags: list[str], *, make_plot: bool = True,
              baselines: bool = False, load_procs: int = 1, max_batch_size: int = 64,
              saturation_streams: int = 0, idle_sessions: int = 0,
              redis_store: bool = False, repeats: int = 1, soak_s: float = 0.0,
              soak_streams: int = 0, connections: int = 0, many: int = 0,
              spread: bool = True, packed: bool = False,
              redis_shards: int = 1) -> dict[str, Any]:
    if (server is None) == (repo is None):
        raise RnnserveError("give either --server HOST:PORT or --repo DIR (to start one)")
    if baselines and repo is None:
        raise RnnserveError("--baselines starts its own servers: give --repo, not --server")
    if redis_store and repo is None:
        raise RnnserveError("--redis-store starts its own servers: give --repo, not --server")
    if redis_shards < 1 or (redis_shards > 1 and not redis_store):
        raise RnnserveError("--redis-shards takes 1 or more, and more than 1 only with "
                            "--redis-store")
    if idle_sessions and repo is None:
        raise RnnserveError("--idle-sessions measures a server it starts: give --repo")
    if repeats < 1:
        raise RnnserveError("--repeats must be at least 1")
    if packed and many < 2:
        raise RnnserveError("--packed sends the streams --many N at a time: give --many "
                            "2 or more")
    if packed and baselines:
        raise RnnserveError("--baselines cannot run with --packed: the transport "
                            "ceiling's echo server serves StreamMany, not StreamPacked; "
                            "measure the baselines with --many N alone")
    from rnnserve.cli import settings_given

    try:
        given = settings_given(serve_flags) if repo is not None else set()
    except RnnserveError as exc:
        raise RnnserveError(f"--serve-arg: {exc}") from None
    if "max_batch_size" in given:
        raise RnnserveError("--serve-arg sets the max batch size, which the bench sets "
                            "itself for the servers it starts (and runs the compute "
                            "ceiling at): give --max-batch-size N instead")
    overridden = sorted({"max_sessions", "max_state_bytes", "idle_timeout_s"} & given)
    if idle_sessions and overridden:
        print("note: the idle-memory server sets its own " + ", ".join(
            "--" + k.replace("_", "-") for k in overridden) + "; the levels use yours",
              flush=True)
    if connections < 0:
        raise RnnserveError("--connections must be 0 (one per worker process of the "
                            "server) or more")
    if not levels or min(levels) < 1:
        raise RnnserveError("--streams needs positive numbers, e.g. 1,4,16")
    levels = sorted(set(levels))
    out.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    flags = [*serve_flags, f"--max-batch-size={max_batch_size}"]
    runs: dict[str, list[Level]] = {}
    with LoadGenerator(load_procs, connections, many, spread, packed) as gen, \
            contextlib.ExitStack() as stack:
        spawned = Spawned.rnnserve(repo, flags, out / "server.log") if repo else None
        if spawned is not None:
            stack.callback(spawned.stop)
        target = spawned.target if spawned else server
        assert target is not None
        targets = {"rnnserve": target}
        meta = asyncio.run(fetch_metadata(target, model, version))
        if not connections:  # one per worker process of the server, so each gets load
            connections = gen.connections = asyncio.run(server_workers(target))
        log(f"rnnserve bench: {meta.name} v{meta.version} ({meta.arch}, {meta.input_kind}, "
            f"{meta.execution_provider}) at {target}; {chunk_ms} ms chunks, "
            f"{duration_s:g} s per level, {gen.procs} load process(es)"
            f" with {connections} connection(s) each"
            + (f", {repeats} repeats per level (the median p99's repeat counts) and "
               "closed loop (the median throughput's)" if repeats > 1 else ""))
        if redis_store:
            assert repo is not None
            shards = []
            for i in range(redis_shards):
                (out / f"redis{i}").mkdir(exist_ok=True)
                shards.append(RedisProcess(out / f"redis{i}"))
                stack.callback(shards[-1].stop)
            urls = ",".join(r.url for r in shards)
            on_redis = Spawned.rnnserve(repo, [*flags, f"--session-store={urls}"],
                                        out / "server-redis.log")
            stack.callback(on_redis.stop)
            targets["redis_store"] = on_redis.target
            log(f"redis_store: a second server on the Redis session store ({urls}"
                + (f": {redis_shards} shards" if redis_shards > 1 else "")
                + "; every step written before it is answered), taking turns with the "
                "in-memory one (rnnserve) at each level")
        if baselines:  # the echo server takes turns with rnnserve at each level: their
            # ratio is the target, and this machine's speed drifts between minutes
            blob = out / "metadata.bin"
            blob.write_bytes(meta.SerializeToString())
            echo = Spawned([sys.executable, "-m", "rnnserve.client.echo", "--metadata",
                            str(blob)], out / "echo.log")
            stack.callback(echo.stop)
            targets["transport"] = echo.target
            log(f"transport: the transport ceiling (client/echo.py: the same API and "
                f"messages, no model) at {echo.target}, taking turns with rnnserve at "
                "each level")
        log(f"\nrnnserve (max batch size {max_batch_size})\n{HEADER}")
        redis_pids = [r.proc.pid for r in shards if r.proc] if redis_store else []
        redis_cpu = [cpu_seconds(pid) for pid in redis_pids]
        pids: dict[str, tuple[list[int], list[int]]] = {
            "rnnserve": ([spawned.proc.pid] if spawned else [], [])}
        if redis_store:
            pids["redis_store"] = ([on_redis.proc.pid], redis_pids)
        if baselines:
            pids["transport"] = ([echo.proc.pid], [])
        runs.update(sweep(gen, targets, meta, levels, duration_s, chunk_ms, chunk_bytes, log,
                          repeats, pids))
        redis_per_chunk: list[float] = []
        if redis_store:  # Redis's own CPU per chunk the store's server answered (all levels)
            chunks = on_redis.chunks_answered()
            redis_per_chunk = [1e6 * (cpu_seconds(pid) - before) / max(1, chunks)
                               for pid, before in zip(redis_pids, redis_cpu, strict=True)]
            log(f"redis-server CPU per chunk answered on the store: "
                f"{sum(redis_per_chunk):.1f} us"
                + (" (" + " + ".join(f"{v:.1f}" for v in redis_per_chunk) + ")"
                   if len(redis_per_chunk) > 1 else "") + f" over {chunks} chunks")
        if len(targets) > 1:
            log("\nmedian p99 ms per level: " + "; ".join(
                f"{name} " + ", ".join(f"{lv.streams}: {lv.latency_ms['p99']:.0f}"
                                       for lv in runs[name]) for name in targets))
        n = saturation_streams or levels[-1]

        def closed_loop(at: str, pid: int | None, title: str) -> ClosedRun:
            started = time.time()
            with CpuSampler(*([pid] if pid else [])) as cpu:
                result = gen.run(at, meta.name, meta.SerializeToString(), streams=n,
                                 chunk_ms=chunk_ms, chunk_bytes=chunk_bytes,
                                 duration_s=duration_s, closed_loop=True)
            done = summarize(n, duration_s, result)
            # the server's CPU per answered chunk, every thread and worker process, over
            # the run's window (not the closing of the sessions it leaves open): what a
            # host needs per chunk at full load (the clients' cost not included)
            cpu_us = cpu.per_chunk(result)
            done = replace(done, server_cpu_us_per_chunk=cpu_us)
            log(f"{title}, {n} streams: {done.throughput:.0f} chunks/s, "
                f"p50 {done.latency_ms['p50']:.2f} ms, load {done.load_busy:.2f}"
                + (f", server CPU {cpu_us:.0f} us per chunk" if cpu_us is not None else "")
                + (f"; ERRORS {dict(sorted(done.errors.items()))}: the throughput and CPU "
                   "figures include refused work" if done.errors else ""))
            return done, started

        # rnnserve's closed loop and the echo server's (what the transport alone costs
        # per chunk) take turns, --repeats times each, as the levels do: their ratio is
        # a target, and this machine's speed drifts between minutes
        loops = {"rnnserve": (target, spawned.proc.pid if spawned else None, "closed loop")}
        if baselines:
            loops["transport"] = (echo.target, echo.proc.pid, "transport ceiling, closed loop")
        tries: dict[str, list[ClosedRun]] = {name: [] for name in loops}
        for r in range(repeats):
            for name, (where, pid, title) in loops.items():
                tries[name].append(closed_loop(
                    where, pid, title if repeats == 1 else f"{title} {r + 1}/{repeats}"))
        counted = {name: median_closed(runs_) for name, runs_ in tries.items()}
        closed, closed_started = counted["rnnserve"]
        echo_closed = counted.get("transport")
        if repeats > 1:
            log("closed loops, the median run's chunks/s: " + "; ".join(
                f"{name} {counted[name][0].throughput:.0f} (of "
                + ", ".join(f"{t[0].throughput:.0f}" for t in runs_) + ")"
                for name, runs_ in tries.items()))
        soaked = None
        if soak_s:
            k = soak_streams or int(SOAK_FRACTION * capacity(runs["rnnserve"]))
            if k < 1:
                raise RnnserveError("no capacity found to soak at 70% of: give --soak-streams")
            soaked = soak(gen, target, spawned.proc.pid if spawned else None, meta, k,
                          soak_s, chunk_ms, chunk_bytes, log)
        stack.close()
        ceiling: dict[str, Any] | None = None
        if baselines:
            assert repo is not None
            def sweep_on(server: Spawned, title: str) -> list[Level]:
                try:
                    log(f"\n{title}\n{HEADER}")
                    return sweep(gen, {"baseline": server.target}, meta, levels, duration_s,
                                 chunk_ms, chunk_bytes, log,
                                 pids={"baseline": ([server.proc.pid], [])})["baseline"]
                finally:
                    server.stop()

            runs["unbatched"] = sweep_on(
                Spawned.rnnserve(repo, [*serve_flags, "--max-batch-size=1"],
                                 out / "server-unbatched.log"),
                "rnnserve unbatched (max batch size 1)")
            path = Path(repo) / meta.name / str(meta.version) / "model.onnx"
            ceiling = compute_ceiling(path, meta, max_batch_size, chunk_ms, chunk_bytes,
                                      min(duration_s, 10.0), threads=0)
            log(f"\ncompute ceiling (onnxruntime alone, batch {max_batch_size}): "
                f"{ceiling['steps_per_s']:.0f} chunks/s = {ceiling['streams']:.0f} real-time "
                f"streams ({ceiling['run_ms']:.2f} ms per run, host CPU "
                f"{ceiling['host_cpu_ms']:.2f} ms)")
    memory = None
    if idle_sessions:
        assert repo is not None
        memory = idle_memory(repo, meta.name, meta.version, idle_sessions, serve_flags, out,
                             chunk_ms, chunk_bytes)
        log(f"\n{idle_sessions} idle sessions: resident memory +{memory['rss_growth'] / 2**20:.0f}"
            f" MiB for {memory['raw_state_bytes'] / 2**20:.0f} MiB of state "
            f"({memory['growth_vs_raw']} x), opened at {memory['opened_per_s']}/s")
    caps = {name: capacity(lv) for name, lv in runs.items()}
    capped = {name: capacity_capped(lv) for name, lv in runs.items()}
    busy = max([lv.load_busy for levels_ in runs.values() for lv in levels_]
               + [t[0].load_busy for runs_ in tries.values() for t in runs_])
    report: dict[str, Any] = {
        "model": meta.name, "version": meta.version, "arch": meta.arch,
        "input_kind": meta.input_kind, "provider": meta.execution_provider,
        "state_bytes_per_session": meta.state_bytes_per_session,
        "chunk_ms": chunk_ms, "duration_s": duration_s, "budget_ms": BUDGET_S * 1000,
        "max_batch_size": max_batch_size,
        "capacity_streams": caps["rnnserve"],
        # every level passed: the capacity is at least the top level, maybe more
        "capacity_is_lower_bound": capped["rnnserve"],
        "saturation": {"streams": closed.streams, "started": closed_started,
                       "throughput": closed.throughput,
                       "latency_ms": closed.latency_ms, "load_busy": closed.load_busy,
                       "server_cpu_us_per_chunk": closed.server_cpu_us_per_chunk,
                       "errors": closed.errors,
                       "throughput_repeats": [t[0].throughput for t in tries["rnnserve"]]},
        "load_generator": {"processes": load_procs, "connections": connections,
                           "spread": spread if connections > 1 else None,
                           "streams_per_message": max(1, many),
                           "rpc": "StreamPacked" if packed else
                           "StreamMany" if many > 1 else "Stream",
                           "busiest": busy,
                           "saturated": busy >= BUSY},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "levels": _levels_json(runs["rnnserve"]),
    }
    if memory is not None:
        report["idle_memory"] = memory
    if soaked is not None:
        report["soak"] = soaked
    if redis_store:
        report["redis_store"] = {
            "capacity_streams": caps["redis_store"],
            "capacity_is_lower_bound": capped["redis_store"],
            "capacity_vs_memory": _ratio(caps["redis_store"], caps["rnnserve"]),
            "capacity_vs_memory_is": _bound(capped["redis_store"], capped["rnnserve"]),
            "shards": redis_shards,
            # redis-server CPU (µs) per chunk answered on the store, over every level: the
            # figure that sizes the store (docs/sessions.md), summed and per shard
            "redis_cpu_us_per_chunk": round(sum(redis_per_chunk), 2),
            "redis_cpu_us_per_chunk_each": [round(v, 2) for v in redis_per_chunk],
            "levels": _levels_json(runs["redis_store"]),
        }
    if baselines:
        assert ceiling is not None
        assert echo_closed is not None
        echo_sat, echo_started = echo_closed
        report["baselines"] = {
            "transport": {"capacity_streams": caps["transport"],
                          "capacity_is_lower_bound": capped["transport"],
                          "saturation": {"streams": echo_sat.streams,
                                         "started": echo_started,
                                         "throughput": echo_sat.throughput,
                                         "latency_ms": echo_sat.latency_ms,
                                         "load_busy": echo_sat.load_busy,
                                         "server_cpu_us_per_chunk":
                                             echo_sat.server_cpu_us_per_chunk,
                                         "errors": echo_sat.errors,
                                         "throughput_repeats": [
                                             t[0].throughput for t in tries["transport"]]},
                          "levels": _levels_json(runs["transport"])},
            "unbatched": {"capacity_streams": caps["unbatched"],
                          "capacity_is_lower_bound": capped["unbatched"],
                          "levels": _levels_json(runs["unbatched"])},
            "compute_ceiling": ceiling,
        }
        report["ratios"] = {
            "capacity_vs_transport": _ratio(caps["rnnserve"], caps["transport"]),
            "capacity_vs_unbatched": _ratio(caps["rnnserve"], caps["unbatched"]),
            "saturation_vs_compute_ceiling": _ratio(closed.throughput, ceiling["steps_per_s"]),
            # closed loops of the same streams: rnnserve's against the transport's alone,
            # and the server's CPU per chunk against the echo server's (model included);
            # with --repeats, each round's two runs (a minute apart) paired, the median
            # round's ratio counting
            "saturation_vs_transport": paired_median(
                tries, lambda a, b: _ratio(a.throughput, b.throughput)),
            "server_cpu_vs_transport": paired_median(
                tries, lambda a, b: None if a.server_cpu_us_per_chunk is None
                or not b.server_cpu_us_per_chunk
                else round(a.server_cpu_us_per_chunk / b.server_cpu_us_per_chunk, 2)),
            # "exact", or "at least" / "at most" / "unknown" where a capacity is only a
            # lower bound (its every level passed)
            "bounds": {"capacity_vs_transport": _bound(capped["rnnserve"], capped["transport"]),
                       "capacity_vs_unbatched": _bound(capped["rnnserve"],
                                                       capped["unbatched"])},
        }
    def at(name: str) -> str:
        return f"at least {caps[name]}" if capped[name] else str(caps[name])

    print(f"\ncapacity: {at('rnnserve')} real-time streams with p99 <= "
          f"{BUDGET_S * 1000:g} ms and no errors (of the levels run)")
    if baselines:
        r, b = report["ratios"], report["ratios"]["bounds"]

        def ratio(key: str) -> str:
            return str(r[key]) if b[key] == "exact" or r[key] is None else \
                f"{r[key]} ({b[key]})"

        print(f"  vs transport ceiling {at('transport')}: {ratio('capacity_vs_transport')}; "
              f"vs unbatched {at('unbatched')}: {ratio('capacity_vs_unbatched')}; "
              f"saturation throughput vs compute ceiling: "
              f"{r['saturation_vs_compute_ceiling']}, vs the transport's: "
              f"{r['saturation_vs_transport']} (server CPU per chunk: "
              f"{r['server_cpu_vs_transport']} x the echo server's)")
    lower = [name for name in caps if capped[name]]
    if lower:
        print(f"note: every level passed for {', '.join(lower)}: that capacity is the top "
              "level run, a lower bound; add higher --streams to find it")
    if redis_store:
        rs = report["redis_store"]
        bound = "" if rs["capacity_vs_memory_is"] == "exact" else \
            f"{rs['capacity_vs_memory_is']} "
        print(f"  with the Redis session store: {at('redis_store')} streams "
              f"({bound}{rs['capacity_vs_memory']} of the in-memory store's)")
    if busy >= BUSY:
        print(f"note: a load process was {busy:.0%} busy: the load generator may be the "
              "limit; run with more --load-procs (or on another machine)")
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    written = [out / "bench.json"]
    if make_plot:
        try:
            plot(report, runs, out / "bench.png")
            written.append(out / "bench.png")
        except ImportError:
            print("no plot: matplotlib is missing (pip install 'rnnserve[bench]')",
                  file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return report
