"""``rnnserve bench``: real-time streams swept over concurrency, with a latency plot.

For each number of concurrent streams, every stream sends one chunk per chunk
duration (open loop, see ``client/load.py``) for ``duration_s``; the report gives
the chunk latency percentiles (p50, p90, p99, p99.9, max, measured from when each
chunk was due), the throughput, the errors by status code and the chunks that went
out late, and the capacity: the most streams served with p99 <= 100 ms and no error.
It writes ``bench.json`` and ``bench.png`` (percentiles and throughput against
streams; latency over time at the highest level).

The server is one already running (``--server``) or one this command starts on
127.0.0.1 from a model repository (``--repo``) and stops at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rnnserve.client.client import AsyncClient, Data
from rnnserve.client.load import LoadResult, realtime_streams
from rnnserve.errors import RnnserveError
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

BUDGET_S = 0.1  # capacity: p99 within this, and no errors
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass
class Level:
    streams: int
    duration_s: float
    answered: int
    sessions: int
    late: int
    errors: dict[str, int]
    throughput: float  # answered chunks per second
    latency_ms: dict[str, float]  # p50, p90, p99, p99.9, max
    timeline: list[tuple[float, float]] = field(default_factory=list, repr=False)

    @property
    def within_budget(self) -> bool:
        return not self.errors and self.answered > 0 and \
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
    return Level(streams, duration_s, result.answered, result.sessions, result.late,
                 dict(result.errors), result.answered / duration_s, pct,
                 [(t, x) for t, x in zip(result.times, result.latencies, strict=True)])


async def sweep(server: str, model: str, version: int, levels: list[int], duration_s: float,
                chunk_ms: int, chunk_bytes: int, log: Callable[[str], None]
                ) -> tuple[pb.ModelMetadata, list[Level]]:
    async with AsyncClient(server, timeout=30) as client:
        meta = await client.model_metadata(model, version)
    chunk, pcm16 = chunk_maker(meta, chunk_ms, chunk_bytes)
    out = []
    for n in levels:
        result = await realtime_streams(server, model, chunk, streams=n,
                                        chunk_s=chunk_ms / 1000, duration_s=duration_s,
                                        pcm16=pcm16)
        level = summarize(n, duration_s, result)
        log(row(level))
        out.append(level)
    return meta, out


HEADER = (f"{'streams':>8} {'chunks/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'p99.9 ms':>9} {'max ms':>8} {'late':>6}  errors")


def row(level: Level) -> str:
    ms = level.latency_ms
    errors = ", ".join(f"{k} {v}" for k, v in sorted(level.errors.items())) or "-"
    return (f"{level.streams:>8} {level.throughput:>9.1f} {ms['p50']:>8.2f} {ms['p90']:>8.2f} "
            f"{ms['p99']:>8.2f} {ms['p99.9']:>9.2f} {ms['max']:>8.2f} {level.late:>6}  {errors}")


def capacity(levels: list[Level]) -> int:
    """The most streams of a level within budget (0 when none is)."""
    return max((lv.streams for lv in levels if lv.within_budget), default=0)


def plot(report: dict[str, Any], levels: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, tl) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [lv.streams for lv in levels]
    for key in ("p50", "p90", "p99", "p99.9"):
        ax.plot(xs, [lv.latency_ms[key] for lv in levels], marker="o", label=key)
    ax.axhline(BUDGET_S * 1000, color="red", linestyle="--", linewidth=1, label="budget")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("concurrent real-time streams")
    ax.set_ylabel("chunk latency (ms)")
    ax.set_title(f"{report['model']}: {report['chunk_ms']} ms chunks, "
                 f"capacity {report['capacity_streams']} streams")
    tp = ax.twinx()
    tp.plot(xs, [lv.throughput for lv in levels], color="grey", marker="s", linestyle=":",
            label="chunks/s")
    tp.set_ylabel("answered chunks per second")
    lines = ax.get_legend_handles_labels()
    more = tp.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    top = levels[-1]
    if top.timeline:
        t, lat = zip(*top.timeline, strict=True)
        tl.scatter(t, np.asarray(lat) * 1000, s=2, alpha=0.4)
        tl.axhline(top.latency_ms["p99"], color="orange", linewidth=1,
                   label=f"p99 {top.latency_ms['p99']:.1f} ms")
        tl.legend(loc="upper right", fontsize=8)
    tl.set_yscale("log")
    tl.set_xlabel("seconds since the level started")
    tl.set_ylabel("chunk latency (ms)")
    tl.set_title(f"latency over time at {top.streams} streams")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class SpawnedServer:
    """``rnnserve serve`` on 127.0.0.1 with free ports, for ``bench --repo``."""

    def __init__(self, repo: str, flags: list[str], log_path: Path) -> None:
        cmd = [sys.executable, "-m", "rnnserve", "serve", "--repo", repo, "--host", "127.0.0.1",
               "--grpc-port", "0", "--metrics-port", "0", *flags]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise RnnserveError(f"the server did not start; see {log_path}")
        ready = json.loads(line)
        self.target = f"127.0.0.1:{ready['grpc_port']}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def run_bench(server: str | None, repo: str | None, model: str, version: int,
              levels: list[int], duration_s: float, chunk_ms: int, chunk_bytes: int,
              out: Path, serve_flags: list[str], make_plot: bool = True) -> dict[str, Any]:
    if (server is None) == (repo is None):
        raise RnnserveError("give either --server HOST:PORT or --repo DIR (to start one)")
    if not levels or min(levels) < 1:
        raise RnnserveError("--streams needs positive numbers, e.g. 1,4,16")
    out.mkdir(parents=True, exist_ok=True)
    spawned = SpawnedServer(repo, serve_flags, out / "server.log") if repo else None
    target = spawned.target if spawned else server
    assert target is not None
    log = lambda line: print(line, flush=True)  # noqa: E731
    try:
        print(f"rnnserve bench: {model} at {target}, {chunk_ms} ms chunks, "
              f"{duration_s:g} s per level", flush=True)
        log(HEADER)
        meta, results = asyncio.run(sweep(target, model, version, sorted(set(levels)),
                                          duration_s, chunk_ms, chunk_bytes, log))
    finally:
        if spawned is not None:
            spawned.stop()
    report: dict[str, Any] = {
        "model": meta.name, "version": meta.version, "arch": meta.arch,
        "input_kind": meta.input_kind, "provider": meta.execution_provider,
        "chunk_ms": chunk_ms, "duration_s": duration_s, "budget_ms": BUDGET_S * 1000,
        "capacity_streams": capacity(results),
        "load_generator": "one process (asyncio)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "levels": [{k: v for k, v in asdict(lv).items() if k != "timeline"} for lv in results],
    }
    print(f"capacity: {report['capacity_streams']} real-time streams with p99 <= "
          f"{BUDGET_S * 1000:g} ms and no errors (of the levels run)")
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    written = [out / "bench.json"]
    if make_plot:
        try:
            plot(report, results, out / "bench.png")
            written.append(out / "bench.png")
        except ImportError:
            print("no plot: matplotlib is missing (pip install 'rnnserve[bench]')",
                  file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return report
