"""Second review of the client: cancellation, resume and bench figures against real
servers (tests/cli/proxy.py holds or cuts their answers)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from rnnserve.client import AsyncClient, many_item
from rnnserve.client.client import new_session_id

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
