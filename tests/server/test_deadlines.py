"""Deadlines: a chunk still queued when its deadline passes never runs, and its session
does not advance. The server here waits long for batches (--max-batch-delay-ms), so a
lone chunk sits in the queue."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client
from rnnserve.client.client import item_status, make_chunk, many_item, outputs
from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

from ..oip.test_protocol import logits, reference, request
from .serving import metric_value, start_server


@pytest.fixture(scope="module")
def slow_batches(repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(repo, log, "--max-batch-delay-ms", "400")
    yield srv
    assert srv.stop() == 0, log.read_text()[-3000:]


def test_a_grpc_deadline_that_passes_in_the_queue_advances_nothing(slow_batches, repo) -> None:
    x = np.random.default_rng(8).standard_normal((6, 20)).astype(np.float32)
    with Client(slow_batches.target, timeout=10) as client:
        sid = client.open_session("feat").session_id
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Step(pb.StepRequest(session_id=sid, chunk=make_chunk(0, x[:3])),
                             timeout=0.1,
                             metadata=(("x-rnnserve-session", sid),))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        got = np.concatenate([client.step(sid, 0, x[:3])["logits"],
                              client.step(sid, 1, x[3:], end=True)["logits"]])
    assert float(np.abs(got - reference(repo, "feat", x[None])[0]).max()) <= 1e-5
    # counted as the client saw it: the alerts leave CANCELLED (callers that left) out
    assert metric_value(slow_batches.metrics(), "rnnserve_chunks_total", api="native",
                        code="DEADLINE_EXCEEDED") == 1


def test_the_triton_timeout_parameter_drops_a_late_request(slow_batches, repo) -> None:
    x = np.random.default_rng(9).standard_normal((1, 6, 20)).astype(np.float32)
    with grpc.insecure_channel(slow_batches.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        first = logits(stub.ModelInfer(request(x[:, :3], sequence_id="late",
                                               sequence_start=True)))
        with pytest.raises(grpc.RpcError) as info:  # 1 ms to run; batches wait 400 ms
            stub.ModelInfer(request(x[:, 3:], sequence_id="late", timeout=1000))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not run and nothing advanced" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request(x[:, 3:], sequence_id="late", timeout=-1))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        rest = logits(stub.ModelInfer(request(x[:, 3:], sequence_id="late", timeout=5_000_000,
                                              sequence_end=True)))
    got = np.concatenate([first, rest], axis=1)
    assert float(np.abs(got - reference(repo, "feat", x)).max()) <= 1e-5
    assert metric_value(slow_batches.metrics(), "rnnserve_chunks_total", api="kserve_v2",
                        code="DEADLINE_EXCEEDED") == 1



def test_a_chunk_timeout_fails_only_its_own_stream_many_item(slow_batches, repo) -> None:
    """Two sessions' chunks in one StreamMany request: the one with a 50 ms timeout
    waits for the 400 ms batch, is dropped alone (DEADLINE_EXCEEDED, its session as it
    was), and goes through when sent again; the other runs in that batch."""
    rng = np.random.default_rng(10)
    xa, xb = (rng.standard_normal((6, 20)).astype(np.float32) for _ in range(2))

    async def main():
        async with AsyncClient(slow_batches.target, timeout=10) as client:
            async with client.many() as m:
                a, b = "deadline-a", "deadline-b"
                opened = await m.send([many_item(a, 0, xa[:3], open_model="feat"),
                                       many_item(b, 0, xb[:3], open_model="feat")])
                late = await m.send([many_item(a, 1, xa[3:], end=True, timeout_ms=50),
                                     many_item(b, 1, xb[3:], end=True)])
                again = await m.send([many_item(a, 1, xa[3:], end=True, timeout_ms=5000)])
        return opened, late, again

    opened, late, again = asyncio.run(asyncio.wait_for(main(), 30))
    assert item_status(late[0]) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not run and nothing advanced" in late[0].message
    assert item_status(late[1]) == grpc.StatusCode.OK
    got_a = np.concatenate([outputs(opened[0].result)["logits"],
                            outputs(again[0].result)["logits"]])
    got_b = np.concatenate([outputs(opened[1].result)["logits"],
                            outputs(late[1].result)["logits"]])
    for got, x in ((got_a, xa), (got_b, xb)):
        assert float(np.abs(got - reference(repo, "feat", x[None])[0]).max()) <= 1e-5


def test_a_chunk_timeout_on_a_stream_or_step_advances_nothing(slow_batches, repo) -> None:
    """On a Stream the late chunk ends the stream with DEADLINE_EXCEEDED; the session,
    resumed on a new stream, takes the same chunk again. A unary Step's chunk timeout
    shorter than its call's deadline applies too."""
    x = np.random.default_rng(11).standard_normal((9, 20)).astype(np.float32)

    async def main():
        async with AsyncClient(slow_batches.target, timeout=10) as client:
            async with client.stream("feat") as s:
                first = (await s.send(x[:3]))["logits"]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await s.send(x[3:6], timeout_ms=50)
                sid = s.session_id
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            async with client.stream("feat", session_id=sid, resume=True) as s:
                assert s.next_seq == 1
                second = (await s.send(x[3:6]))["logits"]
            return sid, first, second

    sid, first, second = asyncio.run(asyncio.wait_for(main(), 30))
    with Client(slow_batches.target, timeout=10) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.step(sid, 2, x[6:], end=True, timeout_ms=50)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        third = client.step(sid, 2, x[6:], end=True)["logits"]
    got = np.concatenate([first, second, third])
    assert float(np.abs(got - reference(repo, "feat", x[None])[0]).max()) <= 1e-5


