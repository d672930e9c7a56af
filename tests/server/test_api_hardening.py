"""The native API's edges against a real in-process server (gRPC on loopback, real
onnxruntime): failed items leave no session behind, rejected chunks do not count as
use, a reopened id is not held by its old incarnation, an aborted stream is not
aborted twice, and a StreamMany answer always fits in one message."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import grpc
import pytest

from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.server.settings import Settings

from .serving import InProcessServer

TEXT = pb.OpenSessionRequest(model="text")
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


@pytest.fixture
def serve(repo) -> Iterator:
    """Start in-process servers on ``repo`` with the given settings; stopped after the test."""
    started: list[InProcessServer] = []

    def start(**kw: object) -> InProcessServer:
        settings = dict(repo=repo, host="127.0.0.1", grpc_port=0, metrics_port=0,
                        device="cpu", intra_op_threads=1, warmup="off")
        settings.update(kw)
        srv = InProcessServer(Settings(**settings))  # type: ignore[arg-type]
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def chunk(seq: int, text: str, **kw: object) -> pb.Chunk:
    return pb.Chunk(seq=seq, text=text, **kw)  # type: ignore[arg-type]


async def until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_a_many_item_that_opens_its_session_and_then_fails_leaves_no_session(serve) -> None:
    """The item's chunk fails (no data, its own timeout, the stream cancelled while it
    waits): the session its open created is gone again, so the same item can be sent
    again, and server-assigned ids leave no orphans behind."""
    srv = serve(max_batch_delay_ms=400)
    store = srv.server.store

    async def main() -> None:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            call = stub.StreamMany()

            async def send(rid: int, *items: pb.ManyItem) -> list[pb.ManyResult]:
                await call.write(pb.ManyRequest(id=rid, items=items))
                resp = await call.read()
                assert resp.id == rid
                return list(resp.results)

            failed = await send(1, pb.ManyItem(session_id="x", open=TEXT, chunk=pb.Chunk(seq=0)),
                                pb.ManyItem(session_id="y", open=TEXT,
                                            chunk=chunk(0, "hi", timeout_ms=20)),
                                pb.ManyItem(open=TEXT, chunk=chunk(0, "hi", timeout_ms=20)))
            assert [r.code for r in failed] == [INVALID_ARGUMENT, DEADLINE_EXCEEDED,
                                                DEADLINE_EXCEEDED], failed
            assert not any(r.HasField("opened") for r in failed)
            assert [r.session_id for r in failed] == ["x", "y", ""]
            assert len(store) == 0  # nothing opened stays

            again = await send(2, pb.ManyItem(session_id="x", open=TEXT, chunk=chunk(0, "hi")),
                               pb.ManyItem(session_id="y", open=TEXT, chunk=chunk(0, "hi")))
            assert [(r.code, r.opened.session_id, r.result.seq) for r in again] == \
                [(0, "x", 0), (0, "y", 0)], again
            assert len(store) == 2

            # the stream goes away while the item's chunk waits for its batch
            await call.write(pb.ManyRequest(id=3, items=[
                pb.ManyItem(session_id="z", open=TEXT, chunk=chunk(0, "hi"))]))
            assert await until(lambda: store.peek("z") is not None)
            call.cancel()
            assert await until(lambda: store.peek("z") is None), "z stayed open"
            assert sorted(store.live_ids()) == ["x", "y"]

            resent = stub.StreamMany()  # the cancelled item, sent again on a new stream
            await resent.write(pb.ManyRequest(id=4, items=[
                pb.ManyItem(session_id="z", open=TEXT, chunk=chunk(0, "hi"))]))
            r = (await resent.read()).results[0]
            assert (r.code, r.opened.session_id, r.result.seq) == (0, "z", 0), r
            await resent.done_writing()

    asyncio.run(main())


def test_rejected_chunks_neither_keep_a_session_alive_nor_move_it_in_the_lru(serve) -> None:
    srv = serve(max_sessions=2, idle_timeout_s=1.0)

    async def main() -> None:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.InferenceStub(ch)

            async def step(sid: str, c: pb.Chunk) -> str:
                try:
                    await stub.Step(pb.StepRequest(session_id=sid, chunk=c))
                except grpc.aio.AioRpcError as exc:
                    return f"{exc.code().name} {exc.details()}"
                return "OK"

            for sid in ("a", "b"):
                await stub.OpenSession(pb.OpenSessionRequest(model="text", session_id=sid))
            assert (await step("a", chunk(5, "zz"))).startswith("FAILED_PRECONDITION")
            assert (await step("a", pb.Chunk(seq=0))).startswith("INVALID_ARGUMENT")
            await stub.OpenSession(pb.OpenSessionRequest(model="text", session_id="c"))
            # a is still the least recently used: it makes room for c, not b
            assert await step("b", chunk(0, "x")) == "OK"
            assert (await step("a", chunk(0, "x"))).startswith("RESOURCE_EXHAUSTED")

            codes = []  # c idles, but for rejected chunks
            started = time.monotonic()
            while time.monotonic() - started < 2.0:
                codes.append((await step("c", pb.Chunk(seq=0))).split()[0])
                await asyncio.sleep(0.2)
            assert codes[0] == "INVALID_ARGUMENT" and codes[-1] == "NOT_FOUND", codes
            assert "expired after 1s" in await step("c", chunk(0, "x"))

    asyncio.run(main())


def test_a_reopened_id_is_not_held_by_the_step_of_its_closed_incarnation(serve, repo) -> None:
    """Closed while its step waits for its batch, then opened again: the new session
    steps at once, and the old step's caller hears that its session ended."""
    srv = serve(max_batch_delay_ms=1500)

    async def main() -> None:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            await stub.OpenSession(pb.OpenSessionRequest(model="text", session_id="s"))
            old = asyncio.ensure_future(stub.Step(pb.StepRequest(
                session_id="s", chunk=chunk(0, "old"))))
            await asyncio.sleep(0.3)  # queued: its batch waits 1.5 s for more steps
            await stub.CloseSession(pb.CloseSessionRequest(session_id="s"))
            await stub.OpenSession(pb.OpenSessionRequest(model="text", session_id="s"))
            new = await stub.Step(pb.StepRequest(session_id="s", chunk=chunk(0, "new")))
            assert new.result.seq == 0
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await old
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "'s' has ended" in info.value.details()
            await stub.OpenSession(pb.OpenSessionRequest(model="text", session_id="t"))
            fresh = await stub.Step(pb.StepRequest(session_id="t", chunk=chunk(0, "new")))
            assert new.result == fresh.result  # the old step did not touch the new session
            nxt = await stub.Step(pb.StepRequest(session_id="s", chunk=chunk(1, "go")))
            assert nxt.result.seq == 1

    asyncio.run(main())


