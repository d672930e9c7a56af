"""The real tritonclient (its own virtualenv) against a real server on loopback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from rnnserve.protos.inference import grpc_service_pb2

from .test_protocol import reference
from .triton_driver import describe

DRIVER = Path(__file__).with_name("triton_driver.py")


def run_driver(python: Path, *args: str) -> dict:
    r = subprocess.run([str(python), str(DRIVER), *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def test_our_proto_matches_tritonclients_field_for_field(triton_python) -> None:
    theirs = run_driver(triton_python, "descriptors")
    mine = describe(grpc_service_pb2.DESCRIPTOR)
    assert (mine["package"], mine["service"]) == (theirs["package"], theirs["service"])
    assert mine["methods"], "no RPCs"
    for name, sig in mine["methods"].items():
        assert theirs["methods"].get(name) == sig, name
    assert len(mine["messages"]) == 15
    for name, fields in mine["messages"].items():
        assert theirs["messages"][name] == fields, name


@pytest.fixture(scope="module")
def scenario(server, triton_python, tmp_path_factory):
    d = tmp_path_factory.mktemp("triton")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((1, 13, 20)).astype(np.float32)
    b = rng.standard_normal((1, 13, 20)).astype(np.float32)
    cuts = np.array([3, 4, 9, 12])
    np.savez(d / "in.npz", a=a, b=b, cuts=cuts)
    report = run_driver(triton_python, "scenario", server.target, str(d / "in.npz"),
                        str(d / "out.npz"))
    return report, dict(np.load(d / "out.npz")), a, b, cuts


def test_interleaved_streamed_sequences_equal_whole_requests_chunk_by_chunk(scenario,
                                                                          repo) -> None:
    report, out, a, b, cuts = scenario
    bounds = list(zip([0, *cuts], [*cuts, a.shape[1]], strict=True))
    for name, x in (("a", a), ("b", b)):
        whole = out[f"whole-{name}"]
        np.testing.assert_allclose(whole, reference(repo, "feat", x), atol=1e-5, rtol=0)
        for k, (lo, hi) in enumerate(bounds):
            chunk = out[f"stream-{name}-{k}"]
            assert chunk.shape == (1, hi - lo, 7)
            np.testing.assert_allclose(chunk, whole[:, lo:hi], atol=1e-5, rtol=0)
    # the bad request in the middle got its error; the stream went on to the end
    assert len(report["stream_errors"]) == 1
    assert "must specify the START flag" in report["stream_errors"][0]
    assert len([k for k in out if k.startswith("stream-")]) == 2 * len(bounds)


def test_sync_infer_with_sequence_parameters_and_stateless(scenario, repo) -> None:
    report, out, a, _, _ = scenario
    np.testing.assert_allclose(out["sync-a"], out["whole-a"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["stateless-a"], out["whole-a"], atol=1e-5, rtol=0)
    status, message = report["after_end"]
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "sequence 31 to model 'feat' must specify the START flag" in message
    # a BYTES string to the byte-level text model (its highest version, 2)
    text = np.frombuffer(b"hello", dtype=np.uint8)[None]
    np.testing.assert_allclose(out["text-hello"], reference(repo, "text", text, version=2),
                               atol=1e-5, rtol=0)


def test_metadata_and_readiness_as_tritonclient_reports_them(scenario) -> None:
    report = scenario[0]
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["unknown_model_ready"] is False
    meta = report["metadata"]
    assert meta["name"] == "feat" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "-1", "20"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32",
                                "shape": ["-1", "-1", "7"]}]  # no state among them
    assert "sequence" in report["server_metadata"]["extensions"]
    assert report["server_metadata"]["name"] == "rnnserve"


def test_classification_extension(scenario, repo) -> None:
    report, _, a, _, _ = scenario
    logits = reference(repo, "feat", a[:, :2])[0]
    want = []
    for frame in logits:
        for i in np.argsort(-frame, kind="stable")[:2]:
            want.append(f"{frame[i]:f}:{i}")
    assert report["classes"] == want
