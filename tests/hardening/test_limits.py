"""Configured limits on real servers: message size, NaN/Inf policy, sessions per
principal. Each refusal has a clear status and leaves every session as it was."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from rnnserve.client import Client

from ..server.serving import start_server
from ..server.test_grpc_api import whole_run

X = np.random.default_rng(8).standard_normal((12, 20)).astype(np.float32)


def refused(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value


def test_a_message_over_the_configured_limit_is_refused_before_it_is_read(repo,
                                                                          tmp_path) -> None:
    srv = start_server(repo, tmp_path / "s.log", "--max-message-bytes", "65536")
    try:
        with Client(srv.target, timeout=10) as c:
            sid = c.open_session("feat").session_id
            first = c.step(sid, 0, X[:4])["logits"]
            big = np.zeros((1000, 20), np.float32)  # 80 KB of tensor
            exc = refused(c.step, sid, 1, big)
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert "larger than max" in exc.details()
            rest = c.step(sid, 1, X[4:], end=True)["logits"]  # untouched: seq 1 still
    finally:
        assert srv.stop() == 0
    got = np.concatenate([first, rest])
    assert float(np.abs(got - whole_run(repo, "feat", 1, X)).max()) <= 1e-5


def test_a_chunk_whose_answer_cannot_be_sent_is_refused_before_it_runs(repo,
                                                                       tmp_path) -> None:
    """The text model answers 1 KiB per byte (256 float32 logits): 100 bytes in a 64 KiB
    server would be answered with 100 KiB that gRPC cannot send, after the step had
    advanced the session (a retry then repeats the chunk)."""
    srv = start_server(repo, tmp_path / "s.log", "--max-message-bytes", "65536")
    text = b"The quick brown fox jumps over the lazy dog. " * 3
    try:
        with Client(srv.target, timeout=10) as c:
            sid = c.open_session("text", version=1).session_id
            exc = refused(c.step, sid, 0, text[:100])
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
            assert "--max-message-bytes" in exc.details(), exc.details()
            assert "at most 60 steps" in exc.details(), exc.details()  # (64 Ki - 4 Ki) / 1 Ki
            first = c.step(sid, 0, text[:60])["logits"]  # the session had not moved
            rest = c.step(sid, 1, text[60:100], end=True)["logits"]
    finally:
        assert srv.stop() == 0
    got = np.concatenate([first, rest])
    want = whole_run(repo, "text", 1, np.frombuffer(text[:100], np.uint8))
    assert float(np.abs(got - want).max()) <= 1e-5


@pytest.mark.parametrize("shape", [[2**62, 4], [4, 2**62], [2**40, 0, 20], [0, 2**62, 20],
                                   [1] * 70, [2**31, 2**31, 0]])
def test_shapes_no_array_takes_are_invalid_argument(repo, server, shape) -> None:
    """Element counts that wrap in int64 (to 0, passing the byte check) or zero-size
    shapes of absurd extent: refused as bad input, not an internal error; the session
    and a StreamMany request's other items are untouched."""
    from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    bad = pb.Chunk(seq=0, tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=shape))
    with Client(server.target, timeout=10) as c, grpc.insecure_channel(server.target) as ch:
        sid = c.open_session("feat").session_id
        other = c.open_session("feat").session_id
        stub = pb_grpc.InferenceStub(ch)
        exc = refused(stub.Step, pb.StepRequest(session_id=sid, chunk=bad), timeout=10)
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        assert "shape" in exc.details(), exc.details()
        good = pb.Chunk(seq=0, tensor=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[12, 20],
                                                data=X.astype("<f4").tobytes()))
        many = pb.ManyRequest(id=1, items=[pb.ManyItem(session_id=sid, chunk=bad),
                                           pb.ManyItem(session_id=other, chunk=good)])
        (resp,) = list(stub.StreamMany(iter([many]), timeout=10))
        failed, answered = resp.results
        assert failed.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], failed
        assert answered.HasField("result")
        y = c.step(sid, 0, X, end=True)["logits"]  # the refused chunk moved nothing
    assert float(np.abs(y - whole_run(repo, "feat", 1, X)).max()) <= 1e-5


@pytest.mark.parametrize("policy", ["reject", "allow"])
def test_nonfinite_chunks_follow_the_configured_policy(repo, tmp_path, policy) -> None:
    srv = start_server(repo, tmp_path / "s.log", "--nonfinite", policy)
    bad = X[:3].copy()
    bad[1, 4] = np.nan
    bad[2, 0] = np.inf
    try:
        with Client(srv.target, timeout=10) as c:
            sid = c.open_session("feat").session_id
            other = c.open_session("feat").session_id
            if policy == "reject":
                exc = refused(c.step, sid, 0, bad)
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "NaN or Inf" in exc.details() and "--nonfinite" in exc.details()
                got = c.step(sid, 0, X, end=True)["logits"]  # the session did not move
                assert float(np.abs(got - whole_run(repo, "feat", 1, X)).max()) <= 1e-5
            else:
                y = c.step(sid, 0, bad)["logits"]  # the model got them, as configured:
                np.testing.assert_allclose(y, whole_run(repo, "feat", 1, bad), atol=1e-5,
                                           equal_nan=True)  # what onnxruntime makes of them
            # another session is never touched by one that took NaN
            y2 = c.step(other, 0, X, end=True)["logits"]
    finally:
        assert srv.stop() == 0
    assert float(np.abs(y2 - whole_run(repo, "feat", 1, X)).max()) <= 1e-5


