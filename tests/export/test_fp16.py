"""fp16 export (`rnnserve export --fp16`): half-precision recurrent layers and states,
verified within their own bound, served through the state pool like fp32 models."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from rnnserve.cli import main as cli_main
from rnnserve.client import AsyncClient
from rnnserve.errors import VerificationError
from rnnserve.export import repository
from rnnserve.export.fp16 import to_fp16
from rnnserve.export.metadata import ModelMetadata
from rnnserve.export.module_export import export_module
from rnnserve.export.onnx_export import export_checkpoint, set_metadata, write_model_atomically
from rnnserve.export.verify import FP16_RTOL, fp16_bound, verify_file
from rnnserve.server.runtime import ModelRuntime, RuntimeOptions

from ..conftest import speech_checkpoint
from ..server.serving import metric_value, start_server


def _quiet(_: str) -> None:
    pass


def _meta(path) -> ModelMetadata:
    proto = onnx.load(str(path))
    return ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})


@pytest.fixture(scope="module")
def speech_ckpt(tmp_path_factory):
    return speech_checkpoint(tmp_path_factory.mktemp("speech-fp16") / "sp.pt", seed=4)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_an_fp16_export_halves_the_recurrent_part_and_passes_its_bound(make_checkpoint,
                                                                       tmp_path, arch) -> None:
    ckpt = make_checkpoint(arch, "bytes", seed=2, hidden_size=32)
    full = export_checkpoint(ckpt, tmp_path / "models", "t", 1, log=_quiet)
    half = export_checkpoint(ckpt, tmp_path / "models", "t", 2, fp16=True, log=_quiet)
    m32, m16 = _meta(full.path), _meta(half.path)
    assert [s.dtype for s in m16.states] == ["float16"] * len(m16.states)
    assert m16.state_bytes_per_session() * 2 == m32.state_bytes_per_session()
    assert m16.export["precision"] == "fp16" and m16.outputs == m32.outputs
    assert m16.verification["passed"] and m16.verification["precision"] == "fp16"
    assert m16.verification["max_abs_diff_vs_torch"] > 0  # it really is another precision
    proto = onnx.load(str(half.path))
    rnn = [n for n in proto.graph.node if n.op_type == arch.upper()]
    inits = {i.name: i for i in proto.graph.initializer}
    assert len(rnn) == 2 and all(inits[n.input[1]].data_type == TensorProto.FLOAT16
                                 for n in rnn)
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input,
                                                            *proto.graph.output]}
    assert types["logits"] == TensorProto.FLOAT and types["input"] == TensorProto.UINT8
    assert types["h_in"] == types["h_out"] == TensorProto.FLOAT16


def test_a_speech_model_keeps_its_audio_overlap_state_in_fp32(speech_ckpt, tmp_path) -> None:
    mv = export_checkpoint(speech_ckpt, tmp_path / "models", "speech", fp16=True, log=_quiet)
    meta = _meta(mv.path)
    dtypes = {s.input: s.dtype for s in meta.states}
    assert dtypes == {"frame_in": "float32", "h_in": "float16", "c_in": "float16"}
    assert meta.verification["passed"] and meta.verification["frontend_vs_offline"] < 1e-3


def test_an_fp16_model_out_of_its_bound_is_refused(make_checkpoint, tmp_path) -> None:
    ckpt = make_checkpoint("lstm", "bytes", seed=3, hidden_size=32)
    mv = export_checkpoint(ckpt, tmp_path / "models", "t", fp16=True, log=_quiet)
    proto = onnx.load(str(mv.path))
    lstm = next(n for n in proto.graph.node if n.op_type == "LSTM")
    for init in proto.graph.initializer:
        if init.name == lstm.input[2]:  # R: nudge the recurrence by 5%
            r = numpy_helper.to_array(init).astype(np.float32) * 1.05
            init.CopyFrom(numpy_helper.from_array(r.astype(np.float16), init.name))
    write_model_atomically(proto, mv.path)
    report = verify_file(mv.path, checkpoint=ckpt, write=False, log=_quiet)
    assert not report.passed and "times the fp16 bound" in report.failures[0]
    with pytest.raises(VerificationError, match="fp16"):
        report.raise_if_failed()


def test_the_converter_refuses_a_graph_without_recurrent_layers(make_checkpoint,
                                                                tmp_path) -> None:
    ckpt = make_checkpoint("gru", "bytes", seed=4, hidden_size=16)
    mv = export_checkpoint(ckpt, tmp_path / "models", "t", log=_quiet)
    proto = onnx.load(str(mv.path))
    meta = _meta(mv.path)
    for node in proto.graph.node:
        if node.op_type == "GRU":
            node.op_type = "RNN"  # not a recurrent layer this converter handles
    from rnnserve.errors import ExportError

    with pytest.raises(ExportError, match="no LSTM or GRU"):
        to_fp16(proto, meta)
    converted, _ = to_fp16(onnx.load(str(mv.path)), meta)
    set_metadata(converted, meta)
    onnx.checker.check_model(converted)


def test_the_cli_exports_fp16_and_verify_applies_its_bound(make_checkpoint, tmp_path) -> None:
    ckpt = make_checkpoint("lstm", "features", seed=5, hidden_size=32)
    cmd = [sys.executable, "-m", "rnnserve"]
    out = subprocess.run([*cmd, "export", str(ckpt), "--repo", str(tmp_path / "m"), "--name",
                          "f", "--fp16"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "fp16: 2 recurrent layers" in out.stderr and "verify PASSED" in out.stderr
    again = subprocess.run([*cmd, "verify", str(tmp_path / "m" / "f"), "--checkpoint",
                            str(ckpt)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"fp16: each within {FP16_RTOL:g}" in again.stdout + again.stderr


def test_a_server_streams_an_fp16_model_within_its_bound(make_checkpoint, tmp_path) -> None:
    """Served on the CPU through the state pool (fp16 rows), with buckets; chunked
    streams against the fp32 export of the same checkpoint."""
    ckpt = make_checkpoint("lstm", "features", seed=6, hidden_size=32)
    repo = tmp_path / "models"
    export_checkpoint(ckpt, repo, "f32", log=_quiet)
    export_checkpoint(ckpt, repo, "f16", fp16=True, log=_quiet)
    reference = ModelRuntime(repo / "f32" / "1" / "model.onnx", "f32", 1,
                             RuntimeOptions(device="cpu"))
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((int(rng.integers(10, 40)), 20)).astype(np.float32)
          for _ in range(12)]
    server = start_server(repo, tmp_path / "server.log", "--batch-buckets", "4,8",
                          "--max-batch-size", "8")

    async def one(client, x):
        ys = []
        async with client.stream("f16") as s:
            for a in range(0, len(x), 4):
                ys.append((await s.send(x[a:a + 4], end=a + 4 >= len(x)))["logits"])
        return np.concatenate(ys)

    async def main():
        async with AsyncClient(server.target) as client:
            return await asyncio.gather(*(one(client, x) for x in xs))

    try:
        results = asyncio.run(asyncio.wait_for(main(), 60))
        text = server.metrics()
    finally:
        assert server.stop() == 0
    for x, y in zip(xs, results, strict=True):
        want = reference.run([x], [reference.zero_state()])[0][0][0]
        assert y.dtype == np.float32
        assert float(np.abs(y - want).max()) <= fp16_bound(want)
    held = metric_value(text, "rnnserve_state_bytes", model="f16")
    assert held == 0 and metric_value(text, "rnnserve_state_pool_rows") == 0


class LeakyNorm(nn.Module):
    """An LSTM tagger whose output loses ``k`` times its mean over the chunk: not causal
    in time. ``big_cell``: gates set so that the cell state grows by about 1 a step."""

    def __init__(self, k: float, big_cell: bool = False) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, num_layers=1 if big_cell else 2, batch_first=True)
        self.head = nn.Linear(16, 5)
        self.k = k
        if big_cell:
            with torch.no_grad():
                self.rnn.bias_ih_l0[:32] = 20.0  # input and forget gates open
                self.rnn.bias_ih_l0[32:48] = 3.0  # the candidate near +1

    def forward(self, x, state):
        y, state = self.rnn(x, state)
        return self.head(y - self.k * y.mean(dim=1, keepdim=True)), state


def test_an_fp16_export_verifies_the_fp32_graph_first_and_refuses_what_is_not_causal(
        tmp_path) -> None:
    """A module that looks a little at the whole chunk changes its outputs by less than
    fp16's bound; the fp32 graph's check, at 1e-5 and before any conversion, refuses
    it and nothing is published. A causal module's fp16 record keeps that check."""
    torch.manual_seed(1)
    repo = tmp_path / "repo"
    lines: list[str] = []
    with pytest.raises(VerificationError, match=r"verification of the fp32 graph, before its "
                                                r"fp16 conversion, failed: chunked vs whole"):
        export_module(LeakyNorm(0.02), repo, "leaky", fp16=True, log=lines.append)
    assert list(repo.iterdir()) == []  # no version, no staging left
    [failed] = [line for line in lines if line.startswith("verify FAILED")]
    found = re.search(r"chunked vs whole ([0-9.e+-]+),", failed)
    assert found is not None and 1e-5 < float(found.group(1)) < FP16_RTOL  # fp16 passes it

    mv = export_module(LeakyNorm(0.0), repo, "causal", fp16=True, log=_quiet)
    v = _meta(mv.path).verification
    assert v["passed"] and v["precision"] == "fp16" and v["tolerance"] is None
    first = v["fp32_graph"]
    assert first["passed"] and first["tolerance"] == 1e-5 and first["torch_parity"] == "run"
    assert first["max_abs_diff_chunked_vs_whole"] <= 1e-5 and first["cases"] == 8
    assert cli_main(["verify", str(mv.path), "--cases", "2"]) == 0  # cannot rerun it: kept
    assert _meta(mv.path).verification["fp32_graph"] == first