@pytest.mark.parametrize("method,first", [
    ("Stream", pb.StreamRequest(open=TEXT)),
    ("StreamMany", pb.ManyRequest(id=1, items=[pb.ManyItem(session_id="m", open=TEXT)])),
])
def test_undecodable_bytes_in_a_stream_end_it_once_without_an_error_logged(
        serve, caplog, method, first) -> None:
    srv = serve()

    async def main() -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            call = ch.stream_stream(f"/rnnserve.v1.Inference/{method}",
                                    request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)()
            await call.write(first.SerializeToString())
            assert await call.read()
            await call.write(b"\xff\xff\xff\xff not a message")
            with pytest.raises(grpc.aio.AioRpcError):
                while await call.read() is not grpc.aio.EOF:
                    pass
            code, details = await call.code(), await call.details()
        await asyncio.sleep(0.2)  # whatever the server logs after the call ended
        return code, details

    with caplog.at_level(logging.INFO):
        code, details = asyncio.run(main())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not decode" in details
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_a_many_request_whose_answers_would_not_fit_in_one_message_refuses_the_rest(
        serve) -> None:
    """A text model answers 1 KiB per input byte: three 25-byte chunks need ~77 KB, more
    than a 64 KiB message. The items that fit run; the rest are refused (and not
    opened), and the stream goes on."""
    srv = serve(max_message_bytes=64 << 10)
    store = srv.server.store

    async def main() -> None:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            call = pb_grpc.InferenceStub(ch).StreamMany()
            text = "x" * 25
            await call.write(pb.ManyRequest(id=1, items=[
                pb.ManyItem(session_id=sid, open=TEXT, chunk=chunk(0, text)) for sid in "abc"]))
            resp = await call.read()
            assert resp.ByteSize() <= 64 << 10
            got = [(r.session_id, r.code) for r in resp.results]
            assert got == [("a", 0), ("b", 0), ("c", INVALID_ARGUMENT)], resp.results[2].message
            assert "fewer items" in resp.results[2].message
            assert sorted(store.live_ids()) == ["a", "b"]  # c was never opened
            await call.write(pb.ManyRequest(id=2, items=[
                pb.ManyItem(session_id="c", open=TEXT, chunk=chunk(0, text)),
                pb.ManyItem(session_id="a", chunk=chunk(1, text))]))
            resp = await call.read()
            assert [(r.code, r.result.seq) for r in resp.results] == [(0, 0), (0, 1)]
            await call.done_writing()

    asyncio.run(main())


