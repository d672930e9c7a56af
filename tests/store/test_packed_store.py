"""``StreamPacked`` on the shared store, the block path: a live copy used within its
lease goes to the batcher with the request's others as one block, and the block's
records are written to Redis in one call before any of them is answered. Real servers,
a real redis-server; every step checked against the store and against one run of the
whole sequence."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from rnnserve.client import AsyncClient, packed_request
from rnnserve.client.client import new_session_id
from rnnserve.server import records
from rnnserve.server.sessions import digest

from ..server.serving import metric_value
from ..server.test_grpc_api import whole_run
from .test_cancel_store import leave_while_redis_holds_writes
from .test_failover import serve

N, STEPS = 12, 3  # sessions per request, steps per chunk


def _stored(redis_client, sid: str):
    data = redis_client.hget(f"rnnserve:{{{sid}}}:s", "data")
    assert data is not None, f"no record of {sid}"
    return records.decode(data, sid)


async def first_chunks(pa, sids: list[str], part, chunks: int = 2) -> list[np.ndarray]:
    """Chunks 0 .. ``chunks``-1 of every session of ``sids`` on the packed stream
    ``pa`` (the first request opens them, ``part(k)`` is chunk k of all), each answered
    in full; their outputs."""
    got = []
    for k in range(chunks):
        ans = await pa.send(packed_request("feat", sids, [k] * len(sids), part(k),
                                           opens=range(len(sids)) if k == 0 else ()))
        assert not ans.failures, ans.failures
        got.append(ans.outputs["logits"])
    return got


def packed_handover(repo, a, b, sids: list[str], x: np.ndarray, checked
                    ) -> tuple[str, str]:
    """The sessions ``sids`` on packed requests of ``STEPS`` steps to server ``a`` (the
    first opens them), ``checked(k, answer)`` after each; the last chunk to server ``b``
    once a's leases (0.5 s) lapsed. Every output must equal one run of the whole
    sequence, and b must have taken every session from the store. Stops both servers;
    returns their metrics."""
    n, chunks = len(sids), x.shape[1] // STEPS

    def part(k: int) -> np.ndarray:
        return np.ascontiguousarray(x[:, k * STEPS:(k + 1) * STEPS])

    async def main() -> np.ndarray:
        got = []
        async with AsyncClient(a.target, timeout=20) as ca, \
                AsyncClient(b.target, timeout=20) as cb, ca.packed() as pa, \
                cb.packed() as pb_:
            for k in range(chunks - 1):  # opened by the first request, then blocks
                ans = await pa.send(packed_request("feat", sids, [k] * n, part(k),
                                                   opens=range(n) if k == 0 else ()))
                assert not ans.failures, ans.failures
                checked(k, ans)
                got.append(ans.outputs["logits"])
            await asyncio.sleep(0.6)  # a's leases lapse: b takes the sessions
            last = await pb_.send(packed_request("feat", sids, [chunks - 1] * n,
                                                 part(chunks - 1), ends=range(n)))
            assert not last.failures, last.failures
            got.append(last.outputs["logits"])
        return np.concatenate(got, axis=1)

    try:
        y = asyncio.run(main())
        text_a, text_b = a.metrics(), b.metrics()
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    for i in range(n):
        assert float(np.abs(y[i] - whole_run(repo, "feat", 1, x[i])).max()) <= 1e-5
    assert metric_value(text_b, "rnnserve_session_resumes_total", source="store") == n
    return text_a, text_b


def test_every_packed_step_is_in_the_store_before_it_is_answered(repo, redis_server,
                                                                 tmp_path) -> None:
    """After each answer, each session's record holds the next seq, the answer's own
    outputs and its chunk's digest; and another server takes the sessions from the
    store and goes on exactly."""
    chunks = 5
    x = np.random.default_rng(51).standard_normal((N, chunks * STEPS, 20)).astype(np.float32)
    sids = [new_session_id() for _ in range(N)]
    r = redis_server.client()
    a = serve(repo, tmp_path, "a", redis_server.url, "--lease-s", "0.5")
    b = serve(repo, tmp_path, "b", redis_server.url, "--lease-s", "0.5")

    def checked(k: int, ans) -> None:
        chunk = x[:, k * STEPS:(k + 1) * STEPS]
        for i, sid in enumerate(sids):
            rec = _stored(r, sid)
            assert rec.next_seq == k + 1 and rec.answer is not None
            assert rec.answer.seq == k and rec.answer.digest == digest(chunk[i])
            assert np.array_equal(rec.answer.outputs[0][1], ans.outputs["logits"][i])

    text_a, _ = packed_handover(repo, a, b, sids, x, checked)
    assert metric_value(text_a, "rnnserve_chunks_total", code="OK") == N * (chunks - 1)
    assert r.exists(f"rnnserve:{{{sids[0]}}}:s") == 0  # ended: only the final answers
    assert len(redis_server.session_keys()) == N


def test_a_block_the_store_cannot_take_fails_each_session_and_advances_nothing(
        repo, redis_server, tmp_path) -> None:
    """Redis paused past the store's timeout: every session of the block fails
    UNAVAILABLE at once, its new rows freed; sent again once Redis answers, the chunk
    gets one answer whichever way its write went, and the sessions go on exactly."""
    x = np.random.default_rng(52).standard_normal((N, 4 * STEPS, 20)).astype(np.float32)
    sids = [new_session_id() for _ in range(N)]
    a = serve(repo, tmp_path, "a", redis_server.url, "--store-timeout-ms", "300")

    def part(k: int) -> np.ndarray:
        return np.ascontiguousarray(x[:, k * STEPS:(k + 1) * STEPS])

    async def main() -> tuple[np.ndarray, float]:
        async with AsyncClient(a.target, timeout=20) as ca, ca.packed() as pa:
            got = await first_chunks(pa, sids, part)
            redis_server.client().execute_command("CLIENT", "PAUSE", "1500")
            started = time.monotonic()
            refused = await pa.send(packed_request("feat", sids, [2] * N, part(2)))
            seconds = time.monotonic() - started
            assert sorted(refused.failures) == list(range(N))
            for code, message, _ in refused.failures.values():
                assert code == grpc.StatusCode.UNAVAILABLE and "session store" in message
            assert not refused.outputs["logits"].any()  # failed rows are zeros
            await asyncio.sleep(max(0.0, 1.7 - (time.monotonic() - started)))
            for k in (2, 3):
                ans = await pa.send(packed_request("feat", sids, [k] * N, part(k),
                                                   ends=range(N) if k == 3 else ()))
                assert not ans.failures, ans.failures
                got.append(ans.outputs["logits"])
            return np.concatenate(got, axis=1), seconds

    try:
        y, seconds = asyncio.run(main())
        text = a.metrics()
    finally:
        assert a.stop() == 0
    assert seconds < 1.4  # the store's timeout, not Redis's pause
    for i in range(N):
        assert float(np.abs(y[i] - whole_run(repo, "feat", 1, x[i])).max()) <= 1e-5
    assert metric_value(text, "rnnserve_chunks_total", code="UNAVAILABLE") == N
    assert metric_value(text, "rnnserve_store_errors_total", op="write") >= 1
    # every new row of the refused block went back: none is in use once all ended
    assert metric_value(text, "rnnserve_active_sessions") == 0
    assert metric_value(text, "rnnserve_state_pool_rows") == 0


def test_a_block_on_a_workers_stale_copy_gets_the_answers_its_sibling_gave(
        repo, redis_server) -> None:
    """Sibling workers take a session from each other at once, fenced by the stored
    seq. Back on a worker whose copy is stale, a block's session is refused by the
    store alone: a retry of the chunk that ended the session on the sibling gets that
    answer; a retry of one the sibling answered without ending fails ABORTED (the copy
    dropped) and, sent again, gets the stored answer; the block's other sessions step."""
    from rnnserve.server.app import RnnServer, Worker
    from rnnserve.server.settings import Settings

    n = 4
    x = np.random.default_rng(53).standard_normal((n, 4 * STEPS, 20)).astype(np.float32)
    sids = [new_session_id() for _ in range(n)]

    def part(k: int, rows: slice = slice(None)) -> np.ndarray:
        return np.ascontiguousarray(x[rows, k * STEPS:(k + 1) * STEPS])

    async def main() -> None:
        workers = [RnnServer(Settings(repo=repo, host="127.0.0.1", grpc_port=0,
                                      metrics_port=0, device="cpu", intra_op_threads=1,
                                      session_store=redis_server.url, lease_s=60),
                             Worker(i, 2, "srv")) for i in range(2)]
        for w in workers:
            await w.start()
        try:
            async with AsyncClient(f"127.0.0.1:{workers[0].grpc_port}", timeout=20) as c0, \
                    AsyncClient(f"127.0.0.1:{workers[1].grpc_port}", timeout=20) as c1, \
                    c0.packed() as p0, c1.packed() as p1:
                got = []
                for k in range(2):
                    ans = await p0.send(packed_request("feat", sids, [k] * n, part(k),
                                                       opens=range(n) if k == 0 else ()))
                    assert not ans.failures, ans.failures
                    got.append(ans.outputs["logits"])
                # worker 1 takes sessions 0 and 1 at once: 0 ends with chunk 2, 1 steps
                there = await p1.send(packed_request("feat", sids[:2], [2, 2],
                                                     part(2, slice(0, 2)), ends=[0]))
                assert not there.failures, there.failures
                # worker 0's copies of 0 and 1 stopped at chunk 2: all four sent there
                back = await p0.send(packed_request("feat", sids, [2] * n, part(2)))
                assert sorted(back.failures) == [1], back.failures
                code, message, _ = back.failures[1]
                assert code == grpc.StatusCode.ABORTED, message
                assert np.array_equal(back.outputs["logits"][0], there.outputs["logits"][0])
                assert not back.outputs["logits"][1].any()
                again = await p0.send(packed_request("feat", sids[1:2], [2],
                                                     part(2, slice(1, 2))))
                assert not again.failures, again.failures
                assert np.array_equal(again.outputs["logits"][0], there.outputs["logits"][1])
                got.append(np.concatenate([back.outputs["logits"][:1],
                                           again.outputs["logits"],
                                           back.outputs["logits"][2:]]))
                last = await p0.send(packed_request("feat", sids[1:], [3] * (n - 1),
                                                    part(3, slice(1, None)),
                                                    ends=range(n - 1)))
                assert not last.failures, last.failures
        finally:
            for w in workers:
                await w.stop()
        for i in range(n):
            y = np.concatenate([g[i] for g in got] +
                               ([last.outputs["logits"][i - 1]] if i else []))
            assert float(np.abs(y - whole_run(repo, "feat", 1, x[i, :len(y)])).max()) <= 1e-5

    asyncio.run(main())


