"""Property-based fuzzing (hypothesis) of both protocols on a live server: thousands of
generated requests, valid and not (down to bytes that are no message at all), each
must get a clear status (never UNKNOWN or INTERNAL, never a hang, never exception text),
the server stays up, and a control session streaming alongside gets exactly the
outputs it gets alone."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnserve.client import Client
from rnnserve.protos.inference import grpc_service_pb2 as oip
from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from ..server.serving import metric_value, start_server
from ..server.test_grpc_api import whole_run

EXAMPLES = 1500  # per test; most examples send one request, streams send several
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
# What a request may get: anything but UNKNOWN, INTERNAL (a bug or leaked exception),
# UNAVAILABLE (the server went away) or DEADLINE_EXCEEDED (a hang, with our 10 s).
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.UNIMPLEMENTED}
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def live(repo, tmp_path_factory):
    """A server of its own, a channel, and a control session streaming alongside."""
    server = start_server(repo, tmp_path_factory.mktemp("fuzz") / "server.log",
                          "--max-sessions", "2000")
    x = np.random.default_rng(9).standard_normal((600, 20)).astype(np.float32)
    got: list[np.ndarray] = []
    failure: list[BaseException] = []

    def control() -> None:
        try:
            with Client(server.target, timeout=TIMEOUT) as c:
                sid = c.open_session("feat").session_id
                seq = 0
                while 3 * seq < len(x):  # 200 chunks, ~20 s: alongside both fuzz tests
                    got.append(c.step(sid, seq, x[3 * seq:3 * seq + 3])["logits"])
                    seq += 1
                    time.sleep(0.1)
        except BaseException as exc:  # reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=control, daemon=True)
    thread.start()
    channel = grpc.insecure_channel(server.target)
    try:
        yield server, channel, (thread, got, failure, x)
    finally:
        channel.close()
        thread.join(60)
        server.stop()


def expect_clear(exc: grpc.RpcError) -> None:
    code, details = exc.code(), exc.details() or ""
    assert code in ALLOWED, (code, details)
    assert details and "Traceback" not in details and 'File "' not in details, details


def call(fn, req) -> object | None:
    try:
        return fn(req, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        expect_clear(exc)
        return None


# ---- the native API --------------------------------------------------------------

models = st.sampled_from(["feat", "text", "nope", "", "feat/1", "\u00e9\u0000"])
ids = st.one_of(st.sampled_from(["s1", "s2", "s3"]), st.text(max_size=40))
shapes = st.lists(st.one_of(st.integers(-3, 70),  # and extents whose products wrap int64
                            st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1])), max_size=4)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def tensors(draw) -> pb.Tensor:
    if draw(st.booleans()):  # a well-formed feat chunk, sometimes with NaN or Inf
        t = draw(st.integers(1, 6))
        values = draw(st.lists(floats, min_size=t * 20, max_size=t * 20))
        return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[t, 20],
                         data=np.asarray(values, dtype="<f4").tobytes())
    return pb.Tensor(dtype=draw(st.integers(0, 9)), shape=draw(shapes),
                     data=draw(st.binary(max_size=400)))


@st.composite
def chunks(draw) -> pb.Chunk:
    c = pb.Chunk(seq=draw(st.integers(0, 6)), end=draw(st.booleans()))
    kind = draw(st.sampled_from(["tensor", "text", "pcm16", "none"]))
    if kind == "tensor":
        c.tensor.CopyFrom(draw(tensors()))
    elif kind == "text":
        c.text = draw(st.text(max_size=60))
    elif kind == "pcm16":
        c.pcm16 = draw(st.binary(max_size=700))
    return c


opens = st.builds(pb.OpenSessionRequest, model=models, version=st.integers(-2, 4),
                  session_id=ids, resume=st.booleans())
native_calls = st.one_of(
    st.tuples(st.just("OpenSession"), opens),
    st.tuples(st.just("Step"), st.builds(pb.StepRequest, session_id=ids, chunk=chunks())),
    st.tuples(st.just("CloseSession"), st.builds(pb.CloseSessionRequest, session_id=ids)),
    st.tuples(st.just("GetModelMetadata"), st.builds(pb.GetModelMetadataRequest, model=models,
                                                     version=st.integers(-2, 4))),
    st.tuples(st.just("Stream"), st.lists(st.one_of(
        st.builds(pb.StreamRequest, open=opens), st.builds(pb.StreamRequest, chunk=chunks()),
        st.just(pb.StreamRequest())), min_size=1, max_size=6)),
    st.tuples(st.just("raw"), st.binary(max_size=200)),
)


@FUZZ
@given(native_calls)
def test_native_api_answers_every_generated_request_clearly(live, case) -> None:
    server, channel, _ = live
    stub = pb_grpc.InferenceStub(channel)
    method, req = case
    if method == "Stream":
        try:
            for _ in stub.Stream(iter(req), timeout=TIMEOUT):
                pass
        except grpc.RpcError as exc:
            expect_clear(exc)
    elif method == "raw":  # bytes that may not decode as the request at all
        raw = channel.unary_unary("/rnnserve.v1.Inference/Step",
                                  request_serializer=None, response_deserializer=None)
        try:
            raw(req, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            expect_clear(exc)
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "decode" in exc.details():
                assert "does not decode as rnnserve.v1.StepRequest" in exc.details()
    else:
        call(getattr(stub, method), req)


# ---- the Open Inference Protocol --------------------------------------------------

DATATYPES = ["FP32", "FP16", "FP64", "UINT8", "INT8", "INT16", "INT32", "INT64", "BOOL",
             "BYTES", "", "fp32", "NOPE"]


@st.composite
def params(draw) -> dict[str, oip.InferParameter]:
    out = {}
    for key in draw(st.lists(st.sampled_from(
            ["sequence_id", "sequence_start", "sequence_end", "timeout", "binary_data_output",
             "priority", "classification", "junk"]), max_size=4, unique=True)):
        kind = draw(st.sampled_from(["bool", "int", "str", "double", "uint"]))
        p = oip.InferParameter()
        if kind == "bool":
            p.bool_param = draw(st.booleans())
        elif kind == "int":
            p.int64_param = draw(st.integers(-5, 2**40))
        elif kind == "uint":
            p.uint64_param = draw(st.integers(0, 2**64 - 1))
        elif kind == "double":
            p.double_param = draw(st.floats(allow_nan=True))
        else:
            p.string_param = draw(st.text(max_size=12))
        out[key] = p
    return out


@st.composite
def infer_requests(draw) -> oip.ModelInferRequest:
    r = oip.ModelInferRequest(model_name=draw(st.sampled_from(["feat", "text", "nope", ""])),
                              model_version=draw(st.sampled_from(["", "1", "2", "x", "-1"])),
                              id=draw(st.text(max_size=8)))
    for k, v in draw(params()).items():
        r.parameters[k].CopyFrom(v)
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):  # well formed for feat
            b, t = draw(st.integers(1, 3)), draw(st.integers(1, 4))
            x = np.asarray(draw(st.lists(floats, min_size=b * t * 20, max_size=b * t * 20)),
                           dtype="<f4").reshape(b, t, 20)
            inp = r.inputs.add(name="input", datatype="FP32", shape=[b, t, 20])
        else:
            inp = r.inputs.add(name=draw(st.sampled_from(["input", "x", ""])),
                               datatype=draw(st.sampled_from(DATATYPES)),
                               shape=draw(st.lists(st.integers(-2, 9), max_size=4)))
            x = None
        if raw:
            r.raw_input_contents.append(x.tobytes() if x is not None
                                        else draw(st.binary(max_size=300)))
        elif x is not None:
            inp.contents.fp32_contents.extend(x.reshape(-1).tolist())
        else:
            field = draw(st.sampled_from(["fp32_contents", "int_contents", "uint_contents",
                                          "bool_contents", "bytes_contents"]))
            values = {"fp32_contents": st.floats(width=32), "int_contents": st.integers(
                -2**31, 2**31 - 1), "uint_contents": st.integers(0, 2**32 - 1),
                "bool_contents": st.booleans(), "bytes_contents": st.binary(max_size=20)}
            getattr(inp.contents, field).extend(draw(st.lists(values[field], max_size=30)))
    for name in draw(st.lists(st.sampled_from(["logits", "state", "nope", ""]), max_size=3)):
        o = r.outputs.add(name=name)
        if draw(st.booleans()):
            o.parameters["binary_data"].bool_param = draw(st.booleans())
        if draw(st.booleans()):
            o.parameters["classification"].int64_param = draw(st.integers(-1, 30))
    return r


oip_calls = st.one_of(
    st.tuples(st.just("ModelInfer"), infer_requests()),
    st.tuples(st.just("ModelStreamInfer"), st.lists(infer_requests(), min_size=1, max_size=5)),
    st.tuples(st.just("ModelMetadata"), st.builds(
        oip.ModelMetadataRequest, name=st.sampled_from(["feat", "nope", ""]),
        version=st.sampled_from(["", "1", "x"]))),
    st.tuples(st.just("ModelReady"), st.builds(
        oip.ModelReadyRequest, name=st.sampled_from(["feat", "nope", ""]),
        version=st.sampled_from(["", "1", "x", "-3"]))),
)


@FUZZ
@given(oip_calls)
def test_open_inference_protocol_answers_every_generated_request_clearly(live, case) -> None:
    server, channel, _ = live
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    method, req = case
    if method == "ModelStreamInfer":
        try:
            answers = list(stub.ModelStreamInfer(iter(req), timeout=TIMEOUT))
        except grpc.RpcError as exc:
            expect_clear(exc)
            return
        assert len(answers) == len(req)  # one answer or in-band error per request
        for a in answers:
            assert "Traceback" not in a.error_message
    else:
        call(getattr(stub, method), req)


def test_the_server_stayed_up_and_the_control_session_is_exact(live, repo) -> None:
    """Runs after both fuzz tests (file order)."""
    server, channel, (thread, got, failure, x) = live
    thread.join(60)
    assert not failure, failure
    assert len(got) == len(x) // 3
    n = 3 * len(got)
    want = whole_run(repo, "feat", 1, x[:n])
    assert float(np.abs(np.concatenate(got) - want).max()) <= 1e-5
    assert server.proc.poll() is None
    text = server.metrics()
    assert metric_value(text, "rnnserve_chunks_total", code="INTERNAL") == 0
    assert metric_value(text, "rnnserve_chunks_total", code="UNKNOWN") == 0
    assert metric_value(text, "rnnserve_requests_total", api="native") >= EXAMPLES
    assert metric_value(text, "rnnserve_requests_total", api="kserve_v2") >= EXAMPLES
    for code in ("INTERNAL", "UNKNOWN"):
        assert metric_value(text, "rnnserve_requests_total", code=code) == 0
