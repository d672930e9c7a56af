"""Sessions that survive their server: two real servers on loopback share one real
redis-server; servers are killed (SIGKILL) or rolled (SIGTERM) under streaming load."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client
from rnnserve.server import records
from rnnserve.server.sessions import HostState, Session

from ..server.serving import ServerProcess, metric_value, start_server
from ..server.test_grpc_api import whole_run


def code_and_message(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value.code(), info.value.details()


def serve(repo, tmp_path, name: str, url: str, *flags: str, port: int = 0):
    return start_server(repo, tmp_path / f"{name}.log", "--session-store", url,
                        "--grpc-port", str(port), "--max-batch-delay-ms", "2", *flags)


@contextlib.contextmanager
def two_servers(repo, tmp_path, url: str
                ) -> Iterator[tuple[ServerProcess, ServerProcess, Client, Client]]:
    """Servers A and B on one store with a 1 s lease, and a client of each; both must
    stop cleanly."""
    a = serve(repo, tmp_path, "a", url, "--lease-s", "1")
    b = serve(repo, tmp_path, "b", url, "--lease-s", "1")
    try:
        with Client(a.target, timeout=10) as on_a, Client(b.target, timeout=10) as on_b:
            yield a, b, on_a, on_b
    finally:
        assert a.stop() == 0 and b.stop() == 0


def jobs(n: int, chunks: int, seed: int) -> list[tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = chunks * 3
        cuts = [0, *sorted(rng.choice(np.arange(1, t), chunks - 1, replace=False).tolist()), t]
        out.append((rng.standard_normal((t, 20)).astype(np.float32), cuts))
    return out


async def stream_all(targets: list[str], work, pause: float) -> list[tuple[np.ndarray, int]]:
    """Each job streamed chunk by chunk on its own session; (outputs, resumes) each."""

    async def one(client: AsyncClient, x: np.ndarray, cuts: list[int]):
        ys = []
        async with client.stream("feat") as s:
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                ys.append((await s.send(x[a:b], end=b == len(x)))["logits"])
                await asyncio.sleep(pause)
        return np.concatenate(ys), s.resumes

    async with AsyncClient(targets, reconnect_s=30) as client:
        return await asyncio.gather(*(one(client, x, cuts) for x, cuts in work))


def test_sigkill_mid_stream_resumes_on_the_other_server_exactly(repo, redis_server,
                                                               tmp_path) -> None:
    """Eight streams on server A; A is killed while chunks are in flight (some applied
    and stored but not answered, some not applied): every stream resumes on B once A's
    lease (1 s) lapses and its outputs equal an uninterrupted run."""
    a = serve(repo, tmp_path, "a", redis_server.url, "--lease-s", "1")
    b = serve(repo, tmp_path, "b", redis_server.url, "--lease-s", "1")
    work = jobs(8, 30, seed=1)
    try:
        killer = threading.Timer(0.6, a.proc.kill)
        killer.start()
        results = asyncio.run(stream_all([a.target, b.target], work, pause=0.02))
        killer.join()
        assert a.proc.wait(10) == -9
        text = b.metrics()
    finally:
        a.stop()
        assert b.stop() == 0, (tmp_path / "b.log").read_text()[-3000:]
    for (x, _), (y, resumes) in zip(work, results, strict=True):
        assert resumes == 1
        diff = float(np.abs(y - whole_run(repo, "feat", 1, x)).max())
        assert y.shape == (len(x), 7) and diff <= 1e-5, diff
    assert metric_value(text, "rnnserve_session_resumes_total", source="store") == 8
    # B answered the rest of each stream, and no chunk twice
    answered_on_b = metric_value(text, "rnnserve_chunks_total", code="OK")
    assert 8 <= answered_on_b <= 8 * 30
    assert metric_value(text, "rnnserve_store_seconds_count", op="write") > 0


def test_a_sigterm_rollout_of_both_servers_moves_streams_without_waiting(repo, redis_server,
                                                                         tmp_path) -> None:
    """A drains (SIGTERM) and hands its sessions over at once (no lease wait, though the
    lease is 30 s); A comes back; then B drains: every stream moves twice, exactly."""
    a = serve(repo, tmp_path, "a", redis_server.url, "--lease-s", "30")
    b = serve(repo, tmp_path, "b", redis_server.url, "--lease-s", "30")
    servers = {"a": a, "b": b}
    work = jobs(6, 40, seed=2)

    def rollout() -> None:
        time.sleep(0.5)
        port = servers["a"].grpc_port
        assert servers["a"].stop() == 0
        servers["a"] = serve(repo, tmp_path, "a2", redis_server.url, "--lease-s", "30",
                             port=port)
        time.sleep(0.5)
        assert servers["b"].stop() == 0

    roller = threading.Thread(target=rollout)
    started = time.monotonic()
    try:
        roller.start()
        results = asyncio.run(stream_all([a.target, b.target], work, pause=0.03))
        roller.join()
        elapsed = time.monotonic() - started
    finally:
        for s in servers.values():
            s.stop()
    assert elapsed < 25, f"took {elapsed:.1f}s: a drained server's leases were not released"
    for (x, _), (y, resumes) in zip(work, results, strict=True):
        assert resumes >= 1
        diff = float(np.abs(y - whole_run(repo, "feat", 1, x)).max())
        assert diff <= 1e-5, diff


def test_duplicates_gaps_and_two_writers_across_servers(repo, redis_server, tmp_path) -> None:
    x = np.random.default_rng(3).standard_normal((12, 20)).astype(np.float32)
    want = whole_run(repo, "feat", 1, x)
    with two_servers(repo, tmp_path, redis_server.url) as (a, b, on_a, on_b):
        sid = on_a.open_session("feat").session_id
        y0 = on_a.step(sid, 0, x[:3])["logits"]
        y1 = on_a.step(sid, 1, x[3:6])["logits"]  # its answer "lost" on the way
        # B cannot take the session while A's lease runs: a clear error, no step
        code, msg = code_and_message(on_b.open_session, "feat", session_id=sid,
                                     resume=True)
        assert code == grpc.StatusCode.ABORTED, msg
        assert "being written by another server" in msg and "retry after" in msg
        time.sleep(1.3)  # A's lease lapses (A is idle)
        info = on_b.open_session("feat", session_id=sid, resume=True)
        assert info.next_seq == 2
        assert np.array_equal(on_b.step(sid, 1, x[3:6])["logits"], y1)  # the retry
        code, msg = code_and_message(on_b.step, sid, 1, x[3:7])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "other data" in msg
        code, msg = code_and_message(on_b.step, sid, 3, x[6:9])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "expects chunk 2" in msg
        y2 = on_b.step(sid, 2, x[6:9])["logits"]
        # A still has its stale copy: its step is refused and changes nothing
        code, msg = code_and_message(on_a.step, sid, 2, x[6:9])
        assert code == grpc.StatusCode.ABORTED, msg
        refused = {why: metric_value(a.metrics(), "rnnserve_store_refusals_total",
                                     reason=why) for why in ("held", "moved", "taken")}
        assert refused == {"held": 1, "moved": 0, "taken": 0}  # B's lease still ran
        time.sleep(1.3)
        assert on_a.open_session("feat", session_id=sid, resume=True).next_seq == 3
        y3 = on_a.step(sid, 3, x[9:], end=True)["logits"]
        # the last chunk's retry, on the other server: its answer again
        assert np.array_equal(on_b.step(sid, 3, x[9:], end=True)["logits"], y3)
        got = np.concatenate([y0, y1, y2, y3])
        assert float(np.abs(got - want).max()) <= 1e-5


def test_corrupted_truncated_and_foreign_records_are_never_loaded(repo, redis_server,
                                                                  tmp_path) -> None:
    a = serve(repo, tmp_path, "a", redis_server.url, "--lease-s", "0.2")
    r = redis_server.client()
    try:
        with Client(a.target, timeout=10) as client:
            def stored(data) -> str:
                """A session whose record is then replaced by ``data``."""
                sid = client.open_session("feat").session_id
                client.step(sid, 0, np.zeros((2, 20), dtype=np.float32))
                key = f"rnnserve:{{{sid}}}:s"
                good = r.hget(key, "data")
                r.hset(key, "data", data(good, sid))
                return sid

            cases = [
                (lambda good, sid: good[:-10], grpc.StatusCode.DATA_LOSS, "checksum"),
                (lambda good, sid: good[:5], grpc.StatusCode.DATA_LOSS, "truncated"),
                (lambda good, sid: b"{\"json\": true}" + good, grpc.StatusCode.DATA_LOSS,
                 "not an rnnserve session record"),
                (lambda good, sid: good[:40] + bytes([good[40] ^ 1]) + good[41:],
                 grpc.StatusCode.DATA_LOSS, "checksum"),
                (lambda good, sid: records.encode(Session(
                    sid, "text", 2, HostState([np.zeros((2, 1, 24), np.float32)]), 1)),
                 grpc.StatusCode.FAILED_PRECONDITION, "is for model 'text' version 2"),
                (lambda good, sid: records.encode(Session(
                    sid, "feat", 1, HostState([np.zeros((2, 9), np.float32)] * 2), 1)),
                 grpc.StatusCode.FAILED_PRECONDITION, "holds a state of"),
                (lambda good, sid: records.encode(Session(
                    "someone-else", "feat", 1, HostState([]), 1)),
                 grpc.StatusCode.FAILED_PRECONDITION, "belongs to session 'someone-else'"),
            ]
            for damage, code_want, fragment in cases:
                sid = stored(damage)
                code, msg = code_and_message(client.open_session, "feat", session_id=sid,
                                             resume=True)
                assert code == code_want and fragment in msg, (code, msg)
    finally:
        assert a.stop() == 0


def test_an_open_inference_protocol_sequence_continues_on_another_server(repo, redis_server,
                                                                        tmp_path) -> None:
    """A Triton-style sequence started on A goes on at B after A drains: B loads it from
    the store on the next request (no resume call exists in that protocol)."""
    from rnnserve.protos.inference import grpc_service_pb2 as oip
    from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc

    from ..oip.test_protocol import logits, request

    x = np.random.default_rng(5).standard_normal((1, 10, 20)).astype(np.float32)
    a = serve(repo, tmp_path, "a", redis_server.url)
    b = serve(repo, tmp_path, "b", redis_server.url)
    try:
        with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
            on_a, on_b = oip_grpc.GRPCInferenceServiceStub(ca), \
                oip_grpc.GRPCInferenceServiceStub(cb)
            parts = [logits(on_a.ModelInfer(request(x[:, :4], sequence_id=9,
                                                    sequence_start=True)))]
            assert a.stop() == 0  # drains, hands the sequence over
            parts.append(logits(on_b.ModelInfer(request(x[:, 4:], sequence_id=9,
                                                        sequence_end=True))))
            with pytest.raises(grpc.RpcError) as info:
                on_b.ModelInfer(request(x[:, :1], sequence_id=9))
            assert "must specify the START flag" in info.value.details()
            assert on_b.ServerReady(oip.ServerReadyRequest()).ready
    finally:
        a.stop()
        assert b.stop() == 0
    got = np.concatenate(parts, axis=1)[0]
    assert float(np.abs(got - whole_run(repo, "feat", 1, x[0])).max()) <= 1e-5


def test_any_replica_steps_a_session_and_eviction_only_spills_it(repo, redis_server,
                                                                 tmp_path) -> None:
    """With the shared store a unary step needs no resume call nor affinity: a replica
    that does not hold the session takes it from the store; and a session evicted from
    memory (--max-sessions 1 here) comes back from the store on its next step."""
    x = np.random.default_rng(6).standard_normal((9, 20)).astype(np.float32)
    want = whole_run(repo, "feat", 1, x)
    a = serve(repo, tmp_path, "a", redis_server.url, "--max-sessions", "1")
    b = serve(repo, tmp_path, "b", redis_server.url)
    try:
        with Client(a.target, timeout=10) as on_a, Client(b.target, timeout=10) as on_b:
            first = on_a.open_session("feat").session_id
            parts = [on_a.step(first, 0, x[:3])["logits"]]
            second = on_a.open_session("feat").session_id  # evicts the first from memory
            on_a.step(second, 0, x[:1])
            parts.append(on_a.step(first, 1, x[3:6])["logits"])  # back from the store
            assert a.stop() == 0
            parts.append(on_b.step(first, 2, x[6:], end=True)["logits"])  # no resume call
        text = b.metrics()
    finally:
        a.stop()
        assert b.stop() == 0
    assert float(np.abs(np.concatenate(parts) - want).max()) <= 1e-5
    assert metric_value(text, "rnnserve_session_resumes_total", source="store") == 1


def test_ownership_holds_across_replicas(repo, redis_server, tmp_path) -> None:
    """The owner travels in the record: on a replica that never held the session,
    another principal can neither step nor close it, nor hold it back: the refusing
    replica takes no lease, so the owner goes on at once on any replica."""
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token-0123456789 alice\nbob-token-00123456789 bob\n")
    a = serve(repo, tmp_path, "a", redis_server.url, "--tokens-file", str(tokens))
    b = serve(repo, tmp_path, "b", redis_server.url, "--tokens-file", str(tokens))
    c = serve(repo, tmp_path, "c", redis_server.url, "--tokens-file", str(tokens))
    x = np.zeros((2, 20), dtype=np.float32)
    redis = redis_server.client()
    try:
        with Client(a.target, timeout=10, token="alice-token-0123456789") as alice, \
                Client(b.target, timeout=10, token="bob-token-00123456789") as bob_on_b, \
                Client(b.target, timeout=10, token="alice-token-0123456789") as alice_on_b, \
                Client(c.target, timeout=10, token="alice-token-0123456789") as alice_on_c:
            sid = alice.open_session("feat").session_id
            alice.step(sid, 0, x)
            assert a.stop() == 0
            record = f"rnnserve:{{{sid}}}:s"
            writer = redis.hget(record, "w")
            for call in (lambda: bob_on_b.step(sid, 1, x), lambda: bob_on_b.close_session(sid),
                         lambda: bob_on_b.open_session("feat", session_id=sid, resume=True)):
                code, msg = code_and_message(call)
                assert code == grpc.StatusCode.PERMISSION_DENIED, msg
                # refused before the lease is taken: it was, for a moment in which the
                # owner's own replica was refused ('held'), and the writer stayed changed
                assert redis.hget(record, "w") == writer
                assert not redis.exists(f"rnnserve:{{{sid}}}:l")
            assert alice_on_c.step(sid, 1, x)["logits"].shape == (2, 7)  # not held on b
            assert c.stop() == 0  # hands the session over
            assert alice_on_b.step(sid, 2, x, end=True)["logits"].shape == (2, 7)
    finally:
        a.stop()
        c.stop()
        assert b.stop() == 0


def test_a_rollout_to_a_new_model_version_keeps_live_sessions_on_theirs(
        repo, redis_server, tmp_path) -> None:
    """Pods of the next release serve feat v2: one that dropped v1 refuses a v1
    session's resume and says why (the record names its version), and gives up the
    lease its load took; one that serves v1 beside v2 resumes it on v1 at once,
    exactly, while new sessions get v2."""
    only_v2, both = tmp_path / "only-v2", tmp_path / "both"
    shutil.copytree(repo, both)
    shutil.copytree(repo / "feat" / "1", both / "feat" / "2")
    (only_v2 / "feat").mkdir(parents=True)
    shutil.copytree(repo / "feat" / "1", only_v2 / "feat" / "2")
    x = np.random.default_rng(13).standard_normal((10, 20)).astype(np.float32)
    old = serve(repo, tmp_path, "old", redis_server.url)
    try:
        with Client(old.target, timeout=10) as client:
            sid = client.open_session("feat").session_id
            parts = [client.step(sid, 0, x[:4])["logits"]]
    finally:
        assert old.stop() == 0  # drained: its leases released
    dropped = serve(only_v2, tmp_path, "dropped", redis_server.url)
    try:
        with Client(dropped.target, timeout=10) as client:
            code, message = code_and_message(client.open_session, "feat", session_id=sid,
                                             resume=True)
    finally:
        assert dropped.stop() == 0
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 1, which this server does not serve" in message
    # the refusing server let go of the lease its load took: the next pod need not
    # wait it out (it would get ABORTED "being written by another server" for 10 s)
    assert redis_server.client().get(f"rnnserve:{{{sid}}}:l") is None
    kept = serve(both, tmp_path, "kept", redis_server.url)
    try:
        with Client(kept.target, timeout=10) as client:
            info = client.open_session("feat", session_id=sid, resume=True)
            parts.append(client.step(sid, 1, x[4:], end=True)["logits"])
            fresh = client.open_session("feat")
    finally:
        assert kept.stop() == 0
    assert (info.version, info.next_seq, fresh.version) == (1, 1, 2)
    assert float(np.abs(np.concatenate(parts) - whole_run(repo, "feat", 1, x)).max()) <= 1e-5
