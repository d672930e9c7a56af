"""``StreamMany`` on the shared store: a request's plain chunks are queued together in the
core (no task each); those whose session must first come from the store (held nowhere
here, or gone on elsewhere) take the full step path beside them. Two servers on one
Redis, every step durable, every output exact."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from rnnserve.client import AsyncClient, item_status, many_item, outputs
from rnnserve.client.client import new_session_id

from ..server.serving import metric_value
from ..server.test_grpc_api import whole_run
from .test_failover import serve

SESSIONS, CHUNKS = 12, 6


def test_sessions_moving_between_servers_mid_request_stay_exact(repo, redis_server,
                                                                tmp_path) -> None:
    rng = np.random.default_rng(31)
    xs = [rng.standard_normal((2 * CHUNKS, 20)).astype(np.float32) for _ in range(SESSIONS)]
    sids = [new_session_id() for _ in range(SESSIONS)]
    a = serve(repo, tmp_path, "a", redis_server.url, "--lease-s", "0.2")
    b = serve(repo, tmp_path, "b", redis_server.url, "--lease-s", "0.2")

    def item(j: int, k: int, **kw: object):
        return many_item(sids[j], k, xs[j][2 * k:2 * k + 2], end=k == CHUNKS - 1, **kw)

    async def main() -> list[list[np.ndarray]]:
        ys: list[list[np.ndarray]] = [[] for _ in range(SESSIONS)]

        def take(k: int, results) -> None:
            for j, r in enumerate(results):
                assert r.code == 0, (j, k, r.message)
                assert r.result.seq == k
                ys[j].append(outputs(r.result)["logits"])

        async with AsyncClient(a.target, timeout=20) as ca, \
                AsyncClient(b.target, timeout=20) as cb, ca.many() as ma, cb.many() as mb:
            take(0, await ma.send([item(j, 0, open_model="feat") for j in range(SESSIONS)]))
            take(1, await ma.send([item(j, 1) for j in range(SESSIONS)]))
            await asyncio.sleep(0.3)  # a's leases lapse
            # b holds none of them: each item loads its session from the store
            take(2, await mb.send([item(j, 2) for j in range(SESSIONS)]))
            # a retry of chunk 2 (its answer was lost) gets the same answer again
            again = await mb.send([item(0, 2)])
            assert again[0].code == 0 and again[0].result.seq == 2, again[0].message
            assert np.array_equal(outputs(again[0].result)["logits"], ys[0][2])
            take(3, await mb.send([item(j, 3) for j in range(SESSIONS)]))  # b's own copies
            await asyncio.sleep(0.3)
            # back on a, whose copies stopped at chunk 2: half the sessions ahead of
            # them (refreshed from the store), half with a gap (refused, untouched)
            mixed = await ma.send([item(j, 4) if j % 2 == 0 else item(j, 6)
                                   for j in range(SESSIONS)])
            for j, r in enumerate(mixed):
                if j % 2:
                    assert item_status(r) == grpc.StatusCode.FAILED_PRECONDITION, r.message
                    assert "expects chunk 4, got 6" in r.message
                else:
                    assert r.code == 0 and r.result.seq == 4, (j, r.message)
                    ys[j].append(outputs(r.result)["logits"])
            take_odd = await ma.send([item(j, 4) for j in range(1, SESSIONS, 2)])
            for j, r in zip(range(1, SESSIONS, 2), take_odd, strict=True):
                assert r.code == 0, r.message
                ys[j].append(outputs(r.result)["logits"])
            take(5, await ma.send([item(j, 5) for j in range(SESSIONS)]))
        return ys

    try:
        ys = asyncio.run(main())
        text_a, text_b = a.metrics(), b.metrics()
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    for x, y in zip(xs, ys, strict=True):
        assert len(y) == CHUNKS
        assert float(np.abs(np.concatenate(y) - whole_run(repo, "feat", 1, x)).max()) <= 1e-5
    assert metric_value(text_b, "rnnserve_session_resumes_total", source="store") == SESSIONS
    assert metric_value(text_a, "rnnserve_session_resumes_total", source="store") == SESSIONS
    # every chunk counted once where it was answered (the retry too), the gaps refused
    ok = metric_value(text_a, "rnnserve_chunks_total", code="OK") + \
        metric_value(text_b, "rnnserve_chunks_total", code="OK")
    assert ok == SESSIONS * CHUNKS + 1
    assert metric_value(text_a, "rnnserve_chunks_total",
                        code="FAILED_PRECONDITION") == SESSIONS // 2
    assert len(redis_server.session_keys()) == SESSIONS  # the final answers, kept for retries


def test_packed_sessions_on_the_shared_store_move_between_servers_exactly(
        repo, redis_server, tmp_path) -> None:
    """``StreamPacked`` with a shared store: every session's step is written before it
    is answered (a block's in one call, a session to load on the full step path), so
    the sessions a request opened on one server go on on another, exactly, and a
    request sent again gets its answers again."""
    from rnnserve.client import packed_request

    n = 6
    x = np.random.default_rng(32).standard_normal((n, 8, 20)).astype(np.float32)
    sids = [new_session_id() for _ in range(n)]
    a = serve(repo, tmp_path, "a", redis_server.url, "--lease-s", "0.2")
    b = serve(repo, tmp_path, "b", redis_server.url, "--lease-s", "0.2")

    async def main() -> np.ndarray:
        async with AsyncClient(a.target, timeout=20) as ca, \
                AsyncClient(b.target, timeout=20) as cb, ca.packed() as pa, \
                cb.packed() as pb_:
            first = await pa.send(packed_request("feat", sids, [0] * n, x[:, :3],
                                                 opens=range(n)))
            assert not first.failures, first.failures
            await asyncio.sleep(0.3)  # a's leases lapse: b takes them from the store
            second = await pb_.send(packed_request("feat", sids, [1] * n, x[:, 3:5]))
            again = await pb_.send(packed_request("feat", sids, [1] * n, x[:, 3:5]))
            assert not second.failures and not again.failures, again.failures
            assert np.array_equal(second.outputs["logits"], again.outputs["logits"])
            last = await pb_.send(packed_request("feat", sids, [2] * n, x[:, 5:],
                                                 ends=range(n)))
            assert not last.failures, last.failures
            return np.concatenate([first.outputs["logits"], second.outputs["logits"],
                                   last.outputs["logits"]], axis=1)

    try:
        y = asyncio.run(main())
        text_b = b.metrics()
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    for i in range(n):
        assert float(np.abs(y[i] - whole_run(repo, "feat", 1, x[i])).max()) <= 1e-5
    assert metric_value(text_b, "rnnserve_session_resumes_total", source="store") == n
