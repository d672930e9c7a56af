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