def test_a_stream_deadline_reached_in_the_queue_counts_deadline_exceeded(slow_batches,
                                                                          repo) -> None:
    """A Stream or StreamMany call whose gRPC deadline passes while its chunk waits for
    the 400 ms batch: the client gets DEADLINE_EXCEEDED and the chunk is counted so (a
    server too slow for its callers, which the error alerts count), not CANCELLED (a
    caller that went away, which they leave out); the session does not advance."""
    x = np.random.default_rng(12).standard_normal((6, 20)).astype(np.float32)

    def counted(code: str) -> float:
        return metric_value(slow_batches.metrics(), "rnnserve_chunks_total", api="native",
                            code=code)

    before = {c: counted(c) for c in ("DEADLINE_EXCEEDED", "CANCELLED")}
    with Client(slow_batches.target, timeout=10) as client:
        sid = client.open_session("feat").session_id
        many_sid = client.open_session("feat").session_id
        stub = client.stub
        stream = stub.Stream(iter([
            pb.StreamRequest(open=pb.OpenSessionRequest(session_id=sid, resume=True)),
            pb.StreamRequest(chunk=make_chunk(0, x[:3]))]),
            timeout=0.25, metadata=(("x-rnnserve-session", sid),))
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.5)  # the batch the given-up chunk began is gone: a new one waits
        many = stub.StreamMany(iter([pb.ManyRequest(id=1, items=[
            many_item(many_sid, 0, x[:3])])]), timeout=0.25)
        with pytest.raises(grpc.RpcError) as info:
            list(many)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        got = {s: np.concatenate([client.step(s, 0, x[:3])["logits"],
                                  client.step(s, 1, x[3:], end=True)["logits"]])
               for s in (sid, many_sid)}
    want = reference(repo, "feat", x[None])[0]
    for s, out in got.items():
        assert float(np.abs(out - want).max()) <= 1e-5, s
    # the handlers finish after the client saw its status
    for _ in range(50):
        if counted("DEADLINE_EXCEEDED") - before["DEADLINE_EXCEEDED"] >= 2:
            break
        time.sleep(0.1)
    assert counted("DEADLINE_EXCEEDED") - before["DEADLINE_EXCEEDED"] == 2
    assert counted("CANCELLED") == before["CANCELLED"]
