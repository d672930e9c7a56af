"""The Open Inference Protocol endpoint against requests a review found mishandled:
zero-size and oversized batches, refused starts, sequences that move between replicas
of a shared store, versions. Real servers on loopback, real onnxruntime (and Redis)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from rnnserve.client import OWN_CONNECTION
from rnnserve.client.bench import RedisProcess
from rnnserve.protos.inference import grpc_service_pb2 as pb
from rnnserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from rnnserve.protos.oip import decode_bytes_elements, encode_bytes_elements

from ..server.serving import metric_value, start_server
from .test_protocol import logits, reference, refused, request

RNG = np.random.default_rng(23)
BAD = grpc.StatusCode.INVALID_ARGUMENT
START_FLAG = "must specify the START flag"


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def tight(repo, tmp_path_factory):
    """A server with a queue of 8 steps per model and 64 KiB messages."""
    log = tmp_path_factory.mktemp("tight") / "server.log"
    srv = start_server(repo, log, "--max-batch-delay-ms", "5", "--max-queue", "8",
                       "--max-message-bytes", "65536")
    with grpc.insecure_channel(srv.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    assert srv.stop() == 0, log.read_text()[-3000:]


def empty(shape: list[int], model: str = "feat", datatype: str = "FP32",
          **params: object) -> pb.ModelInferRequest:
    """A request whose input has ``shape`` and no data at all."""
    r = request(np.zeros(0, np.float32), model, datatype=datatype, **params)
    del r.inputs[0].shape[:]
    r.inputs[0].shape.extend(shape)
    return r


def strings(items: list[bytes], shape: list[int] | None = None) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="text")
    r.inputs.add(name="input", datatype="BYTES", shape=[len(items)] if shape is None else shape)
    r.raw_input_contents.append(encode_bytes_elements(items))
    return r


def test_zero_size_inputs_are_refused_before_their_rows_are_split(tight) -> None:
    """[N, 0, 20] carries no data whatever N is: refused at once for its rows or its
    empty time axis, never split into N chunks; shapes numpy cannot take are refused
    as malformed, not an internal error."""
    refused(lambda: tight.ModelInfer(empty([2_000_000, 0, 20])), BAD,
            "a request of 2000000 rows can never run", "--max-queue", "at most 8 rows")
    refused(lambda: tight.ModelInfer(empty([3, 0, 20])), BAD, "time dimension is 0")
    refused(lambda: tight.ModelInfer(empty([1, 0, 20], sequence_id="z",
                                           sequence_start=True)), BAD, "time dimension is 0")
    refused(lambda: tight.ModelInfer(empty([5, 0, 20], sequence_id="z",
                                           sequence_start=True)), BAD, "batch size 1")
    for shape in ([0, 2**62, 20], [1, 2**62, 0], [2**40, 2**40, 0]):
        refused(lambda shape=shape: tight.ModelInfer(empty(shape)), BAD, "too many elements")
    refused(lambda: tight.ModelInfer(empty([0] * 65)), BAD, "65 dimensions")
    # BYTES: an empty batch, empty strings, too many strings
    for shape in ([0], [0, 1]):
        refused(lambda shape=shape: tight.ModelInfer(strings([], shape)), BAD,
                "batch dimension is 0")
    refused(lambda: tight.ModelInfer(strings([b"", b""])), BAD, "BYTES string of the "
            "input is empty")
    refused(lambda: tight.ModelInfer(strings([b"a"] * 9)), BAD, "a request of 9 rows",
            "--max-queue")


def test_a_stateless_request_fits_the_queue_and_one_answer(tight, repo) -> None:
    """Rows beyond the model's queue could never all run; rows whose outputs together
    would not fit one message could never be answered: both are refused before any row
    runs, saying how many would do."""
    x = RNG.standard_normal((9, 2, 20)).astype(np.float32)
    refused(lambda: tight.ModelInfer(request(x)), BAD, "a request of 9 rows can never run",
            "at most 8 rows")
    np.testing.assert_allclose(logits(tight.ModelInfer(request(x[:8]))),
                               reference(repo, "feat", x[:8]), atol=1e-5, rtol=0)
    # text: 256 FP32 logits a byte, 16 KiB a row of 16 bytes; 60 KiB fit the answer
    u8 = RNG.integers(0, 256, (8, 16), dtype=np.uint8)
    refused(lambda: tight.ModelInfer(request(u8, "text", datatype="UINT8")), BAD,
            "8 rows of 16 steps would be answered with up to 131072 bytes",
            "--max-message-bytes", "at most 3 such rows")
    refused(lambda: tight.ModelInfer(strings([bytes(row) for row in u8])), BAD,
            "at most 3 such rows")
    got = logits(tight.ModelInfer(request(u8[:3], "text", datatype="UINT8")))
    np.testing.assert_allclose(got, reference(repo, "text", u8[:3], version=2), atol=1e-5,
                               rtol=0)


def classified(x: np.ndarray, classes: int, **params: object) -> pb.ModelInferRequest:
    """A text request asking for the top ``classes`` of its logits (classification)."""
    r = request(x, "text", datatype="UINT8", **params)
    r.outputs.add(name="logits").parameters["classification"].int64_param = classes
    return r


def test_classified_answers_are_bounded_before_anything_runs(tight, repo) -> None:
    """Triton's classification strings are larger than the logits they rank (256 of
    them a byte here): a chunk whose strings could not be sent in one message is
    refused before it runs, so its sequence does not move on and a live one goes on
    from where it was (these 20 bytes' strings take some 80 KiB, where the logits take
    20 KiB of the 64 KiB allowed)."""
    u8 = RNG.integers(0, 256, (1, 24), dtype=np.uint8)
    want = reference(repo, "text", u8, version=2)[0]
    first = tight.ModelInfer(classified(u8[:, :4], 256, sequence_id="cls",
                                        sequence_start=True))
    (out,) = first.outputs
    assert out.datatype == "BYTES" and list(out.shape) == [1, 4, 256]
    entries = decode_bytes_elements(first.raw_output_contents[0], "logits")
    for t in range(4):
        ranked = [int(e.split(b":")[1]) for e in entries[256 * t:256 * (t + 1)]]
        assert ranked == list(np.argsort(-want[t], kind="stable"))
    refused(lambda: tight.ModelInfer(classified(u8[:, 4:24], 256, sequence_id="cls")), BAD,
            "a chunk of 20 steps would be answered with up to", "--max-message-bytes",
            "at most 4 steps", "fewer outputs or classes")
    refused(lambda: tight.ModelInfer(classified(np.repeat(u8[:, :4], 2, axis=0), 256)), BAD,
            "2 rows of 4 steps", "at most 1 such rows")
    refused(lambda: tight.ModelInfer(classified(u8[:, 4:24], 256, sequence_id="new",
                                                sequence_start=True)), BAD, "at most 4 steps")
    refused(lambda: tight.ModelInfer(request(u8[:, 4:6], "text", datatype="UINT8",
                                             sequence_id="new")), BAD, START_FLAG)
    top = tight.ModelInfer(classified(u8[:, 4:24], 1, sequence_id="cls"))
    ranked = [int(e.split(b":")[1])
              for e in decode_bytes_elements(top.raw_output_contents[0], "logits")]
    assert ranked == list(want[4:24].argmax(axis=-1))  # went on from the 4th byte


def test_an_unsigned_id_sent_as_int64_is_one_sequence(stub, repo) -> None:
    """Triton's clients keep a sequence id as a uint64 and send it as int64_param, so an
    id of 2**63 or more arrives negative: it is the same sequence as the id sent as
    uint64_param, as Triton reads it."""
    x = RNG.standard_normal((1, 4, 20)).astype(np.float32)
    big = 2**63 + 5
    first = stub.ModelInfer(request(x[:, :2], sequence_id=big - 2**64, sequence_start=True))
    r = request(x[:, 2:], sequence_end=True)
    r.parameters["sequence_id"].uint64_param = big
    got = np.concatenate([logits(first), logits(stub.ModelInfer(r))], axis=1)
    np.testing.assert_allclose(got, reference(repo, "feat", x), atol=1e-5, rtol=0)


def test_a_start_whose_step_fails_leaves_no_sequence(stub, repo) -> None:
    """A start refused after its sequence was opened (here: still queued at its
    ``timeout``) closes it again: the next request without START is refused, not run
    from a zero state, whether the id was new or live."""
    x = RNG.standard_normal((1, 6, 20)).astype(np.float32)
    refused(lambda: stub.ModelInfer(request(x[:, :2], sequence_id="fresh",
                                            sequence_start=True, timeout=1)),
            grpc.StatusCode.DEADLINE_EXCEEDED, "sequence 'fresh' was not started")
    refused(lambda: stub.ModelInfer(request(x[:, 2:4], sequence_id="fresh")), BAD,
            START_FLAG)
    stub.ModelInfer(request(x[:, :2], sequence_id="live", sequence_start=True))
    refused(lambda: stub.ModelInfer(request(x[:, :2], sequence_id="live",
                                            sequence_start=True, timeout=1)),
            grpc.StatusCode.DEADLINE_EXCEEDED, "not started", "START flag")
    refused(lambda: stub.ModelInfer(request(x[:, 2:4], sequence_id="live")), BAD, START_FLAG)
    again = stub.ModelInfer(request(x, sequence_id="live", sequence_start=True,
                                    sequence_end=True))
    np.testing.assert_allclose(logits(again), reference(repo, "feat", x), atol=1e-5, rtol=0)


def test_a_cancelled_start_and_a_start_while_draining(repo, tmp_path) -> None:
    """A start cancelled while queued closes the sequence it opened; a start during a
    drain is refused before it closes anything, so the live sequence goes on."""
    srv = start_server(repo, tmp_path / "server.log", "--max-batch-delay-ms", "1000",
                       "--max-batch-size", "8")
    x = RNG.standard_normal((1, 6, 20)).astype(np.float32)
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelInfer.future(request(x[:, :2], sequence_id="gone",
                                                  sequence_start=True))
            time.sleep(0.5)  # queued, waiting 1 s for its batch
            assert call.cancel()
            refused(lambda: stub.ModelInfer(request(x[:, 2:4], sequence_id="gone")), BAD,
                    START_FLAG)

            first = logits(stub.ModelInfer(request(x[:, :2], sequence_id="kept",
                                                   sequence_start=True)))
            # a stateless call keeps the draining server serving for its batch (1 s)
            held = stub.ModelInfer.future(request(x))
            time.sleep(0.2)
            srv.proc.send_signal(15)
            time.sleep(0.1)
            refused(lambda: stub.ModelInfer(request(x[:, :2], sequence_id="kept",
                                                    sequence_start=True)),
                    grpc.StatusCode.UNAVAILABLE, "shutting down")
            rest = logits(stub.ModelInfer(request(x[:, 2:], sequence_id="kept",
                                                  sequence_end=True)))
            held.result()
    finally:
        assert srv.stop() == 0, (tmp_path / "server.log").read_text()[-3000:]
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1),
                               reference(repo, "feat", x), atol=1e-5, rtol=0)


def test_a_continuation_answers_with_its_sequences_version(stub, repo) -> None:
    """A sequence started on version 1 and continued without a version runs on 1, is
    checked against 1 and says 1."""
    u8 = np.frombuffer(b"abcdabcd", dtype=np.uint8)[None]
    first = stub.ModelInfer(request(u8[:, :4], "text", datatype="UINT8", version="1",
                                    sequence_id="v1", sequence_start=True))
    rest = stub.ModelInfer(request(u8[:, 4:], "text", datatype="UINT8", sequence_id="v1",
                                   sequence_end=True))
    assert (first.model_version, rest.model_version) == ("1", "1")
    np.testing.assert_allclose(np.concatenate([logits(first), logits(rest)], axis=1),
                               reference(repo, "text", u8, version=1), atol=1e-5, rtol=0)


def test_model_versions_are_ascii_digits(stub) -> None:
    u8 = np.frombuffer(b"ab", dtype=np.uint8)[None]
    for version in ("\u00b2", "\u0661", "1" * 5000):
        refused(lambda v=version: stub.ModelInfer(request(u8, "text", datatype="UINT8",
                                                          version=v)),
                BAD, "not a positive integer")
        refused(lambda v=version: stub.ModelReady(pb.ModelReadyRequest(name="text",
                                                                       version=v)),
                BAD, "not a positive integer")
        refused(lambda v=version: stub.ModelMetadata(pb.ModelMetadataRequest(name="text",
                                                                             version=v)),
                BAD, "not a positive integer")


# -- with a shared session store ------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path):
    redis = RedisProcess(tmp_path)
    yield redis.url
    redis.stop()


def serve(repo, tmp_path, name: str, url: str, *flags: str):
    return start_server(repo, tmp_path / f"{name}.log", "--max-batch-delay-ms", "5",
                        "--session-store", url, *flags)


def test_a_start_restarts_a_sequence_held_only_by_the_store(repo, redis_url,
                                                            tmp_path) -> None:
    """A started sequence 5 and drained: a start of 5 on B restarts it (not
    ALREADY_EXISTS). A sequence whose lease a live server holds is still refused with
    ABORTED (retry later)."""
    x = RNG.standard_normal((1, 6, 20)).astype(np.float32)
    y = RNG.standard_normal((1, 6, 20)).astype(np.float32)
    a = serve(repo, tmp_path, "a", redis_url)
    b = serve(repo, tmp_path, "b", redis_url)
    try:
        with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
            on_a, on_b = pb_grpc.GRPCInferenceServiceStub(ca), \
                pb_grpc.GRPCInferenceServiceStub(cb)
            on_a.ModelInfer(request(x[:, :2], sequence_id=5, sequence_start=True))
            on_b.ModelInfer(request(x[:, :2], sequence_id=6, sequence_start=True))
            assert a.stop() == 0
            first = logits(on_b.ModelInfer(request(y[:, :2], sequence_id=5,
                                                   sequence_start=True)))
            rest = logits(on_b.ModelInfer(request(y[:, 2:], sequence_id=5,
                                                  sequence_end=True)))
            np.testing.assert_allclose(np.concatenate([first, rest], axis=1),
                                       reference(repo, "feat", y), atol=1e-5, rtol=0)
        c = serve(repo, tmp_path, "c", redis_url)
        try:
            with grpc.insecure_channel(c.target) as cc:
                on_c = pb_grpc.GRPCInferenceServiceStub(cc)
                refused(lambda: on_c.ModelInfer(request(y[:, :2], sequence_id=6,
                                                        sequence_start=True)),
                        grpc.StatusCode.ABORTED, "being written by another server")
        finally:
            assert c.stop() == 0
    finally:
        a.stop()
        assert b.stop() == 0


def test_a_sequence_back_on_a_replica_with_an_outdated_copy_runs(repo, redis_url,
                                                                 tmp_path) -> None:
    """A -> B -> A without affinity: A's copy is behind the store. The request runs on
    the store's record (an OIP client has no way to "resume"), in order."""
    x = RNG.standard_normal((1, 8, 20)).astype(np.float32)
    a = serve(repo, tmp_path, "a", redis_url, "--lease-s", "0.3")
    b = serve(repo, tmp_path, "b", redis_url, "--lease-s", "0.3")
    try:
        with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
            on_a, on_b = pb_grpc.GRPCInferenceServiceStub(ca), \
                pb_grpc.GRPCInferenceServiceStub(cb)
            parts = [logits(on_a.ModelInfer(request(x[:, :2], sequence_id=11,
                                                    sequence_start=True)))]
            time.sleep(0.6)  # A's lease lapses
            parts.append(logits(on_b.ModelInfer(request(x[:, 2:4], sequence_id=11))))
            time.sleep(0.6)  # B's lease lapses
            parts.append(logits(on_a.ModelInfer(request(x[:, 4:6], sequence_id=11))))
            parts.append(logits(on_a.ModelInfer(request(x[:, 6:], sequence_id=11,
                                                        sequence_end=True))))
        text = a.metrics()
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    np.testing.assert_allclose(np.concatenate(parts, axis=1), reference(repo, "feat", x),
                               atol=1e-5, rtol=0)
    # A's lease had lapsed: it took the store's record before running the request, not
    # after a run whose write the store refused (the model run twice, an ABORTED counted)
    assert metric_value(text, "rnnserve_chunks_total", api="kserve_v2", code="OK") == 3
    assert metric_value(text, "rnnserve_chunks_total", api="kserve_v2") == 3
    assert metric_value(text, "rnnserve_batch_size_sum") == 3
    assert metric_value(text, "rnnserve_store_refusals_total") == 0


