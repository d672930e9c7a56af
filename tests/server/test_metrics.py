"""Metrics stay exact under errors: a rejected chunk counts once, with its code, and is
never a latency sample; RPCs are counted by method and final code, streams included."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.client import AsyncClient, Client
from rnnserve.client.client import make_chunk
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

from .serving import metric_value, start_server


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(repo, log)
    yield srv
    assert srv.stop() == 0, log.read_text()[-3000:]


def counts(text: str) -> dict[str, float]:
    feat = {"model": "feat", "version": "1"}
    return {
        "ok": metric_value(text, "rnnserve_chunks_total", code="OK", **feat),
        "invalid": metric_value(text, "rnnserve_chunks_total", code="INVALID_ARGUMENT", **feat),
        "order": metric_value(text, "rnnserve_chunks_total", code="FAILED_PRECONDITION", **feat),
        "unknown": metric_value(text, "rnnserve_chunks_total", code="NOT_FOUND", model=""),
        "latency": metric_value(text, "rnnserve_chunk_latency_seconds_count", **feat),
        "latency_all": metric_value(text, "rnnserve_chunk_latency_seconds_count"),
        "first": metric_value(text, "rnnserve_time_to_first_output_seconds_count", **feat),
        "step_ok": metric_value(text, "rnnserve_requests_total", method="Step", code="OK", **feat),
        "step_invalid": metric_value(text, "rnnserve_requests_total", method="Step",
                                     code="INVALID_ARGUMENT", **feat),
        "step_unknown": metric_value(text, "rnnserve_requests_total", method="Step",
                                     code="NOT_FOUND", model=""),
        "stream_ok": metric_value(text, "rnnserve_requests_total", method="Stream", code="OK",
                                  **feat),
        "stream_invalid": metric_value(text, "rnnserve_requests_total", method="Stream",
                                       code="INVALID_ARGUMENT", **feat),
        "stream_cancelled": metric_value(text, "rnnserve_requests_total", method="Stream",
                                         code="CANCELLED"),
        "health": metric_value(text, "rnnserve_requests_total", api="health", method="Check",
                               code="OK"),
        "started": metric_value(text, "rnnserve_sessions_started_total", **feat),
        "closed": metric_value(text, "rnnserve_sessions_ended_total", reason="closed", **feat),
    }


def test_rejected_chunks_count_as_errors_never_as_latency(server) -> None:
    rng = np.random.default_rng(0)
    good = rng.standard_normal((5, 20)).astype(np.float32)
    wrong = rng.standard_normal((5, 19)).astype(np.float32)
    before = counts(server.metrics())
    with Client(server.target, timeout=10) as client:
        sid = client.open_session("feat").session_id
        for seq in range(3):
            client.step(sid, seq, good)
            with pytest.raises(grpc.RpcError) as err:
                client.step(sid, seq + 1, wrong)  # rejected: the session stays at seq + 1
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as err:
                client.step(sid, seq + 7, good)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.RpcError) as err:
                client.step("nobody", 0, good)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        client.step(sid, 3, good, end=True)
        health = health_pb2_grpc.HealthStub(client.channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    # an RPC is counted when the server has finished it, which can be just after the
    # client has its answer: wait for the last one to be counted
    deadline = time.monotonic() + 10
    while True:
        after = counts(server.metrics())
        if after["health"] > before["health"] or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    delta = {k: after[k] - before[k] for k in before}
    assert delta["ok"] == 4 and delta["latency"] == 4 and delta["latency_all"] == 4
    assert delta["invalid"] == 3 and delta["order"] == 3 and delta["unknown"] == 3
    assert delta["first"] == 1  # only the first answered chunk of the session
    assert delta["step_ok"] == 4 and delta["step_invalid"] == 3 and delta["step_unknown"] == 3
    assert delta["started"] == 1 and delta["closed"] == 1
    assert delta["health"] == 1


def test_streams_are_counted_by_final_code_and_the_gauge_returns_to_zero(server) -> None:
    x = np.zeros((2, 20), dtype=np.float32)
    before = counts(server.metrics())

    async def main() -> None:
        async with AsyncClient(server.target, timeout=10) as client:
            async with client.stream("feat") as s:  # a clean stream
                await s.send(x)
                await s.send(x, end=True)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with client.stream("feat") as s:  # aborted by a bad chunk
                    await s.send(np.zeros((2, 3), dtype=np.float32))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # a stream the client cancels mid-way, while the server waits for its next chunk
            call = client.stub.Stream()
            await call.write(pb.StreamRequest(open=pb.OpenSessionRequest(model="feat")))
            await call.read()
            await call.write(pb.StreamRequest(chunk=make_chunk(0, x)))
            await call.read()
            assert metric_value(server.metrics(), "rnnserve_open_streams", method="Stream") == 1
            call.cancel()
            await asyncio.sleep(0.3)

    asyncio.run(main())
    after = counts(server.metrics())
    delta = {k: after[k] - before[k] for k in before}
    assert delta["stream_invalid"] == 1
    # the cancelled stream is CANCELLED, or OK when gRPC delivered the cancel to the
    # waiting server as an end of stream (see server/interceptor.py)
    assert delta["stream_ok"] + delta["stream_cancelled"] == 2 and delta["stream_ok"] >= 1
    assert delta["ok"] == 3 and delta["latency"] == 3 and delta["invalid"] == 1
    assert metric_value(server.metrics(), "rnnserve_open_streams") == 0


def test_per_model_gauges_and_limits(server) -> None:
    def live(**labels: str) -> tuple[float, float]:
        text = server.metrics()
        return (metric_value(text, "rnnserve_active_sessions", **labels),
                metric_value(text, "rnnserve_state_bytes", **labels))

    for _ in range(3):
        # a session an earlier test left live lets its last chunk go a few seconds
        # after its answer (its state bytes shrink): a try in which that happened says
        # nothing about ours, and is made again
        feat0, text0 = live(model="feat"), live(model="text", version="2")
        with Client(server.target, timeout=10) as client:
            a = client.open_session("feat").session_id
            b = client.open_session("text").session_id
            feat1, text1 = live(model="feat"), live(model="text", version="2")
            client.close_session(a)
            client.close_session(b)
        if live(model="feat") == feat0 and live(model="text", version="2") == text0:
            break
    assert live(model="feat") == feat0 and live(model="text", version="2") == text0
    assert feat1[0] - feat0[0] == 1 and text1[0] - text0[0] == 1
    assert feat1[1] - feat0[1] == 2 * 2 * 24 * 4  # LSTM h and c: 2 layers x 24 floats
    text = server.metrics()
    assert metric_value(text, "rnnserve_queue_capacity", model="feat") == 4096
    assert metric_value(text, "rnnserve_max_batch_size", model="text", version="1") == 64
    assert metric_value(text, "rnnserve_session_capacity") == 10_000
    assert metric_value(text, "rnnserve_build_info", version="0.1.0") == 1
    assert "session" not in {label.split("=")[0] for line in text.splitlines()
                             if not line.startswith("#") and "{" in line
                             for label in line[line.index("{") + 1:line.index("}")].split(",")}


def test_health_watch_streams_through_the_interceptor(server) -> None:
    async def main() -> None:
        async with AsyncClient(server.target, timeout=10) as client:
            stub = health_pb2_grpc.HealthStub(client.channel)
            call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await call.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            assert metric_value(server.metrics(), "rnnserve_open_streams", api="health",
                                method="Watch") == 1
            call.cancel()
            await asyncio.sleep(0.3)

    asyncio.run(main())
    text = server.metrics()
    assert metric_value(text, "rnnserve_open_streams", api="health", method="Watch") == 0
    assert metric_value(text, "rnnserve_requests_total", api="health", method="Watch") == 1


def test_loop_families_expose_what_prometheus_client_would() -> None:
    """The per-chunk series are kept without locks (LoopFamily); a scrape must read
    exactly what prometheus_client's Counter and Histogram give for the same values,
    bucket boundaries included."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from rnnserve.server.metrics import LATENCY_BUCKETS, LoopFamily

    rng = np.random.default_rng(5)
    values = [*LATENCY_BUCKETS, 0.0, 50.0, *rng.exponential(0.02, 500).tolist()]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    ours_h = LoopFamily("histogram", "x_seconds", "doc", ("a", "b"), ours, LATENCY_BUCKETS)
    ours_c = LoopFamily("counter", "x_total", "doc", ("a",), ours)
    theirs_h = Histogram("x_seconds", "doc", ("a", "b"), buckets=LATENCY_BUCKETS,
                         registry=theirs)
    theirs_c = Counter("x_total", "doc", ("a",), registry=theirs)
    for i, v in enumerate(values):
        for h, c in ((ours_h, ours_c), (theirs_h, theirs_c)):
            h.labels("p" if i % 3 else "q", "1").observe(v)
            c.labels(str(i % 2)).inc()

    def lines(registry) -> list[str]:  # the _created series are turned off in the server
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if "_created" not in line)

    assert lines(ours) == lines(theirs)


