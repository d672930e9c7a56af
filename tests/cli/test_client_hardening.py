"""The client, the load generator and ``rnnserve stream`` against a real server when
answers are lost, late or refused: a TCP proxy (tests/cli/proxy.py) holds or cuts them."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, StreamSession, bench, many_item
from rnnserve.client.bench import Spawned
from rnnserve.client.load import realtime_streams
from rnnserve.errors import RnnserveError

from ..conftest import build_repo, speech_checkpoint
from ..server.serving import ServerProcess, metric_value, start_server
from .proxy import Proxy
from .test_cli import rnnserve


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """text v1, v2, feat v1 (tests/conftest.py) and an untrained keyword model, speech."""
    from rnnserve.export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("repo")
    models = build_repo(root)
    export_checkpoint(speech_checkpoint(root / "speech.pt"), models, "speech",
                      log=lambda _: None)
    return models


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[Proxy]:
    p = Proxy(server.grpc_port)
    yield p
    p.close()


@pytest.fixture(scope="module")
def one_session_server(repo, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server that holds one session at most and refuses the next open."""
    log = tmp_path_factory.mktemp("logs") / "one.log"
    srv = start_server(repo, log, "--max-sessions", "1", "--when-full", "refuse")
    yield srv
    assert srv.stop() == 0, log.read_text()[-3000:]


def live_sessions(server: ServerProcess) -> float:
    return metric_value(server.metrics(), "rnnserve_active_sessions")


