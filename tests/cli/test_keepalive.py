"""HTTP/2 keepalive between the client and a real server: the server's allowance for
client pings (--min-client-ping-s), the client's keepalive (AsyncClient(keepalive_s=)),
the server's own pings (--keepalive-s), through a TCP proxy (tests/cli/proxy.py) that
shows the PING and GOAWAY frames passing and black-holes the traffic on demand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from rnnserve.client import AsyncClient, Client
from rnnserve.server.settings import Settings

from ..server.serving import ServerProcess, metric_value, start_server
from .proxy import ENHANCE_YOUR_CALM, Proxy
from .test_cli import assert_one_line_error, rnnserve


def _server(repo, tmp_path_factory, name: str, *flags: str) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    srv = start_server(repo, log, *flags)
    yield srv
    assert srv.stop() == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def permissive(repo, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server that takes a client's ping every half second."""
    yield from _server(repo, tmp_path_factory, "permissive", "--min-client-ping-s", "0.5")


@pytest.fixture(scope="module")
def default(repo, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server with the default allowance: a client's ping every 10 s."""
    yield from _server(repo, tmp_path_factory, "default")


@pytest.fixture(scope="module")
def pinging(repo, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server that pings its clients after a second of silence, and gives up on one
    that does not answer within a second."""
    yield from _server(repo, tmp_path_factory, "pinging", "--keepalive-s", "1",
                       "--keepalive-timeout-s", "1")


def open_streams(server: ServerProcess) -> float:
    return metric_value(server.metrics(), "rnnserve_open_streams")


def test_a_client_pinging_within_the_servers_allowance_keeps_its_idle_stream(
        permissive) -> None:
    """A client pinging every second on an idle stream, against a server that takes a
    ping every half second: the pings cross (5 of them), no GOAWAY comes, and the stream steps
    on exactly as a session that never paused (gRPC's own allowance, a ping per 5
    minutes and 2 strikes, would cut it at the fourth ping)."""
    proxy = Proxy(permissive.grpc_port)

    async def main() -> tuple[np.ndarray, np.ndarray, int]:
        async with AsyncClient(proxy.target, timeout=10, keepalive_s=1) as client:
            async with client.stream("text") as s:
                await s.send("hello ")
                before = proxy.pings()
                await asyncio.sleep(5.5)  # idle: nothing but pings
                pings = proxy.pings() - before
                paused = (await s.send("world", end=True))["logits"]
        async with AsyncClient(permissive.target, timeout=10) as client:
            async with client.stream("text") as s:
                await s.send("hello ")
                straight = (await s.send("world", end=True))["logits"]
        return paused, straight, pings

    try:
        paused, straight, pings = asyncio.run(main())
    finally:
        proxy.close()
    assert pings >= 4, pings
    assert proxy.goaways() == []
    np.testing.assert_allclose(paused, straight, rtol=0, atol=1e-6)


def test_a_client_pinging_more_often_than_the_server_allows_is_cut(default) -> None:
    """The same client against the default allowance (a ping per 10 s): the third early
    ping since the server last sent data brings GOAWAY ENHANCE_YOUR_CALM too_many_pings,
    the idle stream fails with UNAVAILABLE, and the client's next stream reconnects."""
    proxy = Proxy(default.grpc_port)

    async def main() -> tuple[float, grpc.aio.AioRpcError, tuple[int, ...]]:
        async with AsyncClient(proxy.target, timeout=10, keepalive_s=1) as client:
            async with client.stream("text") as s:
                await s.send("hello ")
                started = time.monotonic()
                while not proxy.goaways() and time.monotonic() - started < 12:
                    await asyncio.sleep(0.1)
                cut_after = time.monotonic() - started
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await s.send("world")
            async with client.stream("text") as s:  # a new connection
                shape = (await s.send("again", end=True))["logits"].shape
        return cut_after, err.value, shape

    try:
        cut_after, err, shape = asyncio.run(main())
    finally:
        proxy.close()
    assert proxy.goaways() == [(ENHANCE_YOUR_CALM, b"too_many_pings")], cut_after
    assert 2 < cut_after < 8  # pings 2, 3 and 4 of a ping a second
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "ping" in (err.details() or "").lower(), err.details()
    assert shape == (5, 256)


def test_a_client_with_keepalive_gives_up_on_a_black_holed_connection(permissive) -> None:
    """The network drops everything (the proxy freezes, the TCP connection stays open):
    a stream with keepalive 1 s and timeout 1 s fails with UNAVAILABLE within seconds,
    while one without keepalive still waits for its answer."""
    proxy = Proxy(permissive.grpc_port)

    async def main() -> tuple[float, grpc.aio.AioRpcError, bool]:
        async with AsyncClient(proxy.target, keepalive_s=1, keepalive_timeout_s=1) as alive, \
                AsyncClient(proxy.target) as plain:
            async with alive.stream("text") as a, plain.stream("text") as p:
                await a.send("hello ")
                await p.send("hello ")
                await asyncio.sleep(1.5)  # idle a while (pings pass) before the network goes
                proxy.freeze()
                started = time.monotonic()
                waiting = asyncio.ensure_future(p.send("world"))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(a.send("world"), 10)
                failed_after = time.monotonic() - started
                await asyncio.sleep(max(0.0, 6 - failed_after))
                still_waiting = not waiting.done()
                waiting.cancel()
                with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
                    await waiting
        return failed_after, err.value, still_waiting

    try:
        failed_after, err, still_waiting = asyncio.run(main())
    finally:
        proxy.close()
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert failed_after < 5, failed_after  # a ping within 1 s, unanswered for 1 s
    assert still_waiting  # without keepalive: no answer, no error, 6 s on


def test_the_server_pings_idle_clients_and_drops_one_that_stopped_answering(
        pinging) -> None:
    """--keepalive-s 1 --keepalive-timeout-s 1: the server pings a connection whose
    stream is idle, and once the network drops everything it ends the stream of the
    client that no longer answers (the client has no keepalive of its own)."""
    proxy = Proxy(pinging.grpc_port)

    async def main() -> tuple[int, float, float, float | None]:
        base = open_streams(pinging)
        async with AsyncClient(proxy.target, timeout=10) as client:
            async with client.stream("text") as s:
                await s.send("hello ")
                before = proxy.pings("down")
                await asyncio.sleep(4.5)  # a ping after each second idle, and its answer
                pings = proxy.pings("down") - before
                opened = open_streams(pinging) - base
                proxy.freeze()
                started = time.monotonic()
                ended_after = None
                while time.monotonic() - started < 8:
                    if open_streams(pinging) == base:
                        ended_after = time.monotonic() - started
                        break
                    await asyncio.sleep(0.1)
                proxy.cut()  # the client's stream ends too
                with pytest.raises(grpc.aio.AioRpcError):
                    await s.send("world")
        return pings, opened, base, ended_after

    try:
        pings, opened, base, ended_after = asyncio.run(main())
    finally:
        proxy.close()
    assert pings >= 2, pings
    assert opened == 1
    assert ended_after is not None and ended_after < 5, ended_after


def test_keepalive_settings_and_arguments_are_checked(repo) -> None:
    s = Settings.load()
    assert (s.keepalive_s, s.keepalive_timeout_s, s.min_client_ping_s) == (60.0, 20.0, 10.0)
    assert Settings.load(keepalive_s="0", min_client_ping_s="0").keepalive_s == 0.0  # off
    for field, bad in [("keepalive_s", "-1"), ("keepalive_timeout_s", "0"),
                       ("min_client_ping_s", "-0.5"), ("keepalive_s", "inf"),
                       ("keepalive_timeout_s", "nan"), ("min_client_ping_s", "1e7"),
                       ("max_connection_age_s", "1e7"), ("lease_s", "inf"),
                       ("idle_timeout_s", "nan")]:  # no inf or nan in any setting
        with pytest.raises(ValidationError, match=field):
            Settings.load(**{field: bad})
    proc = rnnserve("serve", "--repo", str(repo), "--keepalive-s", "-1", timeout=60)
    assert_one_line_error(proc, "keepalive_s", "greater than or equal to 0")
    for kwargs in ({"keepalive_s": -1.0}, {"keepalive_s": 1.0, "keepalive_timeout_s": 0.0}):
        with pytest.raises(ValueError, match="keepalive"):
            Client("127.0.0.1:1", **kwargs)
    proc = rnnserve("stream", "--keepalive-s", "nan", "--model", "text", "x", timeout=60)
    assert_one_line_error(proc, "--keepalive-s must be from 0 to")
    for keepalive_s, timeout_s in [(float("nan"), 20.0), (1.0, 1e7), (-1.0, 20.0)]:
        with pytest.raises(ValueError, match="keepalive_s must be"):
            AsyncClient("127.0.0.1:1", keepalive_s=keepalive_s, keepalive_timeout_s=timeout_s)