def test_rpc_codes_of_a_failed_handler_and_a_passed_deadline() -> None:
    """A handler that raises is answered UNKNOWN and counted UNKNOWN (not OK); a call
    whose gRPC deadline passed while it waited is counted DEADLINE_EXCEEDED (a server
    error), not CANCELLED (a client that went away); a call the client cancels is
    CANCELLED. Both hold wherever the call is when it is cut off: "Flood" never awaits
    anything itself, so it is always cut off while gRPC writes a message it yielded,
    where the handler sees no error (counted OK before the fix; "Ticks" hit that only
    when its deadline fell on a write)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from rnnserve.server.interceptor import MetricsInterceptor
    from rnnserve.server.metrics import Metrics

    async def boom(request, context):
        raise RuntimeError("a bug")

    async def slow(request, context):
        await asyncio.sleep(2)
        return b"x"

    async def ticks(request, context):
        for _ in range(20):
            await asyncio.sleep(0.1)
            yield b"t"

    async def flood(request, context):
        while True:  # suspended only at the yield: gRPC's write blocks (flow control)
            yield b"f" * 1024

    async def main() -> tuple[dict[str, grpc.StatusCode], str]:
        metrics = Metrics(CollectorRegistry())
        server = grpc.aio.server(interceptors=[MetricsInterceptor(metrics)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "rnnserve.v1.Inference", {
                "Boom": grpc.unary_unary_rpc_method_handler(boom),
                "Slow": grpc.unary_unary_rpc_method_handler(slow),
                "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
                "Flood": grpc.unary_stream_rpc_method_handler(flood),
            })])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        seen: dict[str, grpc.StatusCode] = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for method, timeout in (("Boom", 5.0), ("Slow", 0.3)):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await channel.unary_unary(f"/rnnserve.v1.Inference/{method}")(
                            b"", timeout=timeout)
                    seen[method] = err.value.code()
                for method, timeout in (("Ticks", 0.3), ("Ticks", 5.0), ("Flood", 0.3),
                                        ("Flood", 5.0)):
                    call = channel.unary_stream(f"/rnnserve.v1.Inference/{method}")(
                        b"", timeout=timeout)
                    await call.read()
                    if timeout > 1:
                        call.cancel()
                    elif method == "Flood":  # leave the rest unread: its writes block
                        seen[method] = await call.code()
                    else:
                        with pytest.raises(grpc.aio.AioRpcError) as err:
                            while True:
                                await call.read()
                        seen[method] = err.value.code()
            # the server side completes after the client saw its status
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                text = generate_latest(metrics.registry).decode()
                if sum(metric_value(text, "rnnserve_requests_total", method=m)
                       for m in ("Boom", "Slow", "Ticks", "Flood")) == 6:
                    break
                await asyncio.sleep(0.05)
            return seen, text
        finally:
            await server.stop(0)

    seen, text = asyncio.run(main())
    assert seen == {"Boom": grpc.StatusCode.UNKNOWN, "Slow": grpc.StatusCode.DEADLINE_EXCEEDED,
                    "Ticks": grpc.StatusCode.DEADLINE_EXCEEDED,
                    "Flood": grpc.StatusCode.DEADLINE_EXCEEDED}
    def count(method: str, code: str) -> float:
        return metric_value(text, "rnnserve_requests_total", api="native", method=method,
                            code=code)

    assert count("Boom", "UNKNOWN") == 1 and count("Boom", "OK") == 0
    assert count("Slow", "DEADLINE_EXCEEDED") == 1 and count("Slow", "CANCELLED") == 0
    for method in ("Ticks", "Flood"):  # one call cut off by its deadline, one cancelled
        assert count(method, "DEADLINE_EXCEEDED") == 1, (method, text)
        assert count(method, "CANCELLED") == 1, (method, text)
        assert count(method, "OK") == 0, (method, text)