def wait_for_sessions(server: ServerProcess, expected: float, within_s: float = 5.0) -> float:
    deadline = time.monotonic() + within_s
    while (n := live_sessions(server)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def write_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    pcm = (np.random.default_rng(0).standard_normal(int(rate * seconds)) * 1000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


# -- AsyncClient: resume, timeouts, refused opens --------------------------------------

def test_a_lost_answer_to_the_final_chunk_is_fetched_after_the_session_ended(
        server, proxy) -> None:
    """The server applied the end chunk, its answer was lost with the connection: the
    resume is refused (the session has ended), the client gets the stored answer."""
    before = live_sessions(server)

    async def main() -> tuple[tuple[int, ...], int, int]:
        async with AsyncClient(proxy.target, reconnect_s=5) as client:
            async with client.stream("text") as s:
                await s.send("hello ")
                proxy.hold()  # answers stop reaching the client
                task = asyncio.ensure_future(s.send("world", end=True))
                # the server applies the end chunk: its session ends
                assert await asyncio.to_thread(wait_for_sessions, server, before) == before
                proxy.cut()
                out = await asyncio.wait_for(task, 10)
                return out["logits"].shape, s.next_seq, s.resumes

    shape, next_seq, resumes = asyncio.run(main())
    assert shape == (5, 256)
    assert next_seq == 2 and resumes == 0  # answered by the server that ended it


def test_the_client_timeout_bounds_each_answer_not_the_stream(server, proxy) -> None:
    async def main() -> None:
        async with AsyncClient(proxy.target, timeout=0.5) as client:
            async with client.stream("text") as s:
                started = time.monotonic()
                for _ in range(25):  # a stream far longer than the timeout
                    await s.send("abcd")
                    await asyncio.sleep(0.04)
                assert time.monotonic() - started > 1.0
                await s.send("end", end=True)
            async with client.stream("text") as s:
                await s.send("abcd")
                proxy.hold()
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await s.send("efgh")  # never answered: bounded by the timeout
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - started < 3.0
            proxy.release()

    asyncio.run(main())


def test_a_many_request_not_answered_in_time_is_deadline_exceeded(server, proxy) -> None:
    """ManyStream's timeout ends a send as the client's other calls do (DEADLINE_EXCEEDED,
    not the built-in TimeoutError), and the request leaves its table of waiting ones."""
    async def main() -> None:
        async with AsyncClient(proxy.target, timeout=0.5) as client, client.many() as m:
            assert (await m.send([many_item("m1", 0, "ab", open_model="text")]))[0].code == 0
            proxy.hold()
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await m.send([many_item("m1", 1, "cd")])
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "not answered within 0.5 s" in (err.value.details() or "")
            assert time.monotonic() - started < 3.0
            assert not m._waiting  # nothing left waiting for the late answer
            proxy.release()
            again = await m.send([many_item("m1", 1, "cd")])  # the same chunk again:
            assert again[0].code == 0 and again[0].result.seq == 1  # answered (once)
            assert (await m.send([many_item("m1", 2, "ef", end=True)]))[0].code == 0

    asyncio.run(main())


def test_each_stream_reconnects_past_the_replica_it_failed_on(server) -> None:
    """Two streams on replica A, which freezes (its connections break, new ones are
    accepted and never answered): both resume on B at once. With one turn shared by
    all streams, the second stream's reconnect went to A first and waited out its
    timeout there."""
    a, b = Proxy(server.grpc_port), Proxy(server.grpc_port)

    async def main() -> list[tuple[float, int]]:
        async with AsyncClient([a.target, b.target], reconnect_s=10, timeout=1.5) as client:
            async with client.stream("text") as s1, client.stream("text") as s2:
                for s in (s1, s2):
                    await s.send("hello ")
                a.cut()  # breaks the streams' connection (and stops any holding)
                a.hold()  # new connections to A: accepted, never answered

                async def again(s: StreamSession) -> tuple[float, int]:
                    started = time.monotonic()
                    await s.send("world")
                    return time.monotonic() - started, s.resumes

                return list(await asyncio.gather(again(s1), again(s2)))

    try:
        took = asyncio.run(main())
    finally:
        a.release()
        a.close()
        b.close()
    assert [resumes for _, resumes in took] == [1, 1]
    assert max(t for t, _ in took) < 1.5, took  # no attempt waited out A's timeout


def test_reconnect_s_bounds_an_attempt_on_a_replica_that_never_answers(server) -> None:
    """Replica A's connection breaks; B accepts connections and never answers (a frozen
    process): the send gives up when reconnect_s is spent, instead of hanging."""
    a, b = Proxy(server.grpc_port), Proxy(server.grpc_port)
    b.hold()

    async def main() -> tuple[float, BaseException | None]:
        async with AsyncClient([a.target, b.target], reconnect_s=1.5) as client:
            async with client.stream("text") as s:
                await s.send("hello ")
                a.cut()
                started = time.monotonic()
                failure: BaseException | None = None
                try:
                    await asyncio.wait_for(s.send("world"), 15)
                except (grpc.aio.AioRpcError, ConnectionError, TimeoutError) as exc:
                    failure = exc
                return time.monotonic() - started, failure

    try:
        took, failure = asyncio.run(main())
    finally:
        a.close()
        b.close()
    assert not isinstance(failure, TimeoutError), f"still resuming after {took:.1f} s"
    assert isinstance(failure, grpc.aio.AioRpcError | ConnectionError)
    assert took < 3.5


def test_a_send_cancelled_by_its_caller_leaves_a_clean_exit(proxy) -> None:
    async def main() -> None:
        async with AsyncClient(proxy.target) as client:
            async with client.stream("text") as s:
                await s.send("abcd")
                proxy.hold()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(s.send("efgh"), 0.3)
            proxy.release()  # the block ended without CancelledError

    asyncio.run(main())


def test_a_refused_open_leaves_no_pending_request_task(one_session_server) -> None:
    async def main() -> tuple[int, list[str]]:
        async with AsyncClient(one_session_server.target) as client:
            async with client.stream("text") as s:  # holds the one session
                await s.send("x")
                before = consumers()  # this stream's own
                codes = []
                for _ in range(5):
                    try:
                        async with client.stream("text"):
                            pass
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code().name)
                deadline = time.monotonic() + 5
                while (left := consumers() - before) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await s.send("y", end=True)
        return left, codes

    def consumers() -> int:
        """grpc's tasks that feed a stream's requests from its iterator."""
        return sum("consume_request_iterator" in repr(t) for t in asyncio.all_tasks())

    left, codes = asyncio.run(main())
    assert codes == ["RESOURCE_EXHAUSTED"] * 5
    assert left == 0


# -- the load generator ------------------------------------------------------------------

def text_chunk(k: int) -> bytes:
    return b"abcdefghijklmnop"


def test_load_timeout_bounds_each_chunk_not_each_session(server) -> None:
    """Sessions far longer than the timeout are served without an error."""
    result = asyncio.run(realtime_streams(server.target, "text", text_chunk, streams=2,
                                          chunk_s=0.04, duration_s=1.5, timeout=0.5))
    assert not result.errors
    assert result.answered >= 60


def test_load_many_counts_a_timed_out_send_and_goes_on(server, proxy) -> None:
    async def stall() -> None:
        await asyncio.sleep(0.4)
        proxy.hold()
        await asyncio.sleep(1.0)
        proxy.release()

    async def main():
        stalled = asyncio.ensure_future(stall())
        result = await realtime_streams(proxy.target, "text", text_chunk, streams=2,
                                        chunk_s=0.04, duration_s=2.5, timeout=0.5, many=2)
        await stalled
        return result

    result = asyncio.run(main())
    assert result.errors["DEADLINE_EXCEEDED"] >= 2, result.errors
    assert result.answered >= 20  # before and after the stall


def test_a_refused_open_is_retried_on_the_next_tick(one_session_server, monkeypatch) -> None:
    opens: list[float] = []
    stream = AsyncClient.stream

    def counted(self, *args, **kw):
        opens.append(time.monotonic())
        return stream(self, *args, **kw)

    monkeypatch.setattr(AsyncClient, "stream", counted)
    result = asyncio.run(realtime_streams(one_session_server.target, "text", text_chunk,
                                          streams=2, chunk_s=0.04, duration_s=1.0))
    refused = opens[1:]  # (the last may get the session the other stream just ended)
    assert len(refused) >= result.errors["RESOURCE_EXHAUSTED"] >= len(refused) - 1 >= 5
    # one open per tick of the refused stream: spread over the window, not a burst
    assert refused[-1] - refused[0] > 0.6
    assert min(np.diff(refused)) > 0.02
    assert wait_for_sessions(one_session_server, 0) == 0


def test_a_failed_send_takes_its_slot_once(server) -> None:
    """Every slot of the window is answered, an error or unsent: none goes missing."""
    def chunk(k: int) -> np.ndarray:
        return np.zeros((2, 19 if k == 5 else 20), np.float32)  # chunk 5 is malformed

    result = asyncio.run(realtime_streams(server.target, "feat", chunk, streams=1,
                                          chunk_s=0.05, duration_s=1.02))
    assert result.errors == {"INVALID_ARGUMENT": 1}
    assert result.answered + result.unsent + 1 == 21  # ticks 0..20 of 0.05 s in 1.02 s


def test_closed_loop_runs_leave_no_session_live(server) -> None:
    before = live_sessions(server)
    result = asyncio.run(realtime_streams(server.target, "text", text_chunk, streams=4,
                                          chunk_s=0.04, duration_s=0.5, closed_loop=True))
    assert result.answered and not result.errors
    assert wait_for_sessions(server, before) == before
    result = asyncio.run(realtime_streams(server.target, "text", text_chunk, streams=4,
                                          chunk_s=0.04, duration_s=0.5, closed_loop=True,
                                          many=2))
    assert result.answered and not result.errors
    assert wait_for_sessions(server, before) == before


def test_a_failed_session_of_the_load_is_closed(server) -> None:
    before = live_sessions(server)

    def chunk(k: int) -> np.ndarray:
        return np.zeros((2, 19 if k == 3 else 20), np.float32)

    result = asyncio.run(realtime_streams(server.target, "feat", chunk, streams=2,
                                          chunk_s=0.05, duration_s=0.5, many=2))
    assert result.errors == {"INVALID_ARGUMENT": 2}, result.errors  # both items of tick 3
    result = asyncio.run(realtime_streams(server.target, "feat", chunk, streams=1,
                                          chunk_s=0.05, duration_s=0.5))
    assert result.errors == {"INVALID_ARGUMENT": 1}, result.errors
    assert wait_for_sessions(server, before) == before


# -- bench's server process ----------------------------------------------------------------

def test_spawned_refuses_a_server_that_prints_no_ready_line(tmp_path) -> None:
    """bench says so, and leaves no process behind."""
    pid_file = tmp_path / "pid"
    talk = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); " \
           "print('Serving models', flush=True); time.sleep(6)"
    with pytest.raises(RnnserveError, match="Serving models"):
        Spawned([sys.executable, "-c", talk], tmp_path / "b.log")
    assert_gone(int(pid_file.read_text()))


