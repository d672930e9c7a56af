"""Second-pass races of the session core with the shared store: two real servers on
loopback, one real redis-server."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from rnnserve.client import Client
from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from ..server.serving import metric_value, start_server
from ..server.test_grpc_api import whole_run
from .test_failover import code_and_message, two_servers


def serve(repo, tmp_path, name: str, url: str, *flags: str):
    return start_server(repo, tmp_path / f"{name}.log", "--session-store", url,
                        "--max-batch-delay-ms", "2", *flags)


def test_a_dropped_outdated_copy_does_not_end_the_session_on_its_server(
        repo, redis_server, tmp_path) -> None:
    """A's copy is behind the store (B went on with it); A's step of it is refused and
    the copy dropped. The session has not ended: a unary step on A, without a resume,
    takes it from the store (the retry of B's last chunk gets its stored answer), as on
    any replica that does not hold it."""
    x = np.random.default_rng(21).standard_normal((12, 20)).astype(np.float32)
    want = whole_run(repo, "feat", 1, x)
    with two_servers(repo, tmp_path, redis_server.url) as (a, b, on_a, on_b):
        sid = on_a.open_session("feat").session_id
        y0 = on_a.step(sid, 0, x[:3])["logits"]
        time.sleep(1.3)  # A's lease lapses
        y1 = on_b.step(sid, 1, x[3:6])["logits"]  # B takes it; the answer "lost"
        time.sleep(1.3)  # B's lease lapses
        code, msg = code_and_message(on_a.step, sid, 1, x[3:6])  # A's copy: outdated
        assert code == grpc.StatusCode.ABORTED and "resume it" in msg, msg
        # the retry again on A, without a resume: the stored answer
        assert np.array_equal(on_a.step(sid, 1, x[3:6])["logits"], y1)
        y2 = on_a.step(sid, 2, x[6:], end=True)["logits"]
        got = np.concatenate([y0, y1, y2])
        assert float(np.abs(got - want).max()) <= 1e-5


BUSY_LUA = """
local t = redis.call('TIME')
local until_us = t[1] * 1000000 + t[2] + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= until_us
return 0
"""


def test_a_write_that_timed_out_but_landed_answers_the_retry(repo, redis_server,
                                                             tmp_path) -> None:
    """Redis busy past --store-timeout-ms: the step gets UNAVAILABLE ("retry the
    chunk"), but its write, already sent, lands once Redis goes on. The retry of that
    chunk on the same server (no resume) gets the stored answer: not ABORTED, not run
    again."""
    x = np.random.default_rng(22).standard_normal((9, 20)).astype(np.float32)
    want = whole_run(repo, "feat", 1, x)
    a = serve(repo, tmp_path, "a", redis_server.url, "--store-timeout-ms", "300")
    redis = redis_server.client()
    try:
        with Client(a.target, timeout=10) as on_a:
            sid = on_a.open_session("feat").session_id
            y0 = on_a.step(sid, 0, x[:3])["logits"]
            busy = threading.Thread(target=redis.eval, args=(BUSY_LUA, 0, 1500))
            busy.start()
            time.sleep(0.2)  # the script runs: Redis reads nothing else until it ends
            code, msg = code_and_message(on_a.step, sid, 1, x[3:6])
            assert code == grpc.StatusCode.UNAVAILABLE, msg
            busy.join()
            time.sleep(0.2)
            assert int(redis.hget(f"rnnserve:{{{sid}}}:s", "seq")) == 2  # it landed
            runs = metric_value(a.metrics(), "rnnserve_batch_size_sum")
            y1 = on_a.step(sid, 1, x[3:6])["logits"]  # the retry: the stored answer
            assert metric_value(a.metrics(), "rnnserve_batch_size_sum") == runs
            y2 = on_a.step(sid, 2, x[6:], end=True)["logits"]
        got = np.concatenate([y0, y1, y2])
        assert float(np.abs(got - want).max()) <= 1e-5
    finally:
        redis.close()
        assert a.stop() == 0


@pytest.mark.parametrize("cap", [["--when-full", "refuse", "--max-sessions", "1"],
                                 ["--max-sessions-per-principal", "1"]],
                         ids=["max-sessions", "per-principal"])
def test_an_open_refused_at_the_cap_leaves_no_record_behind(repo, redis_server, tmp_path,
                                                             cap) -> None:
    """--when-full refuse at --max-sessions 1 (or --max-sessions-per-principal 1): of
    two opens at once, both admitted before either is live here, the second is refused
    (RESOURCE_EXHAUSTED, retry later) once its record is in the shared store. The
    record goes with the refusal: the same open sent again once there is room (a
    retry, as the pushback invites) opens the session, and is not refused as
    ALREADY_EXISTS."""
    a = serve(repo, tmp_path, "a", redis_server.url, *cap)
    redis = redis_server.client()

    async def main() -> None:
        async with grpc.aio.insecure_channel(a.target) as channel:
            stub = pb_grpc.InferenceStub(channel)

            async def open_(sid: str) -> grpc.StatusCode:
                try:
                    await stub.OpenSession(pb.OpenSessionRequest(model="feat", session_id=sid),
                                           timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            busy = asyncio.get_running_loop().run_in_executor(
                None, lambda: redis.eval(BUSY_LUA, 0, 500))
            await asyncio.sleep(0.1)  # Redis holds the writes: both opens are admitted
            codes = await asyncio.gather(open_("cap-1"), open_("cap-2"))
            await busy
            assert sorted(c.name for c in codes) == ["OK", "RESOURCE_EXHAUSTED"], codes
            opened, refused = ("cap-1", "cap-2") if codes[0] == grpc.StatusCode.OK \
                else ("cap-2", "cap-1")
            await stub.CloseSession(pb.CloseSessionRequest(session_id=opened), timeout=10)
            assert await open_(refused) == grpc.StatusCode.OK

    try:
        asyncio.run(main())
    finally:
        redis.close()
        assert a.stop() == 0



def test_a_copy_evicted_while_its_refresh_waits_is_taken_from_the_store(
        repo, shards, tmp_path) -> None:
    """Sequence A's next request finds its copy idle past the lease and asks the store
    for it; A's shard is paused, so the answer waits. Meanwhile an open evicts A's copy
    here (the other shard answers) and session B's next state takes the pool row A had.
    When A's shard answers, A is taken from its record into a row of its own: it must
    not run from the row it had (B's state now), nor write what that gives to the
    store."""
    from rnnserve.server.shared import shard_of

    from ..oip.test_protocol import logits, request

    def on_shard(prefix: str, shard: int) -> str:
        return next(f"{prefix}{i}" for i in range(1000)
                    if shard_of(f"{prefix}{i}", len(shards)) == shard)

    label = on_shard("feat/race-", 0).removeprefix("feat/")
    b_id, c_id = on_shard("b-", 1), on_shard("c-", 1)
    rng = np.random.default_rng(24)
    xa, xb = (rng.standard_normal((6, 20)).astype(np.float32) for _ in range(2))
    a = serve(repo, tmp_path, "a", ",".join(s.url for s in shards), "--lease-s", "0.5",
              "--max-sessions", "2", "--store-timeout-ms", "5000")
    try:
        with grpc.insecure_channel(a.target) as channel, Client(a.target, timeout=10) as on_a:
            oip = oip_grpc.GRPCInferenceServiceStub(channel)

            def seq_a(i: int, **flags: object) -> np.ndarray:
                return logits(oip.ModelInfer(request(xa[None, i:i + 2], sequence_id=label,
                                                     **flags), timeout=10))[0]

            got_a = [seq_a(0, sequence_start=True)]
            on_a.open_session("feat", session_id=b_id)
            got_b = [on_a.step(b_id, 0, xb[:2])["logits"]]  # A is the least recent
            time.sleep(0.7)  # A's copy is past its lease: its next request asks the store
            shards[0].client().execute_command("CLIENT", "PAUSE", "3000")
            answers: list[np.ndarray] = []
            second = threading.Thread(target=lambda: answers.append(seq_a(2)))
            second.start()
            time.sleep(1.0)  # its request waits on the paused shard by then
            on_a.open_session("feat", session_id=c_id)  # evicts A's copy
            got_b.append(on_a.step(b_id, 1, xb[2:4])["logits"])  # into A's old row
            second.join(15)
            assert answers, "sequence A's second request failed (see the log)"
            got_a += [answers[0], seq_a(4, sequence_end=True)]
            got_b.append(on_a.step(b_id, 2, xb[4:], end=True)["logits"])
        np.testing.assert_allclose(np.concatenate(got_a), whole_run(repo, "feat", 1, xa),
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.concatenate(got_b), whole_run(repo, "feat", 1, xb),
                                   atol=1e-5, rtol=0)
    finally:
        assert a.stop() == 0