def test_a_principal_holds_at_most_its_share_of_sessions(repo, tmp_path) -> None:
    alice, bob = "a" * 24, "b" * 24
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{alice} alice\n{bob} bob\n")
    srv = start_server(repo, tmp_path / "s.log", "--tokens-file", str(tokens),
                       "--max-sessions-per-principal", "2")
    try:
        with Client(srv.target, timeout=10, token=alice) as a, \
                Client(srv.target, timeout=10, token=bob) as b:
            first = a.open_session("feat").session_id
            a.open_session("feat")
            exc = refused(a.open_session, "feat")
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "principal 'alice'" in exc.details() and "(2)" in exc.details()
            assert dict(exc.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
            b.open_session("feat")  # bob has his own share
            b.open_session("feat")
            a.step(first, 0, X[:2])  # alice's admitted sessions go on
            a.close_session(first)
            a.open_session("feat")  # a freed slot is hers again
    finally:
        assert srv.stop() == 0


def test_reflection_can_be_turned_off(repo, tmp_path, server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2 as rpb
    from grpc_reflection.v1alpha import reflection_pb2_grpc as rpb_grpc

    def services(target: str) -> list[str]:
        with grpc.insecure_channel(target) as channel:
            stub = rpb_grpc.ServerReflectionStub(channel)
            answers = stub.ServerReflectionInfo(
                iter([rpb.ServerReflectionRequest(list_services="")]), timeout=10)
            return [s.name for a in answers for s in a.list_services_response.service]

    assert "rnnserve.v1.Inference" in services(server.target)  # on by default
    srv = start_server(repo, tmp_path / "s.log", "--no-reflection")
    try:
        exc = refused(services, srv.target)
        assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
        with Client(srv.target, timeout=10) as c:  # the API itself is there
            assert [m.name for m in c.list_models()] == ["feat", "text", "text"]
    finally:
        assert srv.stop() == 0


def test_session_ids_are_bounded_on_every_api(server) -> None:
    """Every id a client opens and closes is remembered a while (to say why it is gone)
    and errors name ids: unbounded ids grew the server by their size each time (1 MiB
    ids: +316 MiB after 300), and an error naming a 3 MiB id overflowed gRPC's limit on
    error details (RESOURCE_EXHAUSTED instead of a clear refusal)."""
    from rnnserve.protos.inference import grpc_service_pb2 as oip
    from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc
    from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    long_id, huge_id = "a" * 257, "b" * (3 << 20)
    with Client(server.target, timeout=10, options=[
            ("grpc.max_send_message_length", 8 << 20)]) as c, \
            grpc.insecure_channel(server.target, options=[
                ("grpc.max_send_message_length", 8 << 20)]) as ch:
        ok = c.open_session("feat", session_id="c" * 256).session_id  # the longest id
        c.step(ok, 0, X[:2])
        for call in (lambda: c.open_session("feat", session_id=long_id),
                     lambda: c.close_session(long_id),
                     lambda: c.step(long_id, 0, X[:2])):
            exc = refused(call)
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
            assert "at most 256 characters" in exc.details()
        stub = pb_grpc.InferenceStub(ch)
        exc = refused(stub.Step, pb.StepRequest(session_id=huge_id, chunk=pb.Chunk(seq=0)),
                      timeout=10)
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        many = pb.ManyRequest(id=1, items=[
            pb.ManyItem(session_id=long_id, open=pb.OpenSessionRequest(model="feat")),
            pb.ManyItem(session_id=ok, chunk=pb.Chunk(seq=1, tensor=pb.Tensor(
                dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 20], data=X[2:4].tobytes())))])
        (resp,) = list(stub.StreamMany(iter([many]), timeout=10))
        assert resp.results[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert resp.results[1].HasField("result")  # the other item goes on
        req = oip.ModelInferRequest(model_name="feat")
        req.parameters["sequence_id"].string_param = "s" * 300
        req.parameters["sequence_start"].bool_param = True
        inp = req.inputs.add(name="input", datatype="FP32", shape=[1, 2, 20])
        inp.contents.fp32_contents.extend(X[:2].ravel().tolist())
        exc = refused(oip_grpc.GRPCInferenceServiceStub(ch).ModelInfer, req, timeout=10)
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        assert "at most 256 characters" in exc.details()
