"""A real Prometheus scrapes a real rnnserve under streaming load, its sessions kept on a
session store of two real Redis shards; every recording rule and every dashboard panel
is evaluated on what it collected, and the latency quantiles it computes are compared
with what the clients measured."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from rnnserve.client import AsyncClient, Client
from rnnserve.client.bench import RedisProcess
from rnnserve.client.client import make_chunk
from rnnserve.client.load import LoadResult, realtime_streams
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

from ..server.serving import ServerProcess, start_server
from .prom import MONITORING, Prometheus, dashboard_queries, promtool, start_prometheus

LOAD_S = 16.0
CHUNK_S = 0.04
MAX_SESSIONS = 24


@dataclass
class Run:
    server: ServerProcess
    prom: Prometheus
    text: LoadResult
    feat: LoadResult
    rejected: dict[str, int]  # status code -> chunks the misbehaving client got refused
    scrape: str
    at: float  # a time inside the load window, for instant queries


async def misbehave(target: str, until: float, rejected: dict[str, int]) -> None:
    """Bad chunks of three kinds, with valid ones between them, for half the load."""
    rng = np.random.default_rng(0)
    async with AsyncClient(target, timeout=10) as client:
        stub = client.stub
        sid = (await stub.OpenSession(pb.OpenSessionRequest(model="feat"))).session_id
        seq = 0
        bad = [
            (make_chunk(0, rng.standard_normal((3, 21)).astype(np.float32)), "INVALID_ARGUMENT"),
            (make_chunk(99, rng.standard_normal((3, 20)).astype(np.float32)),
             "FAILED_PRECONDITION"),
        ]
        i = 0
        while time.time() < until - LOAD_S / 2:
            chunk, code = bad[i % 2]
            chunk.seq = chunk.seq if code == "FAILED_PRECONDITION" else seq
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Step(pb.StepRequest(session_id=sid, chunk=chunk))
            assert err.value.code().name == code
            rejected[code] = rejected.get(code, 0) + 1
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Step(pb.StepRequest(session_id="no-such-session", chunk=chunk))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            rejected["NOT_FOUND"] = rejected.get("NOT_FOUND", 0) + 1
            good = make_chunk(seq, rng.standard_normal((3, 20)).astype(np.float32))
            await stub.Step(pb.StepRequest(session_id=sid, chunk=good))
            seq += 1
            i += 1
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def run(repo, tmp_path_factory) -> Run:
    work = tmp_path_factory.mktemp("prometheus")
    shards = []
    for i in range(2):
        (work / f"redis{i}").mkdir()
        shards.append(RedisProcess(work / f"redis{i}"))
    try:
        yield from serve_and_load(repo, work, shards)
    finally:
        for shard in shards:
            shard.stop()


def serve_and_load(repo: Path, work: Path, shards: list[RedisProcess]) -> Iterator[Run]:
    server = start_server(repo, work / "server.log", "--max-sessions", str(MAX_SESSIONS),
                          "--max-batch-size", "32", "--max-batch-delay-ms", "2",
                          "--session-store", ",".join(s.url for s in shards))
    prom = start_prometheus(work, [f"127.0.0.1:{server.metrics_port}"])
    try:
        prom.wait_for_scrapes()  # a baseline before anything happens
        rng = np.random.default_rng(1)
        text_chunk = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        feat_chunk = rng.standard_normal((4, 20)).astype(np.float32)
        rejected: dict[str, int] = {}
        # --max-sessions idle sessions: the streams' sessions push the oldest out (evictions)
        with Client(server.target, timeout=10) as client:
            for _ in range(MAX_SESSIONS):
                client.open_session("text")

        async def load() -> tuple[LoadResult, LoadResult]:
            until = time.time() + LOAD_S
            text, feat, _ = await asyncio.gather(
                realtime_streams(server.target, "text", lambda k: text_chunk, streams=6,
                                 chunk_s=CHUNK_S, duration_s=LOAD_S, session_chunks=100),
                realtime_streams(server.target, "feat", lambda k: feat_chunk, streams=6,
                                 chunk_s=CHUNK_S, duration_s=LOAD_S, session_chunks=100),
                misbehave(server.target, until, rejected))
            return text, feat

        text, feat = asyncio.run(load())
        scrape = server.metrics()
        time.sleep(3)  # a few more scrapes and rule evaluations past the end
        yield Run(server, prom, text, feat, rejected, scrape, at=text.ended - 1.5)
    finally:
        prom.stop()
        assert server.stop() == 0


def test_the_load_ran_clean(run: Run) -> None:
    for result in (run.text, run.feat):
        assert not result.errors, result.errors
        assert result.answered > 0.9 * 6 * LOAD_S / CHUNK_S
        assert result.sessions >= 6 * LOAD_S / CHUNK_S / 100
    assert set(run.rejected) == {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND"}


def test_prometheus_scraped_the_server(run: Run) -> None:
    (target,) = run.prom.api("targets")["activeTargets"]
    assert target["health"] == "up", target
    assert run.prom.query("up", at=run.at)[0]["value"][1] == "1"


def test_promtool_check_metrics_on_a_real_scrape(run: Run) -> None:
    check = promtool("check", "metrics", stdin=run.scrape)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stdout + check.stderr


def test_every_rule_evaluates_and_every_recording_rule_has_data(run: Run) -> None:
    groups = run.prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    files = [yaml.safe_load((MONITORING / "rules" / f).read_text())
             for f in ("recording.yml", "alerts.yml")]
    assert len(rules) == sum(len(g["rules"]) for doc in files for g in doc["groups"])
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    for rule in (r for r in rules if r["type"] == "recording"):
        result = run.prom.query(rule["name"], at=run.at)
        assert result, f"recording rule {rule['name']} has no data"
        values = [float(s["value"][1]) for s in result]
        assert any(math.isfinite(v) for v in values), (rule["name"], values)


@pytest.mark.parametrize("model", [".*", "feat"])
def test_every_dashboard_panel_returns_data(run: Run, model: str) -> None:
    queries = dashboard_queries(model=model)
    assert len(queries) > 30
    empty = []
    for title, expr in queries:
        values = [float(s["value"][1]) for s in run.prom.query(expr, at=run.at)]
        if not any(math.isfinite(v) for v in values):
            empty.append((title, expr, values))
    assert not empty, empty


def test_the_store_panels_show_each_shard(run: Run) -> None:
    """The session store's panels, as the dashboard asks them: both shards wrote the
    load's steps (one script call per batch and shard), within the panel's latency
    quantiles, and none failed."""
    panels: dict[str, list[str]] = {}
    for title, expr in dashboard_queries():
        panels.setdefault(title, []).append(expr)

    def by_shard(expr: str) -> dict[tuple[str, str], float]:
        return {(s["metric"]["op"], s["metric"]["shard"]): float(s["value"][1])
                for s in run.prom.query(expr, at=run.at)}

    calls, failures = panels["Store calls and failures per second by shard"]
    writes = {shard: v for (op, shard), v in by_shard(calls).items() if op == "write"}
    assert set(writes) == {"0", "1"} and min(writes.values()) > 1, writes
    # a write carries a batch's steps: no more writes than chunks answered
    chunks = sum(float(s["value"][1]) for s in run.prom.query(
        'sum(rate(rnnserve_chunks_total{code="OK"}[10s]))', at=run.at))
    assert sum(writes.values()) <= chunks * 1.05, (writes, chunks)
    assert set(by_shard(failures).values()) == {0.0}
    p50, p99 = panels["Store round trips by op and shard (p50, p99)"]
    for q in (p50, p99):
        took = {k: v for k, v in by_shard(q).items() if k[0] == "write"}
        assert set(took) == {("write", "0"), ("write", "1")}, took
        assert all(0 < v < 1 for v in took.values()), took


def test_dashboard_variables_list_the_models_and_the_instance(run: Run) -> None:
    models = {s["metric"]["model"] for s in run.prom.query("rnnserve_model_info", at=run.at)}
    assert models == {"text", "feat"}
    instances = {s["metric"]["instance"]
                 for s in run.prom.query('rnnserve_model_info{model=~"feat"}', at=run.at)}
    assert instances == {f"127.0.0.1:{run.server.metrics_port}"}


def test_histogram_quantiles_match_what_the_clients_measured(run: Run) -> None:
    window = math.ceil(run.text.ended - run.text.started) + 3
    end = run.text.ended + 2
    client = np.array(run.text.latencies + run.feat.latencies)
    for q in (0.5, 0.9, 0.99):
        expr = (f"histogram_quantile({q}, sum by (le) (increase("
                f'rnnserve_chunk_latency_seconds_bucket{{model=~"text|feat"}}[{window}s])))')
        (sample,) = run.prom.query(expr, at=end)
        server = float(sample["value"][1])
        measured = float(np.quantile(client, q))
        print(f"p{q * 100:g}: server histogram {server * 1e3:.3f} ms, "
              f"client {measured * 1e3:.3f} ms")
        # the server's time is part of the client's; same order of magnitude, and no more
        # than the client's beyond the interpolation error of one bucket
        assert measured / 10 <= server <= measured * 1.6, (q, server, measured)
    p = {q: float(run.prom.query(
        f"histogram_quantile({q}, sum by (le) (increase(rnnserve_chunk_latency_seconds_bucket"
        f"[{window}s])))", at=end)[0]["value"][1]) for q in (0.5, 0.99)}
    assert p[0.99] >= p[0.5]


def test_errors_are_counted_by_code_and_evictions_alert(run: Run) -> None:
    end = run.text.ended + 2
    window = math.ceil(run.text.ended - run.text.started) + 5
    by_code = {s["metric"]["code"]: float(s["value"][1]) for s in run.prom.query(
        f'sum by (code) (increase(rnnserve_chunks_total{{code!="OK"}}[{window}s]))', at=end)}
    for code in run.rejected:
        assert by_code.get(code, 0) > 0, (code, by_code)
    evicted = run.prom.query(
        'sum(rnnserve_sessions_ended_total{reason="evicted"})', at=end)
    assert float(evicted[0]["value"][1]) >= 12 + 1  # one per stream, one for misbehave
    alerts = {a["labels"]["alertname"]: a for a in run.prom.api("alerts")["alerts"]}
    assert alerts["RnnserveSessionsEvicted"]["state"] == "firing", alerts
    assert "RnnserveLatencySLOFastBurn" not in alerts, alerts
