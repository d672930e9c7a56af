"""The shared store goes away and comes back (a real redis-server stopped and started):
the server refuses or degrades as configured, and no call waits long."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client

from ..server.serving import metric_value
from ..server.test_grpc_api import whole_run
from .test_failover import code_and_message, serve

X = np.random.default_rng(4).standard_normal((9, 20)).astype(np.float32)


def timed(fn, *args, **kw):
    started = time.monotonic()
    try:
        return fn(*args, **kw), time.monotonic() - started
    except grpc.RpcError as exc:
        return exc, time.monotonic() - started


def test_refuse_mode_answers_unavailable_at_once_and_changes_nothing(repo, redis_server,
                                                                     tmp_path) -> None:
    a = serve(repo, tmp_path, "a", redis_server.url, "--store-timeout-ms", "300")
    try:
        with Client(a.target, timeout=10) as client:
            sid = client.open_session("feat").session_id
            y0 = client.step(sid, 0, X[:3])["logits"]
            redis_server.stop()
            for call in (lambda: client.open_session("feat"),
                         lambda: client.step(sid, 1, X[3:6])):
                exc, seconds = timed(call)
                assert isinstance(exc, grpc.RpcError), exc
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert "session store" in exc.details() and seconds < 3
            redis_server.start()  # empty: it kept nothing
            # the refused step did not advance the session; the store lost its record
            code, msg = code_and_message(client.step, sid, 1, X[3:6])
            assert code == grpc.StatusCode.ABORTED and "no longer holds" in msg
            fresh = client.open_session("feat").session_id
            got = np.concatenate([client.step(fresh, 0, X[:3])["logits"],
                                  client.step(fresh, 1, X[3:], end=True)["logits"]])
            assert float(np.abs(got - whole_run(repo, "feat", 1, X)).max()) <= 1e-5
            assert np.abs(y0 - got[:3]).max() <= 1e-5
        text = a.metrics()
        assert metric_value(text, "rnnserve_store_errors_total", op="write") >= 2  # open, step
    finally:
        assert a.stop() == 0


def test_degrade_mode_serves_from_memory_while_the_store_is_down(repo, redis_server,
                                                                 tmp_path) -> None:
    a = serve(repo, tmp_path, "a", redis_server.url, "--store-timeout-ms", "300",
              "--store-failure", "degrade")
    want = whole_run(repo, "feat", 1, X)
    try:
        with Client(a.target, timeout=10) as client:
            before = client.open_session("feat").session_id
            parts = [client.step(before, 0, X[:3])["logits"]]
            redis_server.stop()
            during, seconds = timed(client.open_session, "feat")
            assert not isinstance(during, grpc.RpcError) and seconds < 3
            parts.append(client.step(before, 1, X[3:6])["logits"])
            other = [client.step(during.session_id, 0, X[:4])["logits"]]
            redis_server.start()
            parts.append(client.step(before, 2, X[6:], end=True)["logits"])
            other.append(client.step(during.session_id, 1, X[4:], end=True)["logits"])
            for got in (np.concatenate(parts), np.concatenate(other)):
                assert float(np.abs(got - want).max()) <= 1e-5
        text = a.metrics()
        assert metric_value(text, "rnnserve_store_degraded_total", op="create") == 1
        assert metric_value(text, "rnnserve_store_degraded_total", op="checkpoint") == 2
    finally:
        assert a.stop() == 0


@pytest.mark.parametrize("mode", ["refuse", "degrade"])
def test_a_server_starts_with_the_store_down(repo, tmp_path, mode) -> None:
    a = serve(repo, tmp_path, "a", "redis://127.0.0.1:1/0", "--store-timeout-ms", "200",
              "--store-failure", mode)
    try:
        with Client(a.target, timeout=10) as client:
            result, seconds = timed(client.open_session, "feat")
            assert seconds < 3
            if mode == "refuse":
                assert result.code() == grpc.StatusCode.UNAVAILABLE
            else:
                assert client.step(result.session_id, 0, X[:2])["logits"].shape == (2, 7)
    finally:
        assert a.stop() == 0
    assert "session store unreachable at start" in (tmp_path / "a.log").read_text()


def test_a_store_that_forgot_its_scripts_is_given_them_again(repo, redis_server,
                                                             tmp_path) -> None:
    """SCRIPT FLUSH (what a restart or a failover to a replica does to the script
    cache): the next batch write loads its script again and the session goes on."""
    a = serve(repo, tmp_path, "a", redis_server.url)
    try:
        with Client(a.target, timeout=10) as client:
            sid = client.open_session("feat").session_id
            parts = [client.step(sid, 0, X[:3])["logits"]]
            redis_server.client().script_flush()
            parts.append(client.step(sid, 1, X[3:6])["logits"])
            stored = redis_server.client().hget(f"rnnserve:{{{sid}}}:s", "seq")
            parts.append(client.step(sid, 2, X[6:], end=True)["logits"])
        assert stored == b"2"
        got = np.concatenate(parts)
        assert float(np.abs(got - whole_run(repo, "feat", 1, X)).max()) <= 1e-5
        assert metric_value(a.metrics(), "rnnserve_store_errors_total", op="write") == 0
    finally:
        assert a.stop() == 0


def test_degrade_mode_writes_again_once_a_store_that_kept_its_data_is_back(
        repo, redis_server, tmp_path) -> None:
    """An outage where Redis keeps its data (it stalls past the timeout, as under
    ``CLIENT PAUSE``, or a network blip): the steps served from memory meanwhile leave the
    stored record behind. The next step once the store answers writes the session again
    (not refused as moved), and another server then resumes it exactly where it is."""
    a = serve(repo, tmp_path, "a", redis_server.url, "--store-timeout-ms", "200",
              "--store-failure", "degrade")
    b = serve(repo, tmp_path, "b", redis_server.url, "--store-timeout-ms", "200",
              "--lease-s", "0.3")
    redis = redis_server.client()
    try:
        with Client(a.target, timeout=10) as client:
            sid = client.open_session("feat").session_id
            parts = [client.step(sid, 0, X[:2])["logits"]]  # durable: the store is at 1
            redis.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
            try:
                for k in (1, 2):  # their writes time out: served from memory
                    parts.append(client.step(sid, k, X[2 * k:2 * k + 2])["logits"])
            finally:
                redis.execute_command("CLIENT", "UNPAUSE")
            parts.append(client.step(sid, 3, X[6:8])["logits"])  # written again
        text = a.metrics()
        assert metric_value(text, "rnnserve_store_degraded_total", op="checkpoint") == 2
        assert metric_value(text, "rnnserve_chunks_total", code="OK") == 4
        assert a.stop() == 0  # releases its lease: b takes the session at once
        with Client(b.target, timeout=10) as other:
            info = other.open_session("feat", session_id=sid, resume=True)
            assert info.next_seq == 4
            parts.append(other.step(sid, 4, X[8:], end=True)["logits"])
        got = np.concatenate(parts)
        assert float(np.abs(got - whole_run(repo, "feat", 1, X)).max()) <= 1e-5
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
        a.stop()
        assert b.stop() == 0


@contextlib.contextmanager
def degraded_and_other(repo, redis_server, tmp_path):
    """Server A (``--store-failure degrade``) and server B on one Redis, both with
    0.3 s leases and a 200 ms store timeout; stopped cleanly after."""
    a = serve(repo, tmp_path, "a", redis_server.url, "--store-timeout-ms", "200",
              "--store-failure", "degrade", "--lease-s", "0.3")
    b = serve(repo, tmp_path, "b", redis_server.url, "--store-timeout-ms", "200",
              "--lease-s", "0.3")
    redis = redis_server.client()
    try:
        yield a, b, redis
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
        assert a.stop() == 0
        assert b.stop() == 0


@contextlib.contextmanager
def writes_stalled(redis):
    """Redis keeps its data but answers no write (past any store timeout)."""
    redis.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
    try:
        yield
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")


@pytest.mark.parametrize("back", ["step", "resume"])
def test_a_degraded_copy_does_not_overwrite_what_another_server_did_with_the_session(
        repo, redis_server, tmp_path, back) -> None:
    """Server A serves two steps from memory while Redis stalls (degrade), and its
    lease lapses. The client meanwhile resumes on B from the stored record (behind A's
    copy) and goes on there with other data; B's lease lapses too. A's copy must not be
    written over B's line when the client comes back to A (the stored seq is behind A's,
    so the seq alone would let it): a step is refused, and a resume (after it, or at
    once) continues B's line exactly, not A's copy although it is further."""
    y = np.random.default_rng(5).standard_normal((4, 20)).astype(np.float32)
    with degraded_and_other(repo, redis_server, tmp_path) as (a, b, redis), \
            Client(a.target, timeout=10) as on_a, Client(b.target, timeout=10) as on_b:
        sid = on_a.open_session("feat").session_id
        line = [on_a.step(sid, 0, X[:2])["logits"]]  # durable: the store is at 1
        with writes_stalled(redis):
            for k in (1, 2):  # their writes time out: served from memory on A
                on_a.step(sid, k, X[2 * k:2 * k + 2])
        time.sleep(0.5)  # A's lease lapses
        assert on_b.open_session("feat", session_id=sid, resume=True).next_seq == 1
        line.append(on_b.step(sid, 1, y[:2])["logits"])  # B's line: the store at 2
        time.sleep(0.5)  # B's lease lapses
        refusal = code_and_message(on_a.step, sid, 3, X[6:8]) if back == "step" else None
        stored = redis.hget(f"rnnserve:{{{sid}}}:s", "seq")
        info = on_a.open_session("feat", session_id=sid, resume=True)
        line.append(on_a.step(sid, 2, y[2:], end=True)["logits"])
        taken = metric_value(a.metrics(), "rnnserve_store_refusals_total", reason="taken")
    if back == "step":
        assert refusal is not None
        code, message = refusal
        assert code == grpc.StatusCode.ABORTED and "taken from the session store" in message
    assert stored == b"2" and info.next_seq == 2
    assert taken == (1 if back == "step" else 0)
    want = whole_run(repo, "feat", 1, np.concatenate([X[:2], y]))
    assert float(np.abs(np.concatenate(line) - want).max()) <= 1e-5


def test_a_resuming_stream_says_its_steps_were_lost_to_another_servers_line(
        repo, redis_server, tmp_path) -> None:
    """The client's side of the split brain above: a stream that resumes by itself
    (``reconnect_s``) on A finds the session at B's line, behind the chunk it sent,
    and ends with an error that says steps were lost, not with outputs from either
    line glued together."""
    y = np.random.default_rng(6).standard_normal((2, 20)).astype(np.float32)

    async def main(a, b, redis) -> str:
        def on_b(sid: str) -> None:  # the client goes on with B from the store
            with Client(b.target, timeout=10) as client:
                client.open_session("feat", session_id=sid, resume=True)
                client.step(sid, 1, y)  # B's line: the store at 2

        async with AsyncClient(a.target, timeout=10, reconnect_s=5) as on_a:
            async with on_a.stream("feat") as s:
                await s.send(X[:2])  # durable: the store is at 1
                with writes_stalled(redis):
                    for k in (1, 2):  # served from memory on A
                        await s.send(X[2 * k:2 * k + 2])
                await asyncio.sleep(0.5)  # A's lease lapses
                await asyncio.to_thread(on_b, s.session_id)
                await asyncio.sleep(0.5)  # B's lease lapses
                with pytest.raises(ConnectionError) as info:
                    await s.send(X[6:8])  # chunk 3: refused, resumed at 2
                return str(info.value)

    with degraded_and_other(repo, redis_server, tmp_path) as servers:
        message = asyncio.run(asyncio.wait_for(main(*servers), 60))
    assert "resumed at chunk 2, but chunk 3 was unanswered: steps were lost" in message