def test_a_committed_blocks_answers_keep_their_rows_and_the_chunks_digest(
        repo, redis_server) -> None:
    """A session keeps its last answer as long as it lives: a committed block's answer
    owns copies of its output rows and keeps its chunk's digest (which its record
    needed) instead of the chunk, and the session is counted for exactly that."""
    from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.server.api import InferenceServicer
    from rnnserve.server.app import RnnServer
    from rnnserve.server.settings import Settings

    async def main() -> None:
        server = RnnServer(Settings(repo=repo, host="127.0.0.1", grpc_port=0,
                                    metrics_port=0, device="cpu", intra_op_threads=1,
                                    session_store=redis_server.url))
        await server.start()
        try:
            servicer = InferenceServicer(server.core, server.streams)
            sids = [new_session_id() for _ in range(8)]
            x = np.random.default_rng(54).standard_normal((8, 3, 20)).astype(np.float32)
            for seq, opens in ((0, range(8)), (1, ())):  # opened, then a block
                req = packed_request("feat", sids, [seq] * 8, x, opens=opens)
                resp: pb.PackedResponse = await servicer._packed(req, None)
                assert not resp.code and not resp.failures, resp
            rt = server.core.registry.get("feat")
            for i, sid in enumerate(sids):
                session = server.core.store.peek(sid)
                assert session is not None and session.answer is not None
                answer = session.answer
                assert answer.seq == 1 and answer.digest == digest(x[i])
                arrays = [a for _, a in answer.outputs]
                assert all(a.base is None for a in arrays)
                assert session.nbytes == rt.pool.row_bytes + sum(a.nbytes for a in arrays)
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_block_committed_after_its_caller_left_is_answered_on_retry(
        repo, redis_server, tmp_path) -> None:
    """The caller of a packed request goes away while Redis holds its block's write
    (``CLIENT PAUSE ... WRITE``): the write lands all the same, the store one chunk
    further than the copies here. Sent again on a new stream, without a resume, each
    session's chunk gets the stored answer: not refused as moved, not run again."""
    from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    n, chunks = 6, 4
    x = np.random.default_rng(55).standard_normal((n, chunks * STEPS, 20)).astype(np.float32)
    sids = [new_session_id() for _ in range(n)]
    server = serve(repo, tmp_path, "a", redis_server.url, "--store-timeout-ms", "10000")
    redis = redis_server.client()

    def request(k: int, **kw: object):
        req = packed_request("feat", sids, [k] * n,
                             np.ascontiguousarray(x[:, k * STEPS:(k + 1) * STEPS]), **kw)
        req.id = k
        return req

    async def main() -> list[np.ndarray]:
        got = []
        async with AsyncClient(server.target, timeout=30) as client:
            async with client.packed() as p:
                for k in range(2):
                    ans = await p.send(request(k, opens=range(n) if k == 0 else ()))
                    assert not ans.failures, ans.failures
                    got.append(ans.outputs["logits"])
            call = pb_grpc.InferenceStub(client.channel).StreamPacked()
            await leave_while_redis_holds_writes(server, redis, n,
                                                 lambda: call.write(request(2)), [call])
            async with client.packed() as p:
                for k in (2, 3):
                    ans = await p.send(request(k, ends=range(n) if k == 3 else ()))
                    assert not ans.failures, (k, ans.failures)
                    got.append(ans.outputs["logits"])
        return got

    try:
        got = asyncio.run(asyncio.wait_for(main(), 60))
        text = server.metrics()
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
        assert server.stop() == 0
    y = np.concatenate(got, axis=1)
    for i in range(n):
        assert float(np.abs(y[i] - whole_run(repo, "feat", 1, x[i])).max()) <= 1e-5
    # the retries took the store's newer records and were answered from them
    assert metric_value(text, "rnnserve_session_resumes_total", source="store") == n
    assert metric_value(text, "rnnserve_batch_size_sum") == n * chunks
    assert metric_value(text, "rnnserve_chunks_total", code="OK") == n * chunks
    assert metric_value(text, "rnnserve_chunks_total", code="ABORTED") == 0
    assert metric_value(text, "rnnserve_state_pool_rows") == 0
    assert metric_value(text, "rnnserve_active_sessions") == 0
