"""Speech models exported with the log-mel front end inside the graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnserve.audio import FRONT_END, log_mel
from rnnserve.errors import VerificationError
from rnnserve.export.metadata import ModelMetadata
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.export.verify import probe_signal, verify_file
from rnnserve.kws import DecisionRule
from rnnserve.training.checkpoint import load_checkpoint
from rnnserve.training.speech_data import LABELS
from rnnserve.training.speech_model import speech_model_from_checkpoint

from ..conftest import speech_checkpoint


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module", params=["lstm", "gru"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"speech-{request.param}")
    speech_checkpoint(root / "sp.pt", request.param, hidden_size=32, seed=3)
    mv = export_checkpoint(root / "sp.pt", root / "models", "speech", log=_quiet)
    return root, mv.path


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, x, states):
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, [x, *states], strict=True)))


def test_metadata_declares_pcm16_the_overlap_state_and_the_rule(exported) -> None:
    _, path = exported
    sess = _session(path)
    meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
    assert meta.task == "speech"
    assert (meta.input.kind, meta.input.dtype) == ("pcm16", "int16")
    assert (meta.input.sample_rate, meta.input.hop_samples) == (16000, 160)
    assert meta.outputs[0].name == "posteriors"
    assert meta.outputs[0].labels == LABELS
    assert meta.states[0].input == "frame_in" and meta.states[0].row_shape() == (240,)
    assert DecisionRule.from_dict(meta.decoding) == DecisionRule()
    assert meta.decoding["silence_label"] == LABELS[0]
    assert meta.decoding["frame_seconds"] == 0.01
    assert meta.export["frontend"]["n_mels"] == 80
    ver = meta.verification
    assert ver["passed"] and ver["frontend_vs_offline"] < 1e-3
    assert ver["posteriors_vs_offline"] < 1e-4
    assert ver["max_abs_diff_chunked_vs_whole"] < 1e-5
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"MatMul", "Log"} <= ops and not ops & {"Loop", "Scan", "STFT", "DFT"}


def test_graph_shapes_are_the_declared_ones(exported) -> None:
    """Every fixed axis the metadata declares is fixed in the graph too (the exporter
    named the front end's sliced state axis ``Sliceframe_out_dim_1``, not 240)."""
    _, path = exported
    sess = _session(path)
    meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
    declared = {meta.input.name: meta.input.shape, **{o.name: o.shape for o in meta.outputs}}
    for s in meta.states:
        declared[s.input] = declared[s.output] = s.shape
    graph = {t.name: t.shape for t in [*sess.get_inputs(), *sess.get_outputs()]}
    assert sorted(graph) == sorted(declared)
    for name, shape in declared.items():
        assert len(graph[name]) == len(shape), name
        for got, want in zip(graph[name], shape, strict=True):
            assert got == want if isinstance(want, int) else isinstance(got, str), \
                (name, graph[name], shape)


@pytest.mark.parametrize("chunk_ms", [10, 20, 40, 100])
def test_chunked_pcm_equals_the_whole_utterance(exported, chunk_ms: int) -> None:
    _, path = exported
    sess = _session(path)
    x = probe_signal(16000, 160)[None]  # (1, 24000)
    zeros = [np.zeros((1, *i.shape[1:]), np.float32) for i in sess.get_inputs()[1:]]
    whole = _run(sess, x, zeros)
    step = 16 * chunk_ms
    states, parts = zeros, []
    for a in range(0, x.shape[1], step):
        out = _run(sess, x[:, a:a + step], states)
        parts.append(out[0])
        states = out[1:]
    assert np.abs(np.concatenate(parts, axis=1) - whole[0]).max() <= 1e-5
    for got, want in zip(states, whole[1:], strict=True):
        assert np.abs(got - want).max() <= 1e-5


def test_graph_equals_torch_on_the_offline_features(exported) -> None:
    root, path = exported
    model = speech_model_from_checkpoint(load_checkpoint(root / "sp.pt")).double()
    x = probe_signal(16000, 160)
    sess = _session(path)
    zeros = [np.zeros((1, *i.shape[1:]), np.float32) for i in sess.get_inputs()[1:]]
    got = _run(sess, x[None], zeros)[0][0]
    with torch.no_grad():
        logits, _ = model.rnn(model.normalize(torch.from_numpy(log_mel(x))[None]))
    assert np.abs(got - torch.softmax(logits, -1)[0].numpy()).max() < 1e-4


def test_a_graph_whose_front_end_drifted_fails_verification(exported, tmp_path) -> None:
    _, path = exported
    proto = onnx.load(str(path))
    mel = FRONT_END.n_bins * FRONT_END.n_mels
    for init in proto.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        if arr.size == mel:  # the mel filterbank: shift it by one band
            init.CopyFrom(onnx.numpy_helper.from_array(np.roll(arr, 1, axis=-1), init.name))
            break
    else:
        pytest.fail("mel filterbank not found among the initializers")
    bad = tmp_path / "model.onnx"
    onnx.save(proto, str(bad))
    report = verify_file(bad, log=_quiet)
    assert not report.passed
    assert any("front end vs offline" in f for f in report.failures)
    with pytest.raises(VerificationError, match="front end"):
        report.raise_if_failed()
