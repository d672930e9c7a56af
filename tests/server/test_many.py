"""``StreamMany``: many sessions' chunks per message on one stream, against the real
server; every item exact, batched, and failing alone."""

from __future__ import annotations

import asyncio
import signal

import grpc
import numpy as np

from rnnserve.client import AsyncClient, add_many_item, item_status, many_item, outputs
from rnnserve.client.client import new_session_id
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

from .serving import metric_value, start_server
from .test_grpc_api import mixed_jobs, whole_run


def test_many_sessions_on_one_stream_stream_exactly_and_batch(server, repo) -> None:
    jobs = mixed_jobs(np.random.default_rng(21), 24, 40)
    sids = [new_session_id() for _ in jobs]
    before = server.metrics()

    async def main() -> tuple[list[list[np.ndarray]], list[int]]:
        ys: list[list[np.ndarray]] = [[] for _ in jobs]
        sizes = []
        async with AsyncClient(server.target, timeout=20) as client, client.many() as m:
            k = 0
            while True:  # one request per round: the next chunk of every running job
                # (odd rounds write the items into the request, add_many_item's way)
                items, who, request = [], [], pb.ManyRequest()
                for j, (name, x, cuts) in enumerate(jobs):
                    if k + 1 < len(cuts):
                        a, b = cuts[k], cuts[k + 1]
                        if k % 2:
                            add_many_item(request, sids[j], k, x[a:b], end=b == len(x))
                        else:
                            items.append(many_item(sids[j], k, x[a:b], end=b == len(x),
                                                   open_model=name if k == 0 else ""))
                        who.append(j)
                if not who:
                    return ys, sizes
                results = await m.send(request if k % 2 else items)
                sizes.append(len(who))
                for j, r in zip(who, results, strict=True):
                    assert r.code == 0, r.message
                    assert r.session_id == sids[j] and r.result.seq == k
                    if k == 0:
                        assert r.opened.model == jobs[j][0] and r.opened.next_seq == 0
                    ys[j].append(outputs(r.result)["logits"])
                k += 1

    ys, sizes = asyncio.run(main())
    for (name, x, cuts), y in zip(jobs, ys, strict=True):
        want = whole_run(repo, name, 2 if name == "text" else 1, x)
        assert np.abs(np.concatenate(y) - want).max() <= 1e-5, f"{name} with cuts {cuts}"

    text = server.metrics()
    steps = sum(sizes)
    batches = metric_value(text, "rnnserve_batch_size_count") - \
        metric_value(before, "rnnserve_batch_size_count")
    # a request's items of one model and chunk length batch together
    assert batches < steps, f"{steps} steps in {batches} batches: none were batched"
    assert metric_value(text, "rnnserve_chunks_total", code="OK") - \
        metric_value(before, "rnnserve_chunks_total", code="OK") == steps
    assert metric_value(text, "rnnserve_requests_total", method="StreamMany", code="OK") >= 1
    assert metric_value(text, "rnnserve_state_bytes") == 0  # every session ended