def test_an_fp16_model_bounds_each_output_and_state_by_its_own_size(tmp_path) -> None:
    """The cell state here grows by about 1 a step while the outputs stay near 1: one
    bound over both (1e-2 x the cell state's size) passed this module, whose outputs
    are off by up to 4.4e-2. Each tensor has its own, and the fp16 graph is refused,
    even when a loose --tolerance passed its fp32 graph."""
    torch.manual_seed(0)
    repo = tmp_path / "repo"
    lines: list[str] = []
    with pytest.raises(VerificationError) as err:
        export_module(LeakyNorm(0.05, big_cell=True), repo, "big", fp16=True, tolerance=1.0,
                      log=lines.append)
    failures = str(err.value).split(": verification failed: ", 1)[1].split("; ")
    assert failures and all(f.startswith("chunked vs whole") and f.endswith("(logits)")
                            for f in failures), failures
    assert "verify PASSED" in "\n".join(lines)  # the fp32 graph, within 1.0
    assert list(repo.iterdir()) == []


def test_the_tolerance_of_an_fp16_export_applies_to_its_fp32_graph(tmp_path, capsys) -> None:
    """--tolerance with --fp16 bounds the fp32 graph, verified first, and is recorded
    there; the fp16 graph has its own bound, and verify refuses a tolerance for it
    rather than record one nothing applied."""
    torch.manual_seed(2)
    repo = tmp_path / "repo"
    with pytest.raises(VerificationError, match="fp32 graph, before its fp16 conversion"):
        export_module(LeakyNorm(0.0), repo, "strict", fp16=True, tolerance=-1.0, log=_quiet)
    mv = export_module(LeakyNorm(0.0), repo, "m", fp16=True, tolerance=3e-5, log=_quiet)
    v = _meta(mv.path).verification
    assert v["fp32_graph"]["tolerance"] == 3e-5 and v["tolerance"] is None
    assert [m.name for m in repository.list_models(repo)] == ["m"]

    before = mv.path.read_bytes()
    capsys.readouterr()
    assert cli_main(["verify", str(mv.path), "--tolerance", "1e-3"]) == 1
    err = capsys.readouterr().err
    assert "--tolerance) does not apply to an fp16 model" in err, err
    assert "verified its fp32 graph within 3e-05" in err and "internal error" not in err
    assert mv.path.read_bytes() == before

    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("the fp32 graph is verified first (within --tolerance), then the fp16 graph "
            "within 1e-2 x max(1, largest |reference|) for each output and state") in text