def test_spawned_gives_up_on_a_server_that_never_starts(tmp_path, monkeypatch) -> None:
    """bench says so within its start timeout, and leaves no process behind."""
    pid_file = tmp_path / "pid"
    monkeypatch.setattr(bench, "START_TIMEOUT_S", 1.5)
    hang = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); " \
           "time.sleep(6)"
    started = time.monotonic()
    with pytest.raises(RnnserveError, match="did not start"):
        Spawned([sys.executable, "-c", hang], tmp_path / "a.log")
    assert time.monotonic() - started < 4.5
    assert_gone(int(pid_file.read_text()))


def assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError(f"the server process {pid} was left running")


# -- rnnserve stream ---------------------------------------------------------------------

def test_stream_timeout_is_per_chunk(server, tmp_path) -> None:
    wav = write_wav(tmp_path / "3s.wav", 3.0)
    proc = rnnserve("stream", "--wav", str(wav), "--model", "speech", "--server",
                    server.target, "--timeout", "1", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "75 chunks" in proc.stderr


def test_stream_measures_latency_from_when_the_audio_was_due(proxy, tmp_path) -> None:
    """The server's answers stall 2 s in a 3 s real-time stream: the chunks due meanwhile
    go out late, and their latency counts from when their audio was due."""
    wav = write_wav(tmp_path / "3s.wav", 3.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnserve", "stream", "--wav", str(wav), "--model", "speech",
         "--server", proxy.target], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # "session ... in real time": streaming now
        assert first.startswith("session"), first + proc.stderr.read()
        time.sleep(0.5)
        proxy.hold()
        time.sleep(2.0)
        proxy.release()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    p50 = float(re.search(r"p50 ([\d.]+) ms", err).group(1))  # type: ignore[union-attr]
    assert p50 > 200, err  # ~50 of 75 chunks were due during the stall
