"""Overload: admission control sheds new work with RESOURCE_EXHAUSTED and a retry hint,
while the sessions already admitted keep their latency and their exact outputs; nothing
hangs and memory returns to its baseline. Real servers on loopback."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from rnnserve.client import AsyncClient, Client
from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.protos.tensors import from_tensor, to_tensor

from ..oip.test_protocol import request
from ..server.serving import metric_value, start_server
from ..server.test_grpc_api import whole_run

PUSHBACK = "grpc-retry-pushback-ms"
# The stated bound for admitted streams' latency at 4x their number in refused load (a
# tiny model on a shared 2-core CI machine; unloaded, a few ms). Taken at the 95th
# percentile of the 720 chunks: one stall of the machine delays the 12 chunks then in
# flight (1.7%) and failed a p99 bound in CI at 0.58 s, while load that the admission
# control let through would slow most chunks, not a dozen.
ADMITTED_P95_S = 0.25


async def step(stub: pb_grpc.InferenceStub, sid: str, seq: int, x: np.ndarray,
               end: bool = False) -> np.ndarray:
    resp = await stub.Step(pb.StepRequest(session_id=sid, chunk=pb.Chunk(
        seq=seq, end=end, tensor=to_tensor(x))), timeout=30)
    (out,) = resp.result.outputs
    return from_tensor(out.tensor)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def pushback_ms(err: grpc.RpcError) -> int:
    trailers = dict(err.trailing_metadata() or ())
    return int(trailers[PUSHBACK])


def test_a_full_server_refuses_new_streams_and_keeps_the_admitted_ones_fast(repo,
                                                                            tmp_path) -> None:
    """12 sessions fit (--max-sessions 12 --when-full refuse); 48 clients stream at once
    and the 36 refused keep retrying. The 12 admitted stream 60 chunks each in real
    time: p95 within the bound, outputs exact; refusals carry the retry hint; once the
    admitted close, a refused client gets in."""
    fit, crowd, chunks = 12, 48, 60
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((chunks * 2, 20)).astype(np.float32) for _ in range(fit)]
    server = start_server(repo, tmp_path / "full.log", "--max-sessions", str(fit),
                          "--when-full", "refuse")
    try:
        with Client(server.target, timeout=10) as warm:  # a warm server is the baseline
            sid = warm.open_session("feat").session_id
            warm.step(sid, 0, xs[0][:2])
            warm.close_session(sid)
        baseline = rss_bytes(server.proc.pid)

        async def main():
            admitted: list[int] = []
            finished: list[tuple[list[float], np.ndarray, np.ndarray]] = []
            refusals: list[grpc.aio.AioRpcError] = []
            done = asyncio.Event()
            async with AsyncClient(server.target, timeout=10) as client:
                stub = pb_grpc.InferenceStub(client.channel)

                async def one(i: int) -> None:
                    while not done.is_set():
                        try:
                            info = await stub.OpenSession(pb.OpenSessionRequest(model="feat"))
                        except grpc.aio.AioRpcError as exc:
                            refusals.append(exc)
                            await asyncio.sleep(0.05)
                            continue
                        if done.is_set():
                            # opened after the admitted began to close (its request was in
                            # flight when they finished): not one of the admitted, let it go
                            await stub.CloseSession(pb.CloseSessionRequest(
                                session_id=info.session_id))
                            return
                        x = xs[len(admitted)]
                        admitted.append(i)
                        lat: list[float] = []
                        ys: list[np.ndarray] = []
                        for c in range(chunks):
                            t0 = time.perf_counter()
                            ys.append(await step(stub, info.session_id, c, x[2 * c:2 * c + 2]))
                            lat.append(time.perf_counter() - t0)
                            await asyncio.sleep(0.02)
                        finished.append((lat, np.concatenate(ys), x))
                        await done.wait()  # the session stays open until all are done
                        await stub.CloseSession(pb.CloseSessionRequest(
                            session_id=info.session_id))
                        return

                tasks = [asyncio.create_task(one(i)) for i in range(crowd)]
                while len(finished) < fit:
                    await asyncio.sleep(0.05)
                late_open = len(admitted)
                done.set()
                await asyncio.gather(*tasks)
                # the admitted closed their sessions: a newcomer gets in
                newcomer = await stub.OpenSession(pb.OpenSessionRequest(model="feat"))
                await stub.CloseSession(pb.CloseSessionRequest(session_id=newcomer.session_id))
            return finished, refusals, late_open

        finished, refusals, late_open = asyncio.run(asyncio.wait_for(main(), 120))
        text = server.metrics()
        after = rss_bytes(server.proc.pid)
    finally:
        assert server.stop() == 0
    assert late_open == fit
    assert len(refusals) >= crowd - fit
    for exc in refusals:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
        assert "most sessions" in exc.details() and pushback_ms(exc) == 1000
    latencies = np.concatenate([lat for lat, _, _ in finished])
    assert len(latencies) == fit * chunks
    assert float(np.percentile(latencies, 95)) <= ADMITTED_P95_S, np.percentile(latencies, 95)
    for _, got, x in finished:
        assert float(np.abs(got - whole_run(repo, "feat", 1, x)).max()) <= 1e-5
    assert metric_value(text, "rnnserve_active_sessions") == 0
    assert after - baseline <= 32 << 20, (baseline, after)


def test_admission_sheds_new_work_while_steps_wait_and_recovers(repo, tmp_path) -> None:
    """--admission-queue-wait-ms 5: a flood of long stateless requests makes steps wait;
    new sessions and further stateless requests are refused (with a retry hint) while
    the sessions admitted before go on exactly; when the flood ends, admission opens."""
    server = start_server(repo, tmp_path / "adm.log", "--admission-queue-wait-ms", "5",
                          "--max-batch-size", "4", "--max-queue", "100000")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 20)).astype(np.float32)
    heavy = request(rng.standard_normal((1, 3000, 20)).astype(np.float32))
    try:
        async def main():
            async with AsyncClient(server.target, timeout=60) as client:
                oip = oip_grpc.GRPCInferenceServiceStub(client.channel)
                native = pb_grpc.InferenceStub(client.channel)
                sid = (await native.OpenSession(pb.OpenSessionRequest(model="feat"))).session_id
                flood_codes: list[grpc.StatusCode] = []

                async def flood() -> None:
                    try:
                        await oip.ModelInfer(heavy)
                        flood_codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as exc:
                        flood_codes.append(exc.code())

                floods = [asyncio.create_task(flood()) for _ in range(300)]
                refused_open = None
                ys = []
                for c in range(20):  # the admitted session keeps stepping meanwhile
                    ys.append(await step(native, sid, c, x[2 * c:2 * c + 2]))
                    if refused_open is None:
                        try:
                            info = await native.OpenSession(pb.OpenSessionRequest(model="feat"))
                            await native.CloseSession(
                                pb.CloseSessionRequest(session_id=info.session_id))
                        except grpc.aio.AioRpcError as exc:
                            refused_open = exc
                await asyncio.gather(*floods)
                deadline = time.monotonic() + 10
                while True:  # the flood is over: admission opens again
                    try:
                        info = await native.OpenSession(pb.OpenSessionRequest(model="feat"))
                        break
                    except grpc.aio.AioRpcError:
                        assert time.monotonic() < deadline, "admission never reopened"
                        await asyncio.sleep(0.1)
                return np.concatenate(ys), refused_open, flood_codes

        got, refused_open, flood_codes = asyncio.run(asyncio.wait_for(main(), 180))
        text = server.metrics()
    finally:
        assert server.stop() == 0
    assert float(np.abs(got - whole_run(repo, "feat", 1, x)).max()) <= 1e-5
    assert refused_open is not None, "no new session was refused during the flood"
    assert refused_open.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity" in refused_open.details() and 50 <= pushback_ms(refused_open) <= 5000
    shed = flood_codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert shed > 0 and flood_codes.count(grpc.StatusCode.OK) > 0
    assert set(flood_codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert metric_value(text, "rnnserve_chunks_total", code="RESOURCE_EXHAUSTED") >= shed
