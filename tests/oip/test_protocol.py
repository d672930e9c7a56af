"""The Open Inference Protocol endpoint through its generated stubs, against a real
server on loopback: encodings, sequences, errors, streams, metrics, drain."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.client import AsyncClient
from rnnserve.protos.headers import SESSION_HEADER
from rnnserve.protos.inference import grpc_service_pb2 as pb
from rnnserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from rnnserve.protos.oip import encode_bytes_elements

from ..server.serving import metric_value, start_server

RNG = np.random.default_rng(11)


def reference(repo: Path, name: str, x: np.ndarray, version: int = 1) -> np.ndarray:
    """onnxruntime alone: (batch, time, ...) from a zero state."""
    sess = ort.InferenceSession(str(repo / name / str(version) / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    feeds = {"input": x}
    for i in sess.get_inputs()[1:]:
        feeds[i.name] = np.zeros((x.shape[0], *i.shape[1:]), dtype=np.float32)
    return sess.run(["logits"], feeds)[0]


def request(x: np.ndarray, model: str = "feat", *, typed: bool = False, rid: str = "",
            datatype: str = "FP32", version: str = "", **params: object
            ) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, model_version=version, id=rid)
    t = r.inputs.add(name="input", datatype=datatype, shape=x.shape)
    if typed:
        field = {"FP32": "fp32_contents", "UINT8": "uint_contents"}[datatype]
        getattr(t.contents, field).extend(x.reshape(-1).tolist())
    else:
        r.raw_input_contents.append(x.tobytes())
    for k, v in params.items():
        p = r.parameters[k]
        if isinstance(v, bool):
            p.bool_param = v
        elif isinstance(v, int):
            p.int64_param = v
        elif isinstance(v, float):
            p.double_param = v
        else:
            p.string_param = str(v)
    return r


def logits(resp: pb.ModelInferResponse) -> np.ndarray:
    (out,) = resp.outputs
    assert out.name == "logits" and out.datatype == "FP32"
    if resp.raw_output_contents:
        return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(out.shape)
    return np.array(out.contents.fp32_contents, dtype=np.float32).reshape(out.shape)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def refused(call, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for f in fragments:
        assert f in info.value.details(), info.value.details()


def test_raw_and_typed_contents_in_and_out(stub, repo) -> None:
    x = RNG.standard_normal((1, 6, 20)).astype(np.float32)
    want = reference(repo, "feat", x)
    raw = stub.ModelInfer(request(x, rid="raw-1"))
    assert raw.id == "raw-1" and raw.model_name == "feat" and raw.model_version == "1"
    assert len(raw.raw_output_contents) == 1 and not raw.outputs[0].HasField("contents")
    assert list(raw.outputs[0].shape) == [1, 6, 7]
    np.testing.assert_allclose(logits(raw), want, atol=1e-5, rtol=0)
    typed = stub.ModelInfer(request(x, typed=True))  # typed in: typed out
    assert not typed.raw_output_contents and len(typed.outputs[0].contents.fp32_contents) == 42
    np.testing.assert_allclose(logits(typed), want, atol=1e-5, rtol=0)
    r = request(x, binary_data_output=False)  # raw in, typed asked for the whole request
    assert not stub.ModelInfer(r).raw_output_contents
    r = request(x, typed=True)  # typed in, raw asked for per output
    r.outputs.add(name="logits").parameters["binary_data"].bool_param = True
    np.testing.assert_allclose(logits(stub.ModelInfer(r)), want, atol=1e-5, rtol=0)
    assert stub.ModelInfer(r).raw_output_contents
    # the text model: UINT8 typed, UINT8 raw, BYTES raw and BYTES typed agree
    data = b"rnnserve"
    u8 = np.frombuffer(data, dtype=np.uint8)[None]
    want = reference(repo, "text", u8, version=2)
    for r in (request(u8, "text", datatype="UINT8"),
              request(u8, "text", datatype="UINT8", typed=True)):
        np.testing.assert_allclose(logits(stub.ModelInfer(r)), want, atol=1e-5, rtol=0)
    r = pb.ModelInferRequest(model_name="text")
    r.inputs.add(name="input", datatype="BYTES", shape=[1, 1])
    r.raw_input_contents.append(encode_bytes_elements([data]))
    np.testing.assert_allclose(logits(stub.ModelInfer(r)), want, atol=1e-5, rtol=0)
    r = pb.ModelInferRequest(model_name="text")
    r.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(data)
    np.testing.assert_allclose(logits(stub.ModelInfer(r)), want, atol=1e-5, rtol=0)


def test_stateless_batch_runs_each_row_from_zero_and_keeps_nothing(stub, server, repo) -> None:
    x = RNG.standard_normal((3, 5, 20)).astype(np.float32)
    sessions = metric_value(server.metrics(), "rnnserve_active_sessions", model="feat")
    out = logits(stub.ModelInfer(request(x)))
    assert out.shape == (3, 5, 7)
    for i in range(3):
        np.testing.assert_allclose(out[i:i + 1], reference(repo, "feat", x[i:i + 1]),
                                   atol=1e-5, rtol=0)
    assert metric_value(server.metrics(), "rnnserve_active_sessions", model="feat") == sessions


def test_sequence_chunks_equal_the_whole_and_restart_on_start(stub, repo) -> None:
    x = RNG.standard_normal((1, 9, 20)).astype(np.float32)
    want = reference(repo, "feat", x)
    cuts = [0, 2, 3, 7, 9]
    parts = [logits(stub.ModelInfer(request(x[:, a:b], sequence_id="s-1",
                                            sequence_start=a == 0, sequence_end=b == 9)))
             for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), want, atol=1e-5, rtol=0)
    # START on a live sequence drops its state, as Triton does
    stub.ModelInfer(request(x[:, :4], sequence_id=5, sequence_start=True))
    again = stub.ModelInfer(request(x, sequence_id=5, sequence_start=True))
    np.testing.assert_allclose(logits(again), want, atol=1e-5, rtol=0)
    # the same id on another model is another sequence (ids are scoped per model)
    u8 = np.frombuffer(b"abc", dtype=np.uint8)[None]
    stub.ModelInfer(request(u8, "text", datatype="UINT8", sequence_id=5, sequence_start=True))
    rest = stub.ModelInfer(request(x[:, :1], sequence_id=5, sequence_end=True))
    assert logits(rest).shape == (1, 1, 7)
    # a sequence stays on the version it started on
    refused(lambda: stub.ModelInfer(request(u8, "text", datatype="UINT8", version="1",
                                            sequence_id=5)),
            grpc.StatusCode.INVALID_ARGUMENT, "sequence 5 runs on version 2 of model 'text'")


def test_an_integer_id_and_a_string_of_its_digits_are_two_sequences(stub, repo) -> None:
    # sequence 42, the string "42" and the string "~42" (the escape's own form) each
    # keep their own state, interleaved (they used to share one session, "feat/42")
    xs = {sid: RNG.standard_normal((1, 6, 20)).astype(np.float32)
          for sid in (42, "42", "~42")}
    got: dict[object, list[np.ndarray]] = {sid: [] for sid in xs}
    for a, b in [(0, 2), (2, 3), (3, 6)]:
        for sid, x in xs.items():
            got[sid].append(logits(stub.ModelInfer(request(
                x[:, a:b], sequence_id=sid, sequence_start=a == 0, sequence_end=b == 6))))
    for sid, x in xs.items():
        np.testing.assert_allclose(np.concatenate(got[sid], axis=1),
                                   reference(repo, "feat", x), atol=1e-5, rtol=0)


def test_rejected_requests_leave_the_sequence_untouched(stub, repo) -> None:
    x = RNG.standard_normal((1, 6, 20)).astype(np.float32)
    want = reference(repo, "feat", x)
    seq = dict(sequence_id=77)
    first = logits(stub.ModelInfer(request(x[:, :2], sequence_start=True, **seq)))
    nan = x[:, 2:4].copy()
    nan[0, 0, 0] = np.nan
    bad_shape = RNG.standard_normal((1, 2, 19)).astype(np.float32)
    two_rows = np.concatenate([x[:, 2:4], x[:, 2:4]])
    for r, code, fragment in [
        (request(nan, **seq), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (request(bad_shape, **seq), grpc.StatusCode.INVALID_ARGUMENT, "[batch, time, 20]"),
        (request(x[:, 2:4].astype(np.float64), datatype="FP64", **seq),
         grpc.StatusCode.INVALID_ARGUMENT, "of FP32"),
        (request(two_rows, **seq), grpc.StatusCode.INVALID_ARGUMENT, "batch size 1"),
        (request(x[:, 2:4], version="2", **seq), grpc.StatusCode.NOT_FOUND, "no version 2"),
        # a bad start neither opens a sequence nor drops the live one
        (request(nan, sequence_start=True, **seq), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ]:
        refused(lambda r=r: stub.ModelInfer(r), code, fragment)
    rest = logits(stub.ModelInfer(request(x[:, 2:], sequence_end=True, **seq)))
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), want, atol=1e-5, rtol=0)


def test_bad_requests_get_clear_statuses(stub, server) -> None:
    x = RNG.standard_normal((1, 2, 20)).astype(np.float32)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    refused(lambda: stub.ModelInfer(request(x, "nope")), grpc.StatusCode.NOT_FOUND,
            "model 'nope' not found", "feat")
    refused(lambda: stub.ModelInfer(request(x, version="x")), bad, "not a positive integer")
    refused(lambda: stub.ModelInfer(request(x, sequence_id=404)), bad,
            "inference request for sequence 404 to model 'feat' must specify the START flag")
    refused(lambda: stub.ModelInfer(request(x, sequence_id=True)), bad,
            "sequence_id must be an integer or a string")
    refused(lambda: stub.ModelInfer(request(x, sequence_start=True)), bad,
            "need a non-zero sequence_id")
    refused(lambda: stub.ModelInfer(request(x, sequence_id=1, sequence_start=1)), bad,
            "sequence_start must be a bool")
    r = request(x)
    r.raw_input_contents[0] = r.raw_input_contents[0][:-4]
    refused(lambda: stub.ModelInfer(r), bad, "needs 160 raw bytes, got 156")
    r = request(x)
    r.raw_input_contents.append(b"")
    refused(lambda: stub.ModelInfer(r), bad, "raw_input_contents has 2 entries for 1 inputs")
    r = request(x, typed=True)
    r.raw_input_contents.append(x.tobytes())
    refused(lambda: stub.ModelInfer(r), bad, "both typed contents and raw_input_contents")
    r = request(x, typed=True)
    r.inputs[0].contents.fp32_contents.append(1.0)
    refused(lambda: stub.ModelInfer(r), bad, "needs 40 values in contents.fp32_contents, got 41")
    r = request(np.array([[1, 300]]), "text", datatype="UINT8", typed=True)
    refused(lambda: stub.ModelInfer(r), bad, "out of the UINT8 range")
    r = request(x)
    r.inputs[0].name = "state_h"
    refused(lambda: stub.ModelInfer(r), bad, "takes one input 'input'")
    r = request(x)
    r.outputs.add(name="state_h_out")
    refused(lambda: stub.ModelInfer(r), bad, "has no output 'state_h_out'", "['logits']")
    r = request(x)
    r.inputs[0].datatype = "BF16"
    refused(lambda: stub.ModelInfer(r), bad, "datatype 'BF16' is not supported")
    r = request(x)
    r.outputs.add(name="logits").parameters["classification"].int64_param = 0
    refused(lambda: stub.ModelInfer(r), bad, "classification must be a positive integer")
    meta = (("x-rnnserve-session", "other"),)
    refused(lambda: stub.ModelInfer(request(x, sequence_id="mine", sequence_start=True),
                                    metadata=meta), bad, f"the {SESSION_HEADER} header",
            "names sequence 'other' but the request names 'mine'")
    refused(lambda: stub.ModelInfer(request(x, sequence_id=42, sequence_start=True),
                                    metadata=meta), bad, "the request names 42;")
    refused(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")),
            grpc.StatusCode.NOT_FOUND, "model 'nope' not found")
    assert not stub.ModelReady(pb.ModelReadyRequest(name="text", version="9")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="text", version="1")).ready
    text = server.metrics()
    assert metric_value(text, "rnnserve_requests_total", api="kserve_v2", method="ModelInfer",
                        code="INVALID_ARGUMENT") >= 10
    assert metric_value(text, "rnnserve_chunks_total", api="kserve_v2", model="feat",
                        code="INVALID_ARGUMENT") >= 3


def test_metadata_hides_the_state(stub) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="text"))
    assert meta.versions == ["1", "2"] and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == \
        [("input", "UINT8", [-1, -1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == \
        [("logits", "FP32", [-1, -1, 256])]
    server_meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert server_meta.name == "rnnserve" and "sequence" in server_meta.extensions
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready


def test_stream_answers_errors_in_band_and_keeps_each_sequence_in_order(server, repo) -> None:
    """Many chunks of three sequences written without waiting: each sequence's chunks run
    in arrival order, the sequences batch together, a bad request is answered in
    error_message with its id and the stream goes on."""
    xs = {sid: RNG.standard_normal((1, 24, 20)).astype(np.float32) for sid in ("a", "b", "c")}

    def requests():
        for t in range(24):
            for sid, x in xs.items():
                yield request(x[:, t:t + 1], rid=f"{sid}-{t}", sequence_id=f"order-{sid}",
                              sequence_start=t == 0, sequence_end=t == 23)
            if t == 5:
                yield request(xs["a"][:, :1], rid="bad", sequence_id="never-started")

    with grpc.insecure_channel(server.target) as channel:
        got = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests()))
    errors = [r for r in got if r.error_message]
    assert [(r.infer_response.id, r.infer_response.model_name) for r in errors] == \
        [("bad", "feat")]
    assert "must specify the START flag" in errors[0].error_message
    by_id = {r.infer_response.id: logits(r.infer_response) for r in got if not r.error_message}
    assert len(by_id) == 72
    for sid, x in xs.items():
        y = np.concatenate([by_id[f"{sid}-{t}"] for t in range(24)], axis=1)
        np.testing.assert_allclose(y, reference(repo, "feat", x), atol=1e-5, rtol=0)


def test_native_and_oip_streams_batch_together(repo, tmp_path) -> None:
    """Two native streams and two Open Inference Protocol streams step at once: every
    step of the four runs in one batch of 4, and each gets exactly its own result."""
    srv = start_server(repo, tmp_path / "server.log", "--max-batch-delay-ms", "1000",
                       "--max-batch-size", "4")
    rounds = 6
    xs = [RNG.standard_normal((rounds * 2, 20)).astype(np.float32) for _ in range(4)]
    try:
        before = srv.metrics()

        async def native(client: AsyncClient, x: np.ndarray, go: list[asyncio.Event]):
            ys = []
            async with client.stream("feat") as s:
                for k in range(rounds):
                    await go[k].wait()
                    ys.append((await s.send(x[2 * k:2 * k + 2]))["logits"])
            return np.concatenate(ys)

        async def oip(stub, x: np.ndarray, sid: str, go: list[asyncio.Event]):
            ys = []
            call = stub.ModelStreamInfer()  # Triton's stream, one request per round
            for k in range(rounds):
                await go[k].wait()
                await call.write(request(x[None, 2 * k:2 * k + 2], sequence_id=sid,
                                         sequence_start=k == 0, sequence_end=k == rounds - 1))
                resp = await call.read()
                assert not resp.error_message, resp.error_message
                ys.append(logits(resp.infer_response)[0])
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            return np.concatenate(ys)

        async def main():
            go = [asyncio.Event() for _ in range(rounds)]
            async with AsyncClient(srv.target) as client, \
                    grpc.aio.insecure_channel(srv.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                jobs = [asyncio.create_task(native(client, xs[0], go)),
                        asyncio.create_task(native(client, xs[1], go)),
                        asyncio.create_task(oip(stub, xs[2], "mixed-2", go)),
                        asyncio.create_task(oip(stub, xs[3], "mixed-3", go))]
                for k in range(rounds):
                    await asyncio.sleep(0.2)  # every stream is open and waiting
                    go[k].set()
                    while metric_value(srv.metrics(), "rnnserve_batch_size_count") - \
                            metric_value(before, "rnnserve_batch_size_count") < k + 1:
                        await asyncio.sleep(0.01)
                return await asyncio.gather(*jobs)

        results = asyncio.run(main())
        after = srv.metrics()
    finally:
        assert srv.stop() == 0
    for x, y in zip(xs, results, strict=True):
        np.testing.assert_allclose(y, reference(repo, "feat", x[None])[0], atol=1e-5, rtol=0)

    def grew(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert grew("rnnserve_batch_size_count") == rounds
    assert grew("rnnserve_batch_size_sum") == 4 * rounds  # every batch held all four
    assert grew("rnnserve_chunks_total", api="native", code="OK") == 2 * rounds
    assert grew("rnnserve_chunks_total", api="kserve_v2", code="OK") == 2 * rounds


def test_drain_ends_an_open_model_stream_infer_with_unavailable(repo, tmp_path) -> None:
    srv = start_server(repo, tmp_path / "server.log")
    x = RNG.standard_normal((1, 1, 20)).astype(np.float32)
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            sent = []

            def requests():
                sent.append(1)
                yield request(x, rid="1", sequence_id="drain", sequence_start=True)
                while len(sent) < 2:
                    time.sleep(0.01)

            stream = stub.ModelStreamInfer(requests())
            first = next(stream)
            assert first.infer_response.id == "1" and not first.error_message
            assert srv.proc.poll() is None
            srv.proc.send_signal(15)
            with pytest.raises(grpc.RpcError) as info:
                next(stream)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert "shutting down" in info.value.details()
            sent.append(1)
    finally:
        assert srv.stop() == 0, (tmp_path / "server.log").read_text()[-3000:]