def test_items_written_into_their_request_carry_what_was_asked() -> None:
    """add_many_item (in place, the load generator's way) and many_item write the same
    bytes, those of the messages spelled out field by field, for every kind of chunk
    and option."""
    from rnnserve.protos.tensors import to_tensor

    pcm = np.arange(-8, 8, dtype="<i2").tobytes()
    x = np.ones((2, 20), np.float32)
    cases = [("a", 0, "héllo", dict(open_model="text", version=2)),
             ("b", 3, pcm, dict(pcm16=True, timeout_ms=250)),
             ("c", 1, b"\x00\xff", dict(end=True)),
             ("d", 0, x, dict(open_model="feat", resume=True)),
             ("e", 9, "", {})]
    spelled = pb.ManyRequest(items=[
        pb.ManyItem(session_id="a", chunk=pb.Chunk(seq=0, text="héllo"),
                    open=pb.OpenSessionRequest(model="text", version=2)),
        pb.ManyItem(session_id="b", chunk=pb.Chunk(seq=3, pcm16=pcm, timeout_ms=250)),
        pb.ManyItem(session_id="c", chunk=pb.Chunk(
            seq=1, end=True, tensor=to_tensor(np.array([0, 255], np.uint8)))),
        pb.ManyItem(session_id="d", chunk=pb.Chunk(seq=0, tensor=to_tensor(x)),
                    open=pb.OpenSessionRequest(model="feat", resume=True)),
        pb.ManyItem(session_id="e", chunk=pb.Chunk(seq=9, text=""))])
    built = pb.ManyRequest()
    for sid, seq, data, kw in cases:
        add_many_item(built, sid, seq, data, **kw)  # type: ignore[arg-type]
    made = pb.ManyRequest(items=[many_item(sid, seq, data, **kw)  # type: ignore[arg-type]
                                 for sid, seq, data, kw in cases])
    assert built == made == spelled
    assert built.SerializeToString() == spelled.SerializeToString()
    assert built.items[4].chunk.WhichOneof("data") == "text"  # empty text is still text
    assert not built.items[1].HasField("open")


def test_a_failing_item_fails_alone_and_changes_nothing(server, repo) -> None:
    x = np.random.default_rng(22).standard_normal((6, 20)).astype(np.float32)
    want = whole_run(repo, "feat", 1, x)
    a, b = new_session_id(), new_session_id()

    async def main() -> list[np.ndarray]:
        async with AsyncClient(server.target, timeout=20) as client, client.many() as m:
            opened = await m.send([many_item(a, 0, x[:2], open_model="feat"),
                                   many_item(b, 0, x[:2], open_model="feat")])
            assert [r.code for r in opened] == [0, 0]
            bad = await m.send([
                many_item(a, 1, x[2:4]),                          # fine
                many_item(b, 5, x[2:4]),                          # a gap
                many_item("nobody", 0, x[2:4]),                   # unknown session
                many_item(b, 1, np.zeros((2, 3), np.float32)),    # wrong frame size
                many_item(a, 2, x[4:]),                           # a's chunk in flight
                many_item(b, 1, x[2:4].astype(np.int32)),         # wrong dtype
                pb.ManyItem(session_id=b),                        # neither open nor chunk
            ])
            codes = [item_status(r) for r in bad]
            assert codes == [grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION,
                             grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                             grpc.StatusCode.FAILED_PRECONDITION,
                             grpc.StatusCode.INVALID_ARGUMENT,
                             grpc.StatusCode.INVALID_ARGUMENT], [r.message for r in bad]
            assert "expects chunk 1, got 5" in bad[1].message
            assert "has a chunk in flight" in bad[4].message
            assert "neither" in bad[6].message
            # b is untouched by all of it; a went on by exactly one chunk
            rest = await m.send([many_item(a, 2, x[4:], end=True),
                                 many_item(b, 1, x[2:], end=True)])
            assert [r.code for r in rest] == [0, 0], [r.message for r in rest]
            after = await m.send([many_item(a, 3, x[:1])])
            assert item_status(after[0]) == grpc.StatusCode.FAILED_PRECONDITION
            assert "has ended" in after[0].message
            return [np.concatenate([outputs(opened[0].result)["logits"],
                                    outputs(bad[0].result)["logits"],
                                    outputs(rest[0].result)["logits"]]),
                    np.concatenate([outputs(opened[1].result)["logits"],
                                    outputs(rest[1].result)["logits"]])]

    for y in asyncio.run(main()):
        assert np.abs(y - want).max() <= 1e-5