def test_a_many_request_that_fits_only_by_its_own_models_answers_is_answered_whole(
        serve) -> None:
    """The server first bounds a request's answer by the largest model's answers (the
    text model: 1 KiB per step); twenty 10-step chunks of the feature model (28 bytes
    per step) pass that bound of a 64 KiB message fourfold, yet their own answers fit:
    every item is answered, none refused."""
    import numpy as np

    from rnnserve.protos.tensors import from_tensor, to_tensor

    srv = serve(max_message_bytes=64 << 10)
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((10, 20)).astype(np.float32) for _ in range(20)]

    async def main() -> list[np.ndarray]:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            call = pb_grpc.InferenceStub(ch).StreamMany()
            await call.write(pb.ManyRequest(id=1, items=[
                pb.ManyItem(session_id=f"f{i}", open=pb.OpenSessionRequest(model="feat"),
                            chunk=pb.Chunk(seq=0, tensor=to_tensor(x)))
                for i, x in enumerate(xs)]))
            resp = await call.read()
            await call.done_writing()
            assert [(r.code, r.message) for r in resp.results] == [(0, "")] * 20
            return [from_tensor(r.result.outputs[0].tensor) for r in resp.results]

    got = asyncio.run(main())
    rt = srv.server.registry.get("feat")
    for x, y in zip(xs, got, strict=True):  # each one its own session's answer
        want, _ = rt.run([x], [rt.zero_state()])
        np.testing.assert_allclose(y, want[0][0], atol=1e-5)


def test_an_item_whose_chunk_cannot_be_decoded_fails_alone(serve, monkeypatch) -> None:
    """Whatever one item's decoding raises, the other items of the request are answered
    and the stream goes on."""
    from rnnserve.server import api

    real = api.chunk_input

    def broken(c: pb.Chunk):
        if c.text == "boom":
            raise ValueError("injected")
        return real(c)

    monkeypatch.setattr(api, "chunk_input", broken)
    srv = serve()

    async def main() -> None:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            call = pb_grpc.InferenceStub(ch).StreamMany()
            await call.write(pb.ManyRequest(id=1, items=[
                pb.ManyItem(session_id="p", open=TEXT)]))
            assert (await call.read()).results[0].code == 0
            await call.write(pb.ManyRequest(id=2, items=[
                pb.ManyItem(session_id="p", chunk=chunk(0, "boom")),
                pb.ManyItem(session_id="q", open=TEXT, chunk=chunk(0, "boom")),
                pb.ManyItem(session_id="r", open=TEXT, chunk=chunk(0, "fine"))]))
            resp = await call.read()
            assert [r.code for r in resp.results] == [grpc.StatusCode.INTERNAL.value[0]] * 2 + [0]
            await call.write(pb.ManyRequest(id=3, items=[
                pb.ManyItem(session_id="p", chunk=chunk(0, "fine"))]))
            r = (await call.read()).results[0]
            assert (r.code, r.result.seq) == (0, 0)  # p did not advance
            await call.done_writing()

    asyncio.run(main())
    assert sorted(srv.server.store.live_ids()) == ["p", "r"]  # q was never opened
