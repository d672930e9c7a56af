"""Second review of the client: cancellation, resume and bench figures against real
servers (tests/cli/proxy.py holds or cuts their answers)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, bench, many_item, outputs
from rnnserve.client.bench import RedisProcess, Spawned
from rnnserve.client.client import new_session_id
from rnnserve.client.load import realtime_streams

from ..server.serving import ServerProcess, metric_value, start_server
from ..server.test_grpc_api import whole_run
from .proxy import Proxy
from .test_cli import assert_one_line_error, rnnserve


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


@pytest.mark.parametrize("last", [False, True])
def test_a_chunk_applied_by_a_killed_server_is_answered_once_by_the_other(
        repo, tmp_path, last) -> None:
    """A applies a chunk (in the store) and dies before its answer gets out; the client
    resumes on B and gets that chunk's stored answer (the end chunk's by a Step): the
    outputs equal an uninterrupted run, no chunk lost or applied twice."""
    redis = RedisProcess(tmp_path)
    a = start_server(repo, tmp_path / "a.log", "--session-store", redis.url, "--lease-s", "1")
    b = start_server(repo, tmp_path / "b.log", "--session-store", redis.url, "--lease-s", "1")
    proxy = Proxy(a.grpc_port)
    x = np.random.default_rng(5).standard_normal((9, 20)).astype(np.float32)

    async def main() -> tuple[np.ndarray, int, int]:
        async with AsyncClient([proxy.target, b.target], reconnect_s=15, timeout=10) as c:
            async with c.stream("feat") as s:
                ys = [(await s.send(x[:3]))["logits"]]
                chunks = metric_value(a.metrics(), "rnnserve_chunks_total", code="OK")
                proxy.hold()
                task = asyncio.ensure_future(s.send(x[3:6], end=last))
                deadline = time.monotonic() + 10
                while metric_value(a.metrics(), "rnnserve_chunks_total",
                                   code="OK") == chunks:
                    assert time.monotonic() < deadline, "A never applied the chunk"
                    await asyncio.sleep(0.05)
                a.proc.kill()
                await asyncio.to_thread(a.proc.wait, 10)
                proxy.cut()
                ys.append((await task)["logits"])
                if not last:
                    ys.append((await s.send(x[6:], end=True))["logits"])
                return np.concatenate(ys), s.next_seq, s.resumes

    try:
        y, next_seq, resumes = asyncio.run(main())
        text = b.metrics()
    finally:
        proxy.close()
        a.stop()
        b.stop()
        redis.stop()
    want = whole_run(repo, "feat", 1, x if not last else x[:6])
    assert y.shape == want.shape
    assert float(np.abs(y - want).max()) <= 1e-5
    assert next_seq == (2 if last else 3) and resumes == (0 if last else 1)
    # B applied only what A had not: the chunk after the one A applied
    assert metric_value(text, "rnnserve_chunks_total", code="OK") <= (1 if not last else 0) + 1


def test_idle_memory_holds_every_session_it_opens(repo, tmp_path) -> None:
    """The N idle sessions measured come on top of the warm-up's: none is evicted (the
    growth would be of fewer sessions than N) nor refused by a server that refuses."""
    memory = bench.idle_memory(str(repo), "text", 0, 100,
                               ["--when-full=refuse", "--intra-op-threads=1",
                                "--device=cpu"], tmp_path)
    assert memory["sessions"] == 100 and memory["rss_after"] > 0


def test_bench_says_why_it_cannot_reach_a_model(server, tmp_path) -> None:
    """An unknown model or an unreachable server is a one-line error naming the status,
    not an internal error."""
    proc = rnnserve("bench", "--server", server.target, "--model", "nosuch", "--streams", "1",
                    "--duration-s", "1", "--load-procs", "1", "--out", str(tmp_path),
                    timeout=120)
    assert_one_line_error(proc, "NOT_FOUND", "nosuch")
    assert proc.returncode == 1 and "internal error" not in proc.stderr


@pytest.mark.parametrize("reconnect_s", [0.0, 5.0])
def test_a_send_after_a_late_answer_fails_clearly_or_resumes(proxy, reconnect_s) -> None:
    """A chunk not answered in time ends the stream. The next send raises a
    ConnectionError saying so (not asyncio.CancelledError, which reads as the caller's
    task being cancelled); with reconnect_s it resumes the session and goes on."""
    async def main() -> tuple[BaseException | None, int]:
        async with AsyncClient(proxy.target, timeout=0.5, reconnect_s=reconnect_s) as client:
            async with client.stream("text") as s:
                await s.send("abcd")
                proxy.hold()
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await s.send("efgh")
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                proxy.release()
                try:
                    await s.send("efgh")  # the server applied it meanwhile: its answer
                    await s.send("ijkl", end=True)
                except Exception as exc:  # noqa: BLE001
                    return exc, s.next_seq
                return None, s.next_seq

    failure, next_seq = asyncio.run(main())
    if reconnect_s:
        assert failure is None and next_seq == 3
    else:
        assert isinstance(failure, ConnectionError) and "ended" in str(failure), repr(failure)


def test_a_timeout_that_fires_as_the_answer_comes_never_raises_cancelled(server) -> None:
    """With a per-answer timeout near the server's latency, the timer sometimes fires in
    the loop iteration that brings the answer: the answer is returned, but the timer
    has cancelled the call. The stream's next read then raised asyncio.CancelledError;
    every failure must be DEADLINE_EXCEEDED or ConnectionError."""
    async def main() -> tuple[dict[str, int], float]:
        seen: dict[str, int] = {}
        async with AsyncClient(server.target) as client:
            async with client.stream("text") as s:
                took = []
                for _ in range(30):
                    t = time.perf_counter()
                    await s.send("ab")
                    took.append(time.perf_counter() - t)
            median = sorted(took)[len(took) // 2]
            until, i = time.monotonic() + 6, 0
            while time.monotonic() < until:
                client.timeout = median * (0.5 + (i * 0.618034) % 1)  # around the latency
                i += 1
                try:
                    async with client.stream("text") as s:
                        for _ in range(20):
                            await s.send("ab")
                    outcome = "ok"
                except grpc.aio.AioRpcError as exc:
                    outcome = exc.code().name
                except ConnectionError:
                    outcome = "ConnectionError"
                except asyncio.CancelledError:
                    outcome = "CancelledError"
                    task = asyncio.current_task()
                    assert task is not None
                    while task.uncancel():
                        pass
                seen[outcome] = seen.get(outcome, 0) + 1
        return seen, median

    seen, median = asyncio.run(main())
    assert "CancelledError" not in seen, (seen, median)
    assert seen.get("DEADLINE_EXCEEDED", 0) > 0, (seen, median)  # the timeouts did fire