def test_requests_in_flight_together_are_answered_by_id(server, repo) -> None:
    """Several tasks share one stream: each gets the answer to its own request."""
    xs = [np.random.default_rng(30 + i).integers(0, 256, 12, dtype=np.uint8)
          for i in range(16)]

    async def one(m, i: int) -> np.ndarray:
        sid, ys = new_session_id(), []
        for k in range(3):
            [r] = await m.send([many_item(sid, k, xs[i][4 * k:4 * k + 4], end=k == 2,
                                          open_model="text" if k == 0 else "")])
            assert r.code == 0 and r.session_id == sid, r.message
            ys.append(outputs(r.result)["logits"])
        return np.concatenate(ys)

    async def main() -> list[np.ndarray]:
        async with AsyncClient(server.target, timeout=20) as client, client.many() as m:
            return await asyncio.gather(*(one(m, i) for i in range(16)))

    for x, y in zip(xs, asyncio.run(main()), strict=True):
        assert np.abs(y - whole_run(repo, "text", 2, x)).max() <= 1e-5


def test_a_drain_answers_the_requests_in_flight_then_ends_the_stream(repo, tmp_path) -> None:
    srv = start_server(repo, tmp_path / "s.log", "--shutdown-grace-s", "5")
    x = np.random.default_rng(23).integers(0, 256, 8, dtype=np.uint8)

    async def main() -> tuple[str, str]:
        async with AsyncClient(srv.target, timeout=20) as client, client.many() as m:
            sid = new_session_id()
            [first] = await m.send([many_item(sid, 0, x[:4], open_model="text")])
            assert first.code == 0, first.message
            srv.proc.send_signal(signal.SIGTERM)
            outcomes = []
            for seq in (1, 2):  # the stream ends: this send or the next one fails
                try:
                    [r] = await m.send([many_item(sid, seq, x[4:])])
                    outcomes.append("OK" if r.code == 0 else item_status(r).name)
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(f"{exc.code().name}: {exc.details()}")
                    break
            try:  # and every send after it raises the same status at once
                await m.send([many_item(sid, 9, x[4:])])
            except grpc.aio.AioRpcError as exc:
                return outcomes[-1], f"{exc.code().name}: {exc.details()}"
            raise AssertionError(f"a send on an ended stream succeeded ({outcomes})")

    last, later = asyncio.run(main())
    # UNAVAILABLE from the drain; a grpc.aio client whose write races with that status
    # reports INTERNAL "Internal error from Core" instead (grpc/grpc#36066)
    assert last.startswith(("UNAVAILABLE: the server is shutting down",
                            "INTERNAL: Internal error from Core")), last
    assert later == last
    assert srv.proc.wait(10) == 0


def test_a_request_whose_answer_breaks_ends_the_stream_instead_of_hanging(
        repo, monkeypatch) -> None:
    """A bug that makes one request's answer raise (injected here into a real in-process
    server) ends the stream with INTERNAL at once; that request is never left waiting,
    and the server goes on serving new streams."""
    from rnnserve.server import api
    from rnnserve.server.settings import Settings

    from .serving import InProcessServer

    real = api.InferenceServicer._many

    async def buggy(self, req, expires):
        if req.id == 2:
            raise RuntimeError("injected")
        return await real(self, req, expires)

    monkeypatch.setattr(api.InferenceServicer, "_many", buggy)
    srv = InProcessServer(Settings(repo=repo, host="127.0.0.1", grpc_port=0, metrics_port=0,
                                   device="cpu", intra_op_threads=1))
    x = np.random.default_rng(23).standard_normal((2, 20)).astype(np.float32)

    async def main():
        async with AsyncClient(srv.target, timeout=10) as client:
            async with client.many() as m:
                first = await m.send([many_item("broken-a", 0, x[:1], open_model="feat")])
                try:
                    await m.send([many_item("broken-a", 1, x[1:])])
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details()
                else:
                    code, details = None, ""
            async with client.many() as m:  # a new stream is served
                again = await m.send([many_item("broken-b", 0, x[:1], open_model="feat")])
            return first, code, details, again

    try:
        first, code, details, again = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        srv.stop()
    assert item_status(first[0]) == grpc.StatusCode.OK
    assert code == grpc.StatusCode.INTERNAL and "see the server log" in details
    assert item_status(again[0]) == grpc.StatusCode.OK
