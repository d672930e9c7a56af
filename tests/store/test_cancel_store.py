"""A caller that goes away while its chunk is being written to the shared store: the
write lands all the same (the run and the commit do not wait for the caller), so the
store holds the session one chunk further than the server's own copy. The client's
retry of that chunk, on any stream and without resuming, must get the stored answer:
not be refused as moved, and not be applied twice.

Redis is made to hold the commit deterministically with ``CLIENT PAUSE ... WRITE``
(its writes wait, the server's and everyone's), the streams are cancelled while it
waits, then Redis goes on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from rnnserve.client import AsyncClient, many_item, outputs
from rnnserve.client.client import new_session_id
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.protos.tensors import from_tensor, to_tensor

from ..server.serving import metric_value
from ..server.test_grpc_api import whole_run
from .test_failover import serve

MANY, ALONE, CHUNKS = 4, 4, 4  # sessions on one StreamMany stream, on a Stream each


async def leave_while_redis_holds_writes(server, redis, n: int,
                                         send: Callable[[], Awaitable[None]],
                                         calls: list[Any]) -> None:
    """With Redis's writes paused, ``send`` steps of ``n`` sessions; once they all ran
    (their commits waiting in Redis), cancel ``calls``, let Redis go on, and return
    once the server counted the ``n`` chunks cancelled and the held writes landed."""

    def steps_run() -> float:
        return metric_value(server.metrics(), "rnnserve_batch_size_sum")

    before = steps_run()
    redis.execute_command("CLIENT", "PAUSE", "8000", "WRITE")
    try:
        await send()
        deadline = time.monotonic() + 5
        while steps_run() < before + n:  # every step ran; their commits wait
            assert time.monotonic() < deadline, "the steps did not run"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        for call in calls:
            call.cancel()
        await asyncio.sleep(0.3)  # the server sees the cancellations
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
    deadline = time.monotonic() + 5
    while metric_value(server.metrics(), "rnnserve_chunks_total", code="CANCELLED") < n:
        assert time.monotonic() < deadline, "the cancellations were not counted"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # the held commits land in Redis


def test_a_chunk_committed_after_its_caller_left_is_answered_on_retry(repo, redis_server,
                                                                      tmp_path) -> None:
    n = MANY + ALONE
    rng = np.random.default_rng(41)
    xs = [rng.standard_normal((2 * CHUNKS, 20)).astype(np.float32) for _ in range(n)]
    sids = [new_session_id() for _ in range(n)]
    server = serve(repo, tmp_path, "a", redis_server.url, "--store-timeout-ms", "10000")
    redis = redis_server.client()

    def chunk(j: int, k: int) -> pb.Chunk:
        return pb.Chunk(seq=k, end=k == CHUNKS - 1, tensor=to_tensor(xs[j][2 * k:2 * k + 2]))

    async def main() -> list[list[np.ndarray]]:
        ys: list[list[np.ndarray]] = [[] for _ in range(n)]
        async with AsyncClient(server.target, timeout=30) as client:
            stub = pb_grpc.InferenceStub(client.channel)
            many = stub.StreamMany()
            alone = [stub.Stream() for _ in range(ALONE)]

            async def on_many(request_id: int, items: list[pb.ManyItem]) -> pb.ManyResponse:
                await many.write(pb.ManyRequest(id=request_id, items=items))
                return await many.read()

            async def on_alone(i: int, request: pb.StreamRequest) -> pb.StreamResponse:
                await alone[i].write(request)
                return await alone[i].read()

            # chunks 0 and 1, answered and durable
            for k in range(2):
                items = [pb.ManyItem(session_id=sids[j], chunk=chunk(j, k)) for j in range(MANY)]
                if k == 0:
                    for item in items:
                        item.open.model = "feat"
                got = await on_many(k, items)
                for j, r in enumerate(got.results):
                    assert r.code == 0, r.message
                    ys[j].append(from_tensor(r.result.outputs[0].tensor))
            for i in range(ALONE):
                j = MANY + i
                await on_alone(i, pb.StreamRequest(open=pb.OpenSessionRequest(
                    model="feat", session_id=sids[j])))
                for k in range(2):
                    r = (await on_alone(i, pb.StreamRequest(chunk=chunk(j, k)))).result
                    ys[j].append(from_tensor(r.outputs[0].tensor))

            # chunk 2 runs, and its commit waits in Redis; the callers go away meanwhile
            async def send() -> None:
                await many.write(pb.ManyRequest(id=2, items=[
                    pb.ManyItem(session_id=sids[j], chunk=chunk(j, 2)) for j in range(MANY)]))
                for i in range(ALONE):
                    await alone[i].write(pb.StreamRequest(chunk=chunk(MANY + i, 2)))

            await leave_while_redis_holds_writes(server, redis, n, send, [many, *alone])

            # the retries of chunk 2, on a new stream, then the last chunk
            async with client.many() as m:
                for k in (2, 3):
                    got = await m.send([many_item(sids[j], k, xs[j][2 * k:2 * k + 2],
                                                  end=k == CHUNKS - 1) for j in range(n)])
                    for j, r in enumerate(got):
                        assert r.code == 0, (j, k, r.message)
                        assert r.result.seq == k
                        ys[j].append(outputs(r.result)["logits"])
        return ys

    try:
        ys = asyncio.run(asyncio.wait_for(main(), 60))
        text = server.metrics()
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
        assert server.stop() == 0
    for x, y in zip(xs, ys, strict=True):
        assert len(y) == CHUNKS
        assert float(np.abs(np.concatenate(y) - whole_run(repo, "feat", 1, x)).max()) <= 1e-5
    # the held commits landed: each retry took the store's newer record (a resume from
    # the store) and was answered from it, not run again
    assert metric_value(text, "rnnserve_session_resumes_total", source="store") == n
    assert metric_value(text, "rnnserve_batch_size_sum") == n * CHUNKS
    assert metric_value(text, "rnnserve_chunks_total", code="OK") == n * CHUNKS
    assert metric_value(text, "rnnserve_chunks_total", code="CANCELLED") == n
    assert metric_value(text, "rnnserve_chunks_total", code="ABORTED") == 0
    assert metric_value(text, "rnnserve_state_pool_rows") == 0  # no row kept by anyone
    assert metric_value(text, "rnnserve_active_sessions") == 0


def test_a_closed_sessions_step_still_queued_does_not_write_over_its_reopened_id(
        repo, redis_server, tmp_path) -> None:
    """Close a session while its first chunk waits for its batch, open the id again:
    the old step, once it runs, must not write its state into the new session's record
    (both at chunk 0, the seq cannot tell them apart), which made the new session's
    first chunk ABORTED 'advanced elsewhere'."""
    import threading

    import grpc

    from rnnserve.client import Client

    x = np.random.default_rng(43).standard_normal((6, 20)).astype(np.float32)
    server = serve(repo, tmp_path, "a", redis_server.url, "--max-batch-delay-ms", "600")
    old: list[object] = []
    try:
        with Client(server.target, timeout=10) as c:
            sid = c.open_session("feat").session_id

            def step_old() -> None:
                try:
                    old.append(c.step(sid, 0, x[:3] * 5))
                except grpc.RpcError as exc:
                    old.append(exc)

            thread = threading.Thread(target=step_old)
            thread.start()
            time.sleep(0.2)  # queued: the batch waits 600 ms for more steps
            c.close_session(sid)
            c.open_session("feat", session_id=sid)
            thread.join(10)
            y0 = c.step(sid, 0, x[:3])["logits"]
            y1 = c.step(sid, 1, x[3:], end=True)["logits"]
    finally:
        assert server.stop() == 0
    assert isinstance(old[0], grpc.RpcError), old
    assert old[0].code() == grpc.StatusCode.FAILED_PRECONDITION, old[0].details()
    got = np.concatenate([y0, y1])
    assert float(np.abs(got - whole_run(repo, "feat", 1, x)).max()) <= 1e-5
