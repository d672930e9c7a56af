"""Deadlines: a chunk still queued when its deadline passes never runs, and its session
does not advance. The server here waits long for batches (--max-batch-delay-ms), so a
lone chunk sits in the queue."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from rnnserve.client import Client
from rnnserve.client.client import make_chunk
from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

from ..oip.test_protocol import logits, reference, request
from .serving import metric_value, start_server


@pytest.fixture(scope="module")
def slow_batches(repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(repo, log, "--max-batch-delay-ms", "400")
    yield srv
    assert srv.stop() == 0, log.read_text()[-3000:]


def test_a_grpc_deadline_that_passes_in_the_queue_advances_nothing(slow_batches, repo) -> None:
    x = np.random.default_rng(8).standard_normal((6, 20)).astype(np.float32)
    with Client(slow_batches.target, timeout=10) as client:
        sid = client.open_session("feat").session_id
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Step(pb.StepRequest(session_id=sid, chunk=make_chunk(0, x[:3])),
                             timeout=0.1,
                             metadata=(("x-rnnserve-session", sid),))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        got = np.concatenate([client.step(sid, 0, x[:3])["logits"],
                              client.step(sid, 1, x[3:], end=True)["logits"]])
    assert float(np.abs(got - reference(repo, "feat", x[None])[0]).max()) <= 1e-5


def test_the_triton_timeout_parameter_drops_a_late_request(slow_batches, repo) -> None:
    x = np.random.default_rng(9).standard_normal((1, 6, 20)).astype(np.float32)
    with grpc.insecure_channel(slow_batches.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        first = logits(stub.ModelInfer(request(x[:, :3], sequence_id="late",
                                               sequence_start=True)))
        with pytest.raises(grpc.RpcError) as info:  # 1 ms to run; batches wait 400 ms
            stub.ModelInfer(request(x[:, 3:], sequence_id="late", timeout=1000))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not run and nothing advanced" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request(x[:, 3:], sequence_id="late", timeout=-1))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        rest = logits(stub.ModelInfer(request(x[:, 3:], sequence_id="late", timeout=5_000_000,
                                              sequence_end=True)))
    got = np.concatenate([first, rest], axis=1)
    assert float(np.abs(got - reference(repo, "feat", x)).max()) <= 1e-5
    assert metric_value(slow_batches.metrics(), "rnnserve_chunks_total", api="kserve_v2",
                        code="DEADLINE_EXCEEDED") == 1

