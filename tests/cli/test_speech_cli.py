"""The speech path as a user runs it: train (quick preset), export, serve, stream a WAV."""

from __future__ import annotations

import re
import shutil

import onnxruntime as ort
import pytest

from rnnserve.export.metadata import ModelMetadata
from rnnserve.kws import DecisionRule

from ..server.serving import start_server
from .test_cli import rnnserve

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng is not installed (scripts/system-deps)")


@pytest.mark.slow
def test_quick_speech_model_trains_exports_and_spots_keywords_in_a_sentence(tmp_path) -> None:
    run, repo = tmp_path / "run", tmp_path / "models"
    proc = rnnserve("train", "--task", "speech", "--quick", "--out", str(run), "--data-dir",
                    str(tmp_path / "cache"), "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"held-out voices: accuracy ([\d.]+)%", proc.stdout)
    assert found, proc.stdout
    assert float(found.group(1)) >= 95.0, proc.stdout

    proc = rnnserve("export", str(run / "best.pt"), "--repo", str(repo), "--name", "speech")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sess = ort.InferenceSession(str(repo / "speech" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
    assert meta.training["val_accuracy"] >= 0.95
    assert set(meta.training["val_accuracy_by_label"]) >= {"_silence_", "_unknown_", "stop"}
    assert meta.training["data"]["val_variants_held_out"]
    rule = DecisionRule.from_dict(meta.decoding)
    assert 0.0 < rule.threshold < 1.0

    wav = tmp_path / "demo.wav"
    proc = rnnserve("say", "Go left. Stop. Now turn right, and say yes.", "--out", str(wav))
    assert proc.returncode == 0, proc.stderr
    server = start_server(repo, tmp_path / "server.log")
    try:
        proc = rnnserve("stream", "--wav", str(wav), "--model", "speech", "--server",
                        server.target, "--fast", "--chunk-ms", "20")
    finally:
        assert server.stop() == 0
    assert proc.returncode == 0, proc.stderr
    lines = re.findall(r"^\s*([\d.]+)s\s+(\S+)\s+score ([\d.]+)$", proc.stdout, re.M)
    spotted = [label for _, label, _ in lines]
    assert "stop" in spotted, proc.stdout
    times = [float(t) for t, _, _ in lines]
    assert times == sorted(times) and all(0 < t < 4.5 for t in times)