def test_a_sequence_moving_between_workers_on_each_request_counts_each_once(
        repo, redis_url, tmp_path) -> None:
    """``--workers 2``: each request on a connection of its own reaches either worker; a
    worker's copy is then often behind the store (siblings take a session at once). The
    store refuses that copy's step, and the request runs once more from the store's record:
    exact, and counted once, as the client saw it (OK), never ABORTED."""
    steps = 16
    x = RNG.standard_normal((1, 2 * steps, 20)).astype(np.float32)
    srv = serve(repo, tmp_path, "workers", redis_url, "--workers", "2")
    try:
        parts = []
        for k in range(steps):
            with grpc.insecure_channel(srv.target, options=OWN_CONNECTION) as channel:
                on = pb_grpc.GRPCInferenceServiceStub(channel)
                parts.append(logits(on.ModelInfer(request(
                    x[:, 2 * k:2 * k + 2], sequence_id=12, sequence_start=k == 0,
                    sequence_end=k == steps - 1))))
        text = srv.metrics()
    finally:
        assert srv.stop() == 0
    np.testing.assert_allclose(np.concatenate(parts, axis=1), reference(repo, "feat", x),
                               atol=1e-5, rtol=0)
    for w in ("0", "1"):  # both ran some (all on one: probability 2^-15)
        assert metric_value(text, "rnnserve_chunks_total", api="kserve_v2", code="OK",
                            worker=w) > 0
    assert metric_value(text, "rnnserve_chunks_total", api="kserve_v2", code="OK") == steps
    assert metric_value(text, "rnnserve_chunks_total", api="kserve_v2") == steps

