"""``StreamPacked``: many sessions' chunks in one array per message, against the real
server; every session exact, stepped as blocks, failing alone, and a request refused
whole changing nothing."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, item_status, many_item, outputs, packed_request
from rnnserve.client.client import new_session_id
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

from .serving import metric_value, start_server
from .test_grpc_api import whole_run

CODE = grpc.StatusCode


def _delta(before: str, after: str, name: str, **labels: str) -> float:
    return metric_value(after, name, **labels) - metric_value(before, name, **labels)


def test_packed_sessions_stream_exactly_in_blocks(server, repo) -> None:
    """40 feat sessions (more than a batch: the server splits them), half opened by the
    first request, half beforehand by OpenSession; chunks of 1 to 5 steps per round;
    every session's answers equal one run of its whole input."""
    rng = np.random.default_rng(41)
    n, cuts = 40, [0, 3, 4, 9, 11, 16]
    x = rng.standard_normal((n, cuts[-1], 20)).astype(np.float32)
    sids = [new_session_id() for _ in range(n)]
    before = server.metrics()

    async def main() -> np.ndarray:
        ys = []
        async with AsyncClient(server.target, timeout=20) as client:
            for sid in sids[n // 2:]:
                await client.stub.OpenSession(pb.OpenSessionRequest(model="feat",
                                                                    session_id=sid))
            async with client.packed() as p:
                for k in range(len(cuts) - 1):
                    last = k == len(cuts) - 2
                    answer = await p.send(packed_request(
                        "feat", sids, [k] * n, x[:, cuts[k]:cuts[k + 1]],
                        opens=range(n // 2) if k == 0 else (),
                        ends=range(n) if last else ()))
                    assert not answer.failures, answer.failures
                    assert list(answer.outputs) == ["logits"]
                    ys.append(answer.outputs["logits"])
        return np.concatenate(ys, axis=1)

    y = asyncio.run(main())
    for i in range(n):
        assert np.abs(y[i] - whole_run(repo, "feat", 1, x[i])).max() <= 1e-5, i
    after = server.metrics()
    steps = n * (len(cuts) - 1)
    assert _delta(before, after, "rnnserve_chunks_total", code="OK") == steps
    assert _delta(before, after, "rnnserve_chunk_latency_seconds_count") == steps
    # the 20 opened beforehand had their first answer from a packed block
    assert _delta(before, after, "rnnserve_time_to_first_output_seconds_count") == n
    assert _delta(before, after, "rnnserve_queue_wait_seconds_count") == steps
    batches = _delta(before, after, "rnnserve_batch_size_count")
    assert batches < steps / 4, f"{steps} steps in {batches} runs"
    assert _delta(before, after, "rnnserve_requests_total", method="StreamPacked",
                  code="OK", model="feat", version="1") == 1  # labelled by its model
    assert metric_value(after, "rnnserve_state_bytes") == 0  # every session ended


def test_sessions_of_two_versions_step_together_each_on_its_own(server, repo) -> None:
    """A request for text (its highest version, 2) carries sessions of versions 1 and
    2, interleaved: each runs on its own version, and the answers come back in order."""
    rng = np.random.default_rng(42)
    n = 6
    x = rng.integers(0, 256, (n, 9), dtype=np.uint8)
    sids = [new_session_id() for _ in range(n)]
    versions = [1 if i % 2 else 2 for i in range(n)]

    async def main() -> np.ndarray:
        async with AsyncClient(server.target, timeout=20) as client:
            async with client.many() as m:
                opened = await m.send([many_item(sids[i], 0, x[i, :4], open_model="text",
                                                 version=versions[i]) for i in range(n)])
                assert all(r.code == 0 for r in opened), [r.message for r in opened]
                first = np.stack([outputs(r.result)["logits"] for r in opened])
            async with client.packed() as p:
                answer = await p.send(packed_request("text", sids, [1] * n, x[:, 4:],
                                                     ends=range(n)))
        assert not answer.failures, answer.failures
        return np.concatenate([first, answer.outputs["logits"]], axis=1)

    y = asyncio.run(main())
    for i in range(n):
        assert np.abs(y[i] - whole_run(repo, "text", versions[i], x[i])).max() <= 1e-5, i


def test_a_failing_session_fails_alone_and_changes_nothing(server, repo) -> None:
    rng = np.random.default_rng(43)
    x = rng.standard_normal((4, 8, 20)).astype(np.float32)
    a, b, c, d = (new_session_id() for _ in range(4))
    t = new_session_id()
    before = server.metrics()

    async def main() -> list[np.ndarray]:
        async with AsyncClient(server.target, timeout=20) as client, \
                client.packed() as p:
            first = await p.send(packed_request("feat", [a, b, c, d], [0] * 4, x[:, :2],
                                                opens=range(4)))
            assert not first.failures
            with_text = await p.send(packed_request("text", [t], [0], np.zeros((1, 2),
                                                                               np.uint8),
                                                    opens=[0]))
            assert not with_text.failures
            bad_x = x[:, 2:4].copy()
            bad_x[2, 1, 3] = np.nan
            sids = [a, b, c, d, "nobody", a, t]
            chunks = np.concatenate([bad_x, x[:3, 2:4]])
            bad = await p.send(packed_request("feat", sids, [1, 5, 1, 1, 0, 1, 1], chunks))
            got = {i: code for i, (code, _, _) in bad.failures.items()}
            assert got == {1: CODE.FAILED_PRECONDITION,  # a gap
                           2: CODE.INVALID_ARGUMENT,     # NaN in its chunk
                           4: CODE.NOT_FOUND,            # unknown session
                           5: CODE.FAILED_PRECONDITION,  # a twice: in flight already
                           6: CODE.INVALID_ARGUMENT}, bad.failures  # a text session
            assert "expects chunk 1, got 5" in bad.failures[1][1]
            assert "NaN" in bad.failures[2][1]
            assert "has a chunk in flight" in bad.failures[5][1]
            assert "belongs to model 'text', not 'feat'" in bad.failures[6][1]
            for i in bad.failures:  # a failed session's rows are zeros
                assert not bad.outputs["logits"][i].any()
            # b and c untouched by all of it: their chunk 1 now; a and d went on by one
            rest = await p.send(packed_request("feat", [a, b, c, d], [2, 1, 1, 2],
                                               np.stack([x[0, 4:], x[1, 2:6], x[2, 2:6],
                                                         x[3, 4:]]), ends=[0, 3]))
            assert not rest.failures, rest.failures
            ended = await p.send(packed_request("feat", [a], [3], x[:1, :1]))
            assert ended.failures[0][0] == CODE.FAILED_PRECONDITION
            assert "has ended" in ended.failures[0][1]
            o = lambda ans: ans.outputs["logits"]  # noqa: E731
            return [np.concatenate([o(first)[0], o(bad)[0], o(rest)[0]]),
                    np.concatenate([o(first)[1], o(rest)[1]]),
                    np.concatenate([o(first)[2], o(rest)[2]]),
                    np.concatenate([o(first)[3], o(bad)[3], o(rest)[3]])]

    ys = asyncio.run(main())
    for i, y in enumerate(ys):
        have = y.shape[0]
        assert np.abs(y - whole_run(repo, "feat", 1, x[i, :have])).max() <= 1e-5, i
    after = server.metrics()
    assert _delta(before, after, "rnnserve_chunks_total", code="INVALID_ARGUMENT") >= 2
    assert _delta(before, after, "rnnserve_chunks_total", code="NOT_FOUND") >= 1


@pytest.mark.parametrize("case", ["shape", "frame", "dtype", "model", "opens", "seqs",
                                  "id", "data"])
def test_a_malformed_request_is_refused_whole_and_the_stream_goes_on(server, repo,
                                                                    case) -> None:
    x = np.random.default_rng(44).standard_normal((2, 6, 20)).astype(np.float32)
    a, b = new_session_id(), new_session_id()

    def broken() -> pb.PackedRequest:
        req = packed_request("feat", [a, b], [1, 1], x[:, 2:4])
        if case == "shape":
            req.chunks.shape[0] = 3  # rows for three sessions, data for two
        elif case == "frame":
            return packed_request("feat", [a, b], [1, 1], x[:, 2:4, :10])
        elif case == "dtype":
            return packed_request("feat", [a, b], [1, 1], x[:, 2:4].astype(np.int32))
        elif case == "model":
            req.model = "nope"
        elif case == "opens":
            req.opens.append(2)
        elif case == "seqs":
            req.seqs.append(2)
        elif case == "id":
            req.session_ids[1] = "x" * 300
        elif case == "data":
            req.chunks.data = req.chunks.data[:-4]
        return req

    async def main() -> np.ndarray:
        async with AsyncClient(server.target, timeout=20) as client, \
                client.packed() as p:
            first = await p.send(packed_request("feat", [a, b], [0, 0], x[:, :2],
                                                opens=[0, 1]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await p.send(broken())
            want = CODE.NOT_FOUND if case == "model" else CODE.INVALID_ARGUMENT
            assert refused.value.code() == want, refused.value.details()
            rest = await p.send(packed_request("feat", [a, b], [1, 1], x[:, 2:],
                                               ends=[0, 1]))
            assert not rest.failures, rest.failures
            return np.concatenate([first.outputs["logits"], rest.outputs["logits"]],
                                  axis=1)

    y = asyncio.run(main())
    for i in range(2):
        assert np.abs(y[i] - whole_run(repo, "feat", 1, x[i])).max() <= 1e-5


def test_a_request_sent_again_gets_its_answers_again(server, repo) -> None:
    """A client whose answer was lost sends the same request again: each session gets
    the answer it had, and its state does not advance."""
    x = np.random.default_rng(45).standard_normal((3, 6, 20)).astype(np.float32)
    sids = [new_session_id() for _ in range(3)]

    async def main() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        async with AsyncClient(server.target, timeout=20) as client, \
                client.packed() as p:
            first = await p.send(packed_request("feat", sids, [0] * 3, x[:, :3],
                                                opens=range(3)))
            again = await p.send(packed_request("feat", sids, [0] * 3, x[:, :3]))
            assert not first.failures and not again.failures, again.failures
            other = x[:, :3].copy()
            other[1] += 1
            changed = await p.send(packed_request("feat", sids, [0] * 3, other))
            assert set(changed.failures) == {1}
            assert "already applied chunk 0 with other data" in changed.failures[1][1]
            rest = await p.send(packed_request("feat", sids, [1] * 3, x[:, 3:],
                                               ends=range(3)))
            assert not rest.failures
            return first.outputs["logits"], again.outputs["logits"], \
                np.concatenate([first.outputs["logits"], rest.outputs["logits"]], axis=1)

    first, again, whole = asyncio.run(main())
    assert np.array_equal(first, again)
    for i in range(3):
        assert np.abs(whole[i] - whole_run(repo, "feat", 1, x[i])).max() <= 1e-5


def test_answers_too_large_for_a_message_are_refused_before_anything_runs(repo,
                                                                         tmp_path) -> None:
    srv = start_server(repo, tmp_path / "s.log", "--max-message-bytes", "65536")
    try:
        x = np.random.default_rng(46).integers(0, 256, (64, 4), dtype=np.uint8)
        sids = [new_session_id() for _ in range(64)]

        async def main() -> None:
            async with AsyncClient(srv.target, timeout=20) as client, \
                    client.packed() as p:
                # 64 sessions x 4 steps x 256 float32 logits: 256 KiB of answers
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await p.send(packed_request("text", sids, [0] * 64, x, opens=range(64)))
                assert refused.value.code() == CODE.INVALID_ARGUMENT
                assert "send fewer sessions per message" in refused.value.details()
                ok = await p.send(packed_request("text", sids[:8], [0] * 8, x[:8],
                                                 opens=range(8), ends=range(8)))
                assert not ok.failures, ok.failures

        asyncio.run(main())
        text = srv.metrics()
        assert metric_value(text, "rnnserve_sessions_started_total") == 8  # none of 64
    finally:
        assert srv.stop() == 0


def test_a_packed_request_past_its_timeout_runs_nothing(repo, tmp_path) -> None:
    """Chunks whose ``timeout_ms`` passes while they wait for their batch are answered
    DEADLINE_EXCEEDED each, and their sessions stay as they were."""
    srv = start_server(repo, tmp_path / "s.log", "--max-batch-delay-ms", "300",
                       "--max-batch-size", "64")
    try:
        x = np.random.default_rng(47).standard_normal((4, 6, 20)).astype(np.float32)
        sids = [new_session_id() for _ in range(4)]

        async def main() -> np.ndarray:
            async with AsyncClient(srv.target, timeout=20) as client, \
                    client.packed() as p:
                first = await p.send(packed_request("feat", sids, [0] * 4, x[:, :2],
                                                    opens=range(4)))
                late = await p.send(packed_request("feat", sids, [1] * 4, x[:, 2:4],
                                                   timeout_ms=50))
                assert {i: f[0] for i, f in late.failures.items()} == {
                    i: CODE.DEADLINE_EXCEEDED for i in range(4)}, late.failures
                rest = await p.send(packed_request("feat", sids, [1] * 4, x[:, 2:],
                                                   ends=range(4)))
                assert not rest.failures
                return np.concatenate([first.outputs["logits"], rest.outputs["logits"]],
                                      axis=1)

        y = asyncio.run(main())
        for i in range(4):
            assert np.abs(y[i] - whole_run(repo, "feat", 1, x[i])).max() <= 1e-5
    finally:
        assert srv.stop() == 0


def test_each_packed_answer_holds_only_its_own_rows(repo) -> None:
    """A session keeps its last answer (for a retry) as long as it lives, idle or not:
    a packed session's answer owns its chunk and output rows, so an idle session holds
    what it is counted for, not the request's chunks and its block's outputs."""
    from rnnserve.server.api import InferenceServicer
    from rnnserve.server.app import RnnServer
    from rnnserve.server.settings import Settings

    async def main() -> None:
        server = RnnServer(Settings(repo=repo, host="127.0.0.1", grpc_port=0,
                                    metrics_port=0, device="cpu", intra_op_threads=1))
        await server.start()
        try:
            servicer = InferenceServicer(server.core, server.streams)
            sids = [new_session_id() for _ in range(8)]
            x = np.random.default_rng(48).standard_normal((8, 3, 20)).astype(np.float32)
            for seq, opens in ((0, range(8)), (1, ())):  # opened, then a packed block
                req = packed_request("feat", sids, [seq] * 8, x, opens=opens)
                resp: pb.PackedResponse = await servicer._packed(req, None)
                assert not resp.code and not resp.failures, resp
            rt = server.core.registry.get("feat")
            for sid in sids:
                session = server.core.store.peek(sid)
                assert session is not None and session.answer is not None
                answer = session.answer
                arrays = [answer._chunk] + [a for _, a in answer.outputs]
                assert all(a.base is None for a in arrays), [a.base is None for a in arrays]
                assert session.nbytes == rt.pool.row_bytes + sum(a.nbytes for a in arrays)
        finally:
            await server.stop()

    asyncio.run(main())


def test_answers_kept_by_idle_sessions_still_answer_retries_on_every_rpc(repo) -> None:
    """The store packs the last answers of idle sessions (``KeptAnswer``: the chunk's
    digest and the outputs' bytes in one object, instead of arrays). A chunk sent again
    after that gets the answer it had, on StreamPacked (a block's answers), StreamMany
    and Step alike; other data under its number is refused; and each session goes on
    exactly. The real server in process (its store packed on demand, not after the
    seconds of a period), over gRPC."""
    from rnnserve.server.app import RnnServer
    from rnnserve.server.sessions import KeptAnswer
    from rnnserve.server.settings import Settings

    x = np.random.default_rng(62).standard_normal((6, 7, 20)).astype(np.float32)
    sids = [new_session_id() for _ in range(6)]

    def keep_all(store) -> None:  # three passes: every answer is a period old
        for _ in range(3):
            while store.compact_answers():
                pass

    async def main() -> np.ndarray:
        server = RnnServer(Settings(repo=repo, host="127.0.0.1", grpc_port=0,
                                    metrics_port=0, device="cpu", intra_op_threads=1))
        await server.start()
        try:
            store = server.core.store
            async with AsyncClient(f"127.0.0.1:{server.grpc_port}", timeout=20) as client, \
                    client.packed() as p, client.many() as m:
                first = await p.send(packed_request("feat", sids, [0] * 6, x[:, :3],
                                                    opens=range(6)))
                assert not first.failures, first.failures
                keep_all(store)
                kept = [store.peek(s).answer for s in sids]
                assert all(isinstance(a, KeptAnswer) for a in kept), kept
                assert kept[0]._layout is kept[5]._layout  # one layout for them all
                again = await p.send(packed_request("feat", sids, [0] * 6, x[:, :3]))
                assert not again.failures, again.failures
                assert np.array_equal(again.outputs["logits"], first.outputs["logits"])
                many = await m.send([many_item(sids[i], 0, x[i, :3]) for i in (1, 2)])
                assert [r.code for r in many] == [0, 0], [r.message for r in many]
                for i, r in zip((1, 2), many, strict=True):
                    assert np.array_equal(outputs(r.result)["logits"],
                                          first.outputs["logits"][i])
                other = await m.send([many_item(sids[3], 0, x[3, :3] + 1)])
                assert item_status(other[0]) == CODE.FAILED_PRECONDITION
                assert "already applied chunk 0 with other data" in other[0].message
                step = await client.stub.Step(pb.StepRequest(
                    session_id=sids[4], chunk=many_item(sids[4], 0, x[4, :3]).chunk))
                assert np.array_equal(outputs(step.result)["logits"],
                                      first.outputs["logits"][4])
                rest = await p.send(packed_request("feat", sids, [1] * 6, x[:, 3:],
                                                   ends=range(6)))
                assert not rest.failures, rest.failures
                return np.concatenate([first.outputs["logits"], rest.outputs["logits"]],
                                      axis=1)
        finally:
            await server.stop()

    whole = asyncio.run(main())
    for i in range(6):
        assert np.abs(whole[i] - whole_run(repo, "feat", 1, x[i])).max() <= 1e-5, i
