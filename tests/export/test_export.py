"""Exported models against their contract, checked here independently of ``verify``."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnserve.errors import ModelRepositoryError, VerificationError
from rnnserve.export import repository
from rnnserve.export.metadata import ModelMetadata
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.export.verify import verify_file
from rnnserve.training.checkpoint import load_checkpoint, model_from_checkpoint

TOL = 1e-5


def _quiet(_: str) -> None:
    pass


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _meta(sess: ort.InferenceSession) -> ModelMetadata:
    return ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)


def _run(sess, meta, x, states):
    feeds = {meta.input.name: x, **{s.input: v for s, v in zip(meta.states, states, strict=True)}}
    outs = sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    by_name = dict(zip(names, outs, strict=True))
    return by_name[meta.outputs[0].name], [by_name[s.output] for s in meta.states]


def _inputs(meta, rng, b, t):
    if meta.input.kind == "utf8_bytes":
        x = rng.integers(0, 256, (b, t), dtype=np.uint8)
    else:
        x = rng.standard_normal((b, t, meta.input.shape[2])).astype(np.float32)
    s = [rng.uniform(-1, 1, (b, *st.row_shape())).astype(np.float32) for st in meta.states]
    return x, s


@pytest.mark.parametrize("arch", ["lstm", "gru"])
@pytest.mark.parametrize("kind", ["bytes", "features"])
def test_export_matches_torch_and_streams_exactly(tmp_path, make_checkpoint, arch, kind) -> None:
    ckpt_path = make_checkpoint(arch, kind, num_layers=2, hidden_size=24)
    mv = export_checkpoint(ckpt_path, tmp_path / "repo", "m", log=_quiet)
    assert mv.path == tmp_path / "repo" / "m" / "1" / "model.onnx" and mv.version == 1

    proto = onnx.load(str(mv.path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"LSTM": "lstm", "GRU": "gru"}.keys() & ops == {arch.upper()}
    assert not ops & {"Loop", "Scan"}
    assert proto.opset_import[0].version >= 17

    sess = _session(mv.path)
    meta = _meta(sess)
    assert meta.arch == arch and len(meta.states) == (2 if arch == "lstm" else 1)
    assert meta.verification["passed"] is True
    assert meta.verification["max_abs_diff_vs_torch"] <= TOL
    assert meta.verification["max_abs_diff_chunked_vs_whole"] <= TOL

    model = model_from_checkpoint(load_checkpoint(ckpt_path))
    rng = np.random.default_rng(7)
    for _ in range(4):
        b, t = int(rng.integers(1, 17)), int(rng.integers(9, 80))
        x, s0 = _inputs(meta, rng, b, t)
        y, s = _run(sess, meta, x, s0)
        with torch.no_grad():
            ty, ts = model(torch.from_numpy(x), tuple(torch.from_numpy(v) for v in s0))
        assert np.abs(y - ty.numpy()).max() <= TOL
        for a, w in zip(s, ts, strict=True):
            assert np.abs(a - w.numpy()).max() <= TOL
        cuts = [0, *sorted(rng.choice(np.arange(1, t), size=3, replace=False).tolist()), t]
        state, ys = s0, []
        for a, z in zip(cuts[:-1], cuts[1:], strict=True):
            yc, state = _run(sess, meta, x[:, a:z], state)
            ys.append(yc)
        diff = np.abs(np.concatenate(ys, axis=1) - y).max()
        assert diff <= TOL, f"chunked vs whole differs by {diff:.2e} at cuts {cuts}"
        for a, w in zip(state, s, strict=True):
            assert np.abs(a - w).max() <= TOL


def test_traced_at_batch_1_and_8_steps_runs_at_batch_13_and_101_steps(tmp_path,
                                                                      make_checkpoint) -> None:
    mv = export_checkpoint(make_checkpoint("gru"), tmp_path, "g", log=_quiet)
    sess = _session(mv.path)
    meta = _meta(sess)
    assert (meta.export["traced_batch"], meta.export["traced_time"]) == (1, 8)
    x, s0 = _inputs(meta, np.random.default_rng(0), 13, 101)
    y, s = _run(sess, meta, x, s0)
    assert y.shape == (13, 101, 256)
    assert s[0].shape == (13, 2, 24)


def test_metadata_tells_the_server_everything(tmp_path, make_checkpoint) -> None:
    mv = export_checkpoint(make_checkpoint("lstm", num_layers=3, hidden_size=16), tmp_path, "t",
                           log=_quiet)
    sess = _session(mv.path)
    meta = _meta(sess)
    assert meta.input.kind == "utf8_bytes" and meta.input.dtype == "uint8"
    assert meta.input.shape == ("batch", "time")
    assert [(s.input, s.output, s.shape) for s in meta.states] == [
        ("h_in", "h_out", ("batch", 3, 16)), ("c_in", "c_out", ("batch", 3, 16))]
    assert meta.state_bytes_per_session() == 2 * 3 * 16 * 4
    graph_inputs = {i.name: i.shape for i in sess.get_inputs()}
    assert graph_inputs[meta.states[0].input][1:] == [3, 16]
    assert meta.export["opset"] == 17 and len(meta.export["checkpoint_sha256"]) == 64
    assert meta.outputs[0].shape == ("batch", "time", 256)


def test_versions_increment_and_are_never_overwritten_silently(tmp_path, make_checkpoint) -> None:
    ckpt = make_checkpoint("gru")
    assert export_checkpoint(ckpt, tmp_path, "g", log=_quiet).version == 1
    assert export_checkpoint(ckpt, tmp_path, "g", log=_quiet).version == 2
    assert export_checkpoint(ckpt, tmp_path, "g", version=7, log=_quiet).version == 7
    with pytest.raises(ModelRepositoryError, match="already exists"):
        export_checkpoint(ckpt, tmp_path, "g", version=2, log=_quiet)
    assert repository.versions(tmp_path, "g") == [1, 2, 7]
    assert repository.resolve(tmp_path / "g").version == 7
    # no staging directories are left behind
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["1", "2", "7"]


def test_verify_catches_a_gru_without_linear_before_reset(tmp_path, make_checkpoint) -> None:
    ckpt = make_checkpoint("gru")
    mv = export_checkpoint(ckpt, tmp_path, "g", log=_quiet)
    proto = onnx.load(str(mv.path))
    for node in proto.graph.node:
        if node.op_type == "GRU":
            for attr in node.attribute:
                if attr.name == "linear_before_reset":
                    attr.i = 0
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    report = verify_file(broken, checkpoint=ckpt, write=False, log=_quiet)
    assert not report.passed
    assert any("linear_before_reset=0" in f for f in report.failures)
    # and the numbers disagree with torch, too
    assert report.max_abs_diff_vs_torch is not None and report.max_abs_diff_vs_torch > 1e-4
    with pytest.raises(VerificationError):
        report.raise_if_failed()


def test_verify_catches_a_frozen_time_axis(tmp_path, make_checkpoint) -> None:
    mv = export_checkpoint(make_checkpoint("lstm"), tmp_path, "l", log=_quiet)
    proto = onnx.load(str(mv.path))
    dim = proto.graph.input[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = 8
    frozen = tmp_path / "frozen.onnx"
    onnx.save(proto, str(frozen))
    report = verify_file(frozen, write=False, log=_quiet)
    assert any("time axis is not dynamic" in f for f in report.failures)


def test_verify_catches_a_graph_shape_the_metadata_does_not_declare(tmp_path,
                                                                    make_checkpoint) -> None:
    mv = export_checkpoint(make_checkpoint("lstm"), tmp_path, "l", log=_quiet)
    proto = onnx.load(str(mv.path))
    state_out = proto.graph.output[1]
    dim = state_out.type.tensor_type.shape.dim[2]
    dim.Clear()
    dim.dim_param = "hidden"
    other = tmp_path / "other.onnx"
    onnx.save(proto, str(other))
    report = verify_file(other, write=False, log=_quiet)
    assert any(f.startswith(f"{state_out.name}: graph shape ") and "declared" in f
               for f in report.failures), report.failures


def test_verify_writes_its_figures_into_the_metadata(tmp_path, make_checkpoint) -> None:
    ckpt = make_checkpoint("lstm")
    mv = export_checkpoint(ckpt, tmp_path, "l", log=_quiet)
    before = _meta(_session(mv.path)).verification["verified_at"]
    report = verify_file(mv.path, checkpoint=ckpt, seed=3, n_cases=4, log=_quiet)
    assert report.passed and len(report.cases) == 4
    after = _meta(_session(mv.path)).verification
    assert after["cases"] == 4 and after["torch_parity"] == "run"
    assert 0 < after["torch_float32_vs_float64"] < 1e-5
    assert 0 < after["onnx_vs_float64"] < 1e-5
    assert after["max_abs_diff_vs_torch"] == report.max_abs_diff_vs_torch
    assert after["verified_at"] >= before


def test_a_model_that_fails_verification_is_never_published(tmp_path, make_checkpoint) -> None:
    ckpt = make_checkpoint("lstm")
    # a negative tolerance fails every comparison: the export must stop before publishing
    with pytest.raises(VerificationError, match="verification failed"):
        export_checkpoint(ckpt, tmp_path, "l", tolerance=-1.0, log=_quiet)
    assert repository.versions(tmp_path, "l") == []
    assert not (tmp_path / "l").exists()  # no empty model folder, no staging left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rnnserve-staging")]


@pytest.mark.parametrize("which", ["input", "outputs", "states"])
def test_verify_catches_a_dtype_the_graph_does_not_have(tmp_path, make_checkpoint,
                                                        which) -> None:
    """The server sizes and checks tensors by the declared dtypes: metadata that names
    another dtype than the graph's must fail verification (inputs are generated by the
    input's kind, so running the graph alone does not notice)."""
    import json

    mv = export_checkpoint(make_checkpoint("lstm"), tmp_path, "l", log=_quiet)
    proto = onnx.load(str(mv.path))
    prop = next(p for p in proto.metadata_props if p.key == f"rnnserve.{which}")
    value = json.loads(prop.value)
    if which == "input":
        value["dtype"] = "int64"  # the graph takes uint8 bytes
    else:
        value[0]["dtype"] = "float16"  # the graph's are float32
    prop.value = json.dumps(value)
    other = tmp_path / "other.onnx"
    onnx.save(proto, str(other))
    report = verify_file(other, write=False, log=_quiet)
    assert any("dtype" in f for f in report.failures), report.failures


def test_one_verification_case_still_compares_batched_with_single(tmp_path,
                                                                  make_checkpoint) -> None:
    """``rnnserve verify --cases 1`` ran batch 1 alone: its batched-vs-single check
    compared a row with itself and could not fail."""
    mv = export_checkpoint(make_checkpoint("gru"), tmp_path, "g", log=_quiet)
    report = verify_file(mv.path, write=False, n_cases=1, log=_quiet)
    assert report.passed and [c[0] for c in report.cases] == [16]
