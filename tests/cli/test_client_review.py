"""Second review of the client: cancellation, resume and bench figures against real
servers (tests/cli/proxy.py holds or cuts their answers)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import grpc
import pytest

from rnnserve.client import AsyncClient, many_item, outputs
from rnnserve.client.bench import Spawned
from rnnserve.client.client import new_session_id
from rnnserve.client.load import realtime_streams

from ..server.serving import ServerProcess
from .proxy import Proxy


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[Proxy]:
    p = Proxy(server.grpc_port)
    yield p
    p.close()


def test_a_many_stream_left_by_an_error_fails_its_waiting_and_later_sends(proxy) -> None:
    """An error (or a cancellation) in the block cancels the stream: a send another task
    still waits on, and any later send, fail at once instead of waiting forever."""
    sid = new_session_id()

    async def main() -> tuple[BaseException | None, BaseException | None]:
        async with AsyncClient(proxy.target) as client:
            m = client.many()
            waiting: asyncio.Future[object] | None = None
            with pytest.raises(RuntimeError):
                async with m:
                    await m.send([many_item(sid, 0, "ab", open_model="text")])
                    proxy.hold()
                    waiting = asyncio.ensure_future(m.send([many_item(sid, 1, "cd")]))
                    await asyncio.sleep(0.3)
                    raise RuntimeError("the caller gives up")
            assert waiting is not None
            failures: list[BaseException | None] = []
            for pending in (waiting, asyncio.ensure_future(m.send([many_item(sid, 1, "cd")]))):
                try:
                    await asyncio.wait_for(asyncio.shield(pending), 3)
                    failures.append(None)
                except TimeoutError:
                    pending.cancel()
                    raise AssertionError("a send of the cancelled stream still waits") from None
                except BaseException as exc:  # noqa: BLE001
                    failures.append(exc)
            proxy.release()
            return failures[0], failures[1]

    first, later = asyncio.run(main())
    for exc in (first, later):
        assert isinstance(exc, grpc.aio.AioRpcError), repr(exc)
        assert exc.code() == grpc.StatusCode.CANCELLED


def test_the_transport_ceiling_serves_many_streams_per_message(server, tmp_path) -> None:
    """`bench --baselines --many N` measures the echo server with StreamMany too: it must
    answer it as rnnserve does (every item, its session opened by its first)."""
    blob = tmp_path / "metadata.bin"

    async def meta() -> bytes:
        async with AsyncClient(server.target) as client:
            return (await client.model_metadata("text")).SerializeToString()

    blob.write_bytes(asyncio.run(meta()))
    echo = Spawned([sys.executable, "-m", "rnnserve.client.echo", "--metadata", str(blob)],
                   tmp_path / "echo.log")
    try:
        result = asyncio.run(realtime_streams(echo.target, "text", lambda k: b"abcd" * 4,
                                              streams=4, chunk_s=0.04, duration_s=0.5,
                                              many=2, session_chunks=5))
        ids = asyncio.run(_many_once(echo.target))
    finally:
        echo.stop()
    assert not result.errors, result.errors
    assert result.answered >= 40 and result.sessions >= 8
    assert ids == ("a", "b", (16, 256), (16, 256))


async def _many_once(target: str) -> tuple[object, ...]:
    async with AsyncClient(target) as client, client.many() as m:
        results = await m.send([many_item("a", 0, b"x" * 16, open_model="text"),
                                many_item("b", 0, b"y" * 16, open_model="text")])
    return (results[0].session_id, results[1].session_id,
            outputs(results[0].result)["logits"].shape,
            outputs(results[1].result)["logits"].shape)
