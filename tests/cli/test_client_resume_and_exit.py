"""The client against what a third review of it found: a chunk sent again after a resume
that failed on the way, leaving a stream with answers still due, unary calls with a
replica gone. Real servers on loopback (tests/cli/proxy.py holds their answers)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from rnnserve.client import OWN_CONNECTION, AsyncClient, many_item

from ..server.serving import ServerProcess
from ..server.test_grpc_api import whole_run
from .proxy import Proxy


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[Proxy]:
    p = Proxy(server.grpc_port)
    yield p
    p.close()


def test_a_chunk_whose_resend_fails_after_a_resume_goes_again_under_its_number(
        proxy, repo) -> None:
    """A chunk the server ran lost its answer (held past the client's timeout); the next
    send of it resumes the session, which the server says is past that chunk, and its
    answer is held again. Sent once more, it must go under its own number (answered
    from the server's stored answer), not as the next chunk: its bytes would be
    applied twice."""
    async def main() -> tuple[np.ndarray, int, int]:
        async with AsyncClient(proxy.target, timeout=0.5, reconnect_s=5) as client:
            async with client.stream("text") as s:
                first = (await s.send("abcd"))["logits"]
                proxy.hold()
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await s.send("efgh")  # run by the server, its answer held
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                proxy.release()

                async def hold_after_the_resume() -> None:
                    while s.resumes == 0:  # the resume is answered, then nothing
                        await asyncio.sleep(0)
                    proxy.hold()

                watcher = asyncio.ensure_future(hold_after_the_resume())
                with pytest.raises(grpc.aio.AioRpcError) as again:
                    await s.send("efgh")
                await watcher
                assert again.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                at = s.next_seq
                proxy.release()
                second = (await s.send("efgh"))["logits"]
                third = (await s.send("ijkl", end=True))["logits"]
                return np.concatenate([first, second, third]), at, s.next_seq

    got, at, after = asyncio.run(main())
    assert at == 1, "the chunk that failed is still the one to send"
    assert after == 3
    want = whole_run(repo, "text", 2, np.frombuffer(b"abcdefghijkl", np.uint8))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_leaving_a_many_stream_with_an_answer_due_is_bounded_and_keeps_cancellation(
        server, proxy) -> None:
    """A send gave up on its answer (held): leaving the block waits for it at most the
    client's timeout, then cancels the stream, instead of waiting forever; a caller's
    own cancellation while it waits there is raised, not swallowed."""
    async def leave(sid: str, cancel_after: float | None) -> float:
        # 2 s: the sends that must be answered are, on a busy machine too; a connection
        # of its own: gRPC would else reuse the one proxy.cut() broke
        async with AsyncClient(proxy.target, timeout=2.0, options=OWN_CONNECTION) as client:
            started = 0.0
            async with client.many() as m:
                await m.send([many_item(sid, 0, "ab", open_model="text")])
                proxy.hold()
                with pytest.raises(grpc.aio.AioRpcError):
                    await m.send([many_item(sid, 1, "cd")])
                if cancel_after is not None:  # well within the wait's bound (2 s)
                    asyncio.get_running_loop().call_later(
                        cancel_after, asyncio.current_task().cancel)  # type: ignore[union-attr]
                started = time.monotonic()
            return time.monotonic() - started

    try:
        took = asyncio.run(asyncio.wait_for(leave("due-1", None), 30))
        assert took < 6.0, f"leaving took {took:.2f} s"  # bounded by the 2 s timeout
        proxy.release()
        proxy.cut()
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(asyncio.wait_for(leave("due-2", 0.5), 30))
    finally:
        proxy.release()


def test_unary_calls_pass_over_a_replica_that_is_gone(server) -> None:
    """With several targets, metadata, model lists and closes go to the first one that
    is there: the first replica listed being gone (as after a stream moved off it) no
    longer fails them."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        gone = f"127.0.0.1:{sock.getsockname()[1]}"

    async def main() -> tuple[list[str], str, grpc.StatusCode]:
        async with AsyncClient([gone, server.target], timeout=5, reconnect_s=5) as client:
            names = sorted({m.name for m in await client.list_models()})
            meta = await client.model_metadata("text")
            async with client.stream("text") as s:  # moves on to the second
                await s.send("abc")
            assert s.resumes == 1
            await client.close_session(s.session_id)
            with pytest.raises(grpc.aio.AioRpcError) as closed:
                await client.close_session(s.session_id)  # closed before: refused there
            return names, meta.name, closed.value.code()

    names, meta_name, closed = asyncio.run(main())
    assert names == ["feat", "text"] and meta_name == "text"
    assert closed != grpc.StatusCode.UNAVAILABLE
