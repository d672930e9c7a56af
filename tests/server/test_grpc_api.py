"""The native API through gRPC against a real ``rnnserve serve`` process on loopback."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.client import AsyncClient, Client
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

from .serving import metric_value, start_server


def whole_run(repo, name: str, version: int, x: np.ndarray) -> np.ndarray:
    """The reference: one onnxruntime run of the whole sequence from a zero state."""
    sess = ort.InferenceSession(str(repo / name / str(version) / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    feeds = {"input": x[None]}
    for i in sess.get_inputs()[1:]:
        feeds[i.name] = np.zeros((1, *i.shape[1:]), dtype=np.float32)
    return sess.run(["logits"], feeds)[0][0]


def random_cuts(rng: np.random.Generator, t: int) -> list[int]:
    k = int(rng.integers(1, min(t, 8)))
    return [0, *sorted(rng.choice(np.arange(1, t), k, replace=False).tolist()), t]


def mixed_jobs(rng: np.random.Generator, n: int, longest: int
               ) -> list[tuple[str, np.ndarray, list[int]]]:
    """``n`` sessions, alternately of the test repository's feat and text models:
    (model, input of 10 to ``longest`` steps, random chunk boundaries)."""
    jobs = []
    for i in range(n):
        name = "text" if i % 2 else "feat"
        t = int(rng.integers(10, longest))
        x = (rng.integers(0, 256, t, dtype=np.uint8) if name == "text"
             else rng.standard_normal((t, 20)).astype(np.float32))
        jobs.append((name, x, random_cuts(rng, t)))
    return jobs


def test_32_concurrent_sessions_stream_exactly_and_batch(server, repo) -> None:
    rng = np.random.default_rng(5)
    jobs = mixed_jobs(rng, 32, 50)
    first = server.metrics()
    before = metric_value(first, "rnnserve_batch_size_count")
    latency_before = metric_value(first, "rnnserve_chunk_latency_seconds_count")
    ttfo_before = metric_value(first, "rnnserve_time_to_first_output_seconds_count")

    async def one(client: AsyncClient, name: str, x: np.ndarray, cuts: list[int]):
        ys = []
        async with client.stream(name) as s:
            assert s.version == (2 if name == "text" else 1)
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                out = await s.send(x[a:b], end=b == len(x))
                assert out["logits"].shape[0] == b - a
                ys.append(out["logits"])
                await asyncio.sleep(random.random() * 0.003)
        return np.concatenate(ys)

    async def main():
        async with AsyncClient(server.target) as client:
            return await asyncio.gather(*(one(client, *job) for job in jobs))

    random.seed(5)
    results = asyncio.run(main())
    for (name, x, cuts), y in zip(jobs, results, strict=True):
        want = whole_run(repo, name, 2 if name == "text" else 1, x)
        diff = float(np.abs(y - want).max())
        assert diff <= 1e-5, f"{name} session with cuts {cuts} differs by {diff:.2e}"

    text = server.metrics()
    batches = metric_value(text, "rnnserve_batch_size_count") - before
    steps = sum(len(c) - 1 for _, _, c in jobs)
    assert 0 < batches < steps, f"{steps} steps ran in {batches} batches: none were batched"
    assert metric_value(text, "rnnserve_batch_size_bucket", le="1.0") < \
        metric_value(text, "rnnserve_batch_size_count")
    assert metric_value(text, "rnnserve_chunk_latency_seconds_count") - latency_before == steps
    assert metric_value(text, "rnnserve_time_to_first_output_seconds_count") - ttfo_before == 32
    assert metric_value(text, "rnnserve_model_info", model="feat", arch="lstm",
                        provider="CPUExecutionProvider") == 1
    assert metric_value(text, "rnnserve_state_bytes") == 0  # every session ended
    # every state pool row came back (32 sessions, each step on a fresh row)
    assert metric_value(text, "rnnserve_state_pool_rows") == 0
    assert metric_value(text, "rnnserve_state_pool_capacity_rows", model="feat") >= 32
    assert metric_value(text, "rnnserve_model_load_seconds", model="text", version="2") > 0


def test_text_chunks_and_unary_steps_give_the_streamed_answer(server, repo) -> None:
    sentence = "The quick brown fox jumps over the lazy dog."
    want = whole_run(repo, "text", 2, np.frombuffer(sentence.encode(), dtype=np.uint8))
    with Client(server.target, timeout=10) as client:
        info = client.open_session("text")
        assert info.version == 2 and info.next_seq == 0
        held = metric_value(server.metrics(), "rnnserve_state_bytes", model="text", version="2")
        assert held == 2 * 24 * 4  # one GRU session: 2 layers x 24 hidden x float32
        ys = [client.step(info.session_id, 0, sentence[:10])["logits"],
              client.step(info.session_id, 1, sentence[10:].encode())["logits"]]
        client.close_session(info.session_id)
    assert np.abs(np.concatenate(ys) - want).max() <= 1e-5


def code_and_message(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kw)
    return err.value.code(), err.value.details()


def test_errors_name_the_problem_and_leave_the_session_untouched(server, repo) -> None:
    x = np.frombuffer(b"hello world", dtype=np.uint8)
    want = whole_run(repo, "text", 1, x)
    with Client(server.target, timeout=10) as client:
        code, msg = code_and_message(client.open_session, "nope")
        assert code == grpc.StatusCode.NOT_FOUND and "'nope' not found" in msg and "text" in msg
        code, msg = code_and_message(client.open_session, "text", version=9)
        assert code == grpc.StatusCode.NOT_FOUND and "no version 9" in msg
        code, msg = code_and_message(client.step, "no-such-session", 0, "x")
        assert code == grpc.StatusCode.NOT_FOUND and "unknown" in msg

        sid = client.open_session("text", version=1).session_id
        first = client.step(sid, 0, x[:4])["logits"]
        # rejected chunks: each leaves the state and the expected sequence number alone
        for bad, expect_code, needle in [
            (np.zeros(3, dtype=np.float32), grpc.StatusCode.INVALID_ARGUMENT, "takes uint8"),
            (np.zeros((3, 2), dtype=np.uint8), grpc.StatusCode.INVALID_ARGUMENT, "shaped"),
            (np.zeros(0, dtype=np.uint8), grpc.StatusCode.INVALID_ARGUMENT, "empty chunk"),
        ]:
            code, msg = code_and_message(client.step, sid, 1, bad)
            assert code == expect_code and needle in msg, msg
        code, msg = code_and_message(client.step, sid, 1, b"\x00\x01", pcm16=True)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not PCM16" in msg
        code, msg = code_and_message(client.stub.Step, pb.StepRequest(
            session_id=sid, chunk=pb.Chunk(seq=1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "carries no data" in msg
        code, msg = code_and_message(client.step, sid, 5, x[4:])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "expects chunk 1, got 5" in msg
        bad_bytes = pb.StepRequest(session_id=sid, chunk=pb.Chunk(seq=1, tensor=pb.Tensor(
            dtype=pb.DATA_TYPE_UINT8, shape=[4], data=b"abc")))
        code, msg = code_and_message(client.stub.Step, bad_bytes)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs 4 bytes, got 3" in msg
        rest = client.step(sid, 1, x[4:], end=True)["logits"]
        assert np.abs(np.concatenate([first, rest]) - want).max() <= 1e-5
        code, msg = code_and_message(client.step, sid, 2, x[:1])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "has ended" in msg


def test_a_retried_chunk_gets_its_answer_again_and_nothing_advances(server, repo) -> None:
    """Exactly once: the same chunk again (a client retry after a lost answer) gets the
    stored answer; other data under its number, an older number or a gap are refused
    naming the expected number; the state moves once per chunk. Also for the last one."""
    x = np.frombuffer(b"exactly once, please", dtype=np.uint8)
    want = whole_run(repo, "text", 2, x)
    with Client(server.target, timeout=10) as client:
        before = metric_value(server.metrics(), "rnnserve_chunks_total", code="OK")
        sid = client.open_session("text").session_id
        a = client.step(sid, 0, x[:5])["logits"]
        b = client.step(sid, 1, x[5:9])["logits"]
        again = client.step(sid, 1, x[5:9])["logits"]  # the retry
        assert np.array_equal(again, b)
        code, msg = code_and_message(client.step, sid, 1, x[5:10])
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "already applied chunk 1 with other data; its next chunk is 2" in msg
        code, msg = code_and_message(client.step, sid, 0, x[:5])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "expects chunk 2, got 0" in msg
        code, msg = code_and_message(client.step, sid, 3, x[9:])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "expects chunk 2, got 3" in msg
        c = client.step(sid, 2, x[9:], end=True)["logits"]
        assert np.abs(np.concatenate([a, b, c]) - want).max() <= 1e-5
        assert np.array_equal(client.step(sid, 2, x[9:], end=True)["logits"], c)
        code, msg = code_and_message(client.step, sid, 3, x[:1])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "has ended" in msg
    assert metric_value(server.metrics(), "rnnserve_chunks_total", code="OK") - before == 5


def test_an_idle_session_lets_go_of_its_last_chunk_and_still_knows_a_retry(
        repo, tmp_path) -> None:
    """A session idle for a couple of seconds keeps its last chunk's digest instead of
    the chunk (the chunk's bytes leave its state memory): the same chunk again still
    gets its answer, other data under its number is still refused, and it goes on
    exactly."""
    srv = start_server(repo, tmp_path / "s.log")
    try:
        x = np.random.default_rng(61).standard_normal((9, 20)).astype(np.float32)
        want = whole_run(repo, "feat", 1, x)
        with Client(srv.target, timeout=10) as client:
            sid = client.open_session("feat").session_id
            a = client.step(sid, 0, x[:5])["logits"]
            held = metric_value(srv.metrics(), "rnnserve_state_bytes", model="feat")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                now = metric_value(srv.metrics(), "rnnserve_state_bytes", model="feat")
                if now != held:
                    break
                time.sleep(0.2)
            assert held - now == x[:5].nbytes  # the chunk, and only it, let go
            assert np.array_equal(client.step(sid, 0, x[:5])["logits"], a)
            code, msg = code_and_message(client.step, sid, 0, x[1:6])
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "already applied chunk 0 with other data" in msg
            b = client.step(sid, 1, x[5:], end=True)["logits"]
        assert np.abs(np.concatenate([a, b]) - want).max() <= 1e-5
    finally:
        srv.stop()


def test_a_rejected_chunk_on_a_stream_keeps_the_session_resumable(server, repo) -> None:
    x = np.frombuffer(b"streaming text", dtype=np.uint8)
    want = whole_run(repo, "text", 2, x)

    async def main():
        async with AsyncClient(server.target, timeout=10) as client:
            async with client.stream("text") as s:
                first = (await s.send(x[:5]))["logits"]
                sid = s.session_id
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await s.send(np.zeros((2, 2), dtype=np.float32))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            async with client.stream("text", session_id=sid, resume=True) as s2:
                assert s2.next_seq == 1
                rest = (await s2.send(x[5:], end=True))["logits"]
        return np.concatenate([first, rest])

    assert np.abs(asyncio.run(main()) - want).max() <= 1e-5


def test_health_reflection_and_metadata(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rnnserve.v1.Inference"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        resp = next(iter(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)))
        names = {s.name for s in resp.list_services_response.service}
        assert {"rnnserve.v1.Inference", "grpc.health.v1.Health"} <= names
    with Client(server.target, timeout=5) as client:
        models = {(m.name, m.version): m for m in client.list_models()}
        assert set(models) == {("feat", 1), ("text", 1), ("text", 2)}
        feat = models[("feat", 1)]
        assert feat.input_kind == "features" and list(feat.input.shape) == [-1, 20]
        assert list(feat.outputs[0].shape) == [-1, 7] and feat.arch == "lstm"
        assert feat.execution_provider == "CPUExecutionProvider"
        assert feat.state_bytes_per_session == 2 * 2 * 24 * 4
        assert "rnnserve.verification" in feat.properties
        assert list(models[("text", 2)].versions) == [1, 2]


def test_idle_sessions_expire_and_the_oldest_is_evicted(repo, tmp_path) -> None:
    srv = start_server(repo, tmp_path / "s.log", "--idle-timeout-s", "0.5",
                       "--max-sessions", "2")
    try:
        with Client(srv.target, timeout=5) as client:
            a = client.open_session("text").session_id
            time.sleep(1.0)
            code, msg = code_and_message(client.step, a, 0, "x")
            assert code == grpc.StatusCode.NOT_FOUND and "expired" in msg
            b = client.open_session("text").session_id
            client.open_session("text")
            client.open_session("text")  # third live session: b, the oldest, goes
            code, msg = code_and_message(client.step, b, 0, "x")
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "evicted" in msg
        text = srv.metrics()
        assert metric_value(text, "rnnserve_sessions_ended_total", reason="expired") >= 1
        assert metric_value(text, "rnnserve_sessions_ended_total", reason="evicted") == 1
    finally:
        assert srv.stop() == 0


def test_sigterm_answers_in_flight_chunks_then_ends_streams_cleanly(repo, tmp_path) -> None:
    srv = start_server(repo, tmp_path / "s.log", "--shutdown-grace-s", "5")
    answered: list[int] = []

    async def stream_until_refused(client: AsyncClient, i: int) -> str:
        try:
            async with client.stream("text") as s:
                while True:
                    await s.send(f"chunk {i} ")
                    answered.append(i)
                    await asyncio.sleep(0.01)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return "OK"

    async def main():
        async with AsyncClient(srv.target, timeout=20) as client:
            tasks = [asyncio.create_task(stream_until_refused(client, i)) for i in range(8)]
            while len(answered) < 40:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            srv.proc.send_signal(15)
            codes = await asyncio.gather(*tasks)
            return codes, time.monotonic() - started

    codes, seconds = asyncio.run(main())
    # The server ends every stream with UNAVAILABLE. A grpc.aio client whose next write
    # races with that status reports INTERNAL "Internal error from Core" instead (a
    # client-side bug: grpc/grpc#36066); any other outcome is a failure.
    drained = [c.startswith("UNAVAILABLE: the server is shutting down") for c in codes]
    masked = [c == "INTERNAL: Internal error from Core" for c in codes]
    assert all(d or m for d, m in zip(drained, masked, strict=True)), codes
    assert sum(drained) >= len(codes) // 2, codes
    assert srv.proc.wait(10) == 0
    assert seconds < 5
    log = (tmp_path / "s.log").read_text()
    assert "shutting down" in log and "stopped" in log and "Traceback" not in log


def test_stream_command_against_the_server(server, tmp_path) -> None:
    import subprocess
    import sys

    text = tmp_path / "in.txt"
    text.write_text("Streaming a text file, chunk by chunk, to rnnserve.\n")
    proc = subprocess.run([sys.executable, "-m", "rnnserve", "stream", "--model", "text",
                           "--server", server.target, "--chunk-bytes", "8", str(text)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["0", "sent", "Streamin"]
    assert "next-byte guesses" in lines[0]
    assert lines[-1].startswith("52 bytes in 7 chunks; the model spent")
    assert "session" in proc.stderr and "on text version 2" in proc.stderr
    # from standard input, and a clear one-line error for an unknown model
    proc = subprocess.run([sys.executable, "-m", "rnnserve", "stream", "--model", "text",
                           "--server", server.target], input="hello", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "5 bytes in 1 chunks" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "rnnserve", "stream", "--model", "nope",
                           "--server", server.target], input="hello", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "rnnserve stream: error: NOT_FOUND: model 'nope' not found")


def test_routing_header_names_the_session_and_must_agree(server) -> None:
    """x-rnnserve-session (hashed by load balancers for affinity) and the body agree."""
    with Client(server.target, timeout=10) as client:
        info = client.open_session("text")  # the client names the session, header included
        assert len(info.session_id) == 32
        stub = client.stub
        header = (("x-rnnserve-session", "from-header"),)
        opened = stub.OpenSession(pb.OpenSessionRequest(model="text"), metadata=header)
        assert opened.session_id == "from-header"
        chunk = pb.Chunk(seq=0, text="hi")
        code, msg = code_and_message(stub.Step, pb.StepRequest(session_id=info.session_id,
                                                              chunk=chunk), metadata=header)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "from-header" in msg and info.session_id in msg
        client.step(info.session_id, 0, "hi")  # untouched by the refused call: still at 0
        client.close_session(info.session_id)
        client.close_session("from-header")


def test_an_open_health_watch_does_not_hold_up_the_drain(repo, tmp_path) -> None:
    srv = start_server(repo, tmp_path / "s.log", "--shutdown-grace-s", "8")

    async def main() -> float:
        async with AsyncClient(srv.target, timeout=20) as client:
            watch = health_pb2_grpc.HealthStub(client.channel).Watch(
                health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            srv.proc.send_signal(15)
            await asyncio.get_running_loop().run_in_executor(None, srv.proc.wait, 20)
            return time.monotonic() - started

    try:
        seconds = asyncio.run(main())
    finally:
        if srv.proc.poll() is None:  # a failed step above must not leave it running
            srv.proc.kill()
    assert srv.proc.returncode == 0 and seconds < 4, seconds


def test_sigterm_right_after_the_ready_line_drains_cleanly(repo, tmp_path) -> None:
    for i in range(3):
        srv = start_server(repo, tmp_path / f"s{i}.log")
        srv.proc.send_signal(15)  # at once: the handlers are in place before "ready"
        assert srv.proc.wait(20) == 0, (tmp_path / f"s{i}.log").read_text()[-2000:]


def test_a_stream_closing_as_its_server_drains_loses_nothing_and_raises_nothing(
        repo, tmp_path) -> None:
    """Every chunk of the stream was answered; the server then drains and ends the
    stream with UNAVAILABLE before the client closes it: leaving the ``async with``
    is not an error (nothing was in flight)."""
    srv = start_server(repo, tmp_path / "s.log")
    x = np.random.default_rng(14).standard_normal((4, 20)).astype(np.float32)

    async def main() -> tuple[np.ndarray, grpc.StatusCode]:
        async with AsyncClient(srv.target, timeout=20) as client:
            async with client.stream("feat") as s:
                y = (await s.send(x))["logits"]
                srv.proc.send_signal(signal.SIGTERM)  # drains: the stream ends at once
                code = await s._call.code()  # the status is in before the block ends
            return y, code

    try:
        y, code = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        assert srv.stop() == 0
    assert code == grpc.StatusCode.UNAVAILABLE
    assert float(np.abs(y - whole_run(repo, "feat", 1, x)).max()) <= 1e-5
