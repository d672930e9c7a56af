"""The ``rnnserve`` command as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnnserve.export.metadata import ModelMetadata


def rnnserve(*args: str, cwd: Path | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RNNSERVE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "rnnserve", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_checkpoint(tmp_path) -> None:
    proc = rnnserve("export", str(tmp_path / "nope.pt"), "--repo", str(tmp_path), "--name", "m")
    assert_one_line_error(proc, "nope.pt", "not found")


def test_unknown_arch(tmp_path) -> None:
    proc = rnnserve("train", "--arch", "transformer", "--out", str(tmp_path))
    assert_one_line_error(proc, "invalid choice", "transformer")
    assert proc.returncode == 2


def test_unwritable_repository(tmp_path, make_checkpoint) -> None:
    ckpt = make_checkpoint("gru")
    blocker = tmp_path / "repo"
    blocker.write_text("a file where the repository should be")
    proc = rnnserve("export", str(ckpt), "--repo", str(blocker / "inner"), "--name", "m")
    assert_one_line_error(proc, "cannot write to model repository")
    proc = rnnserve("export", str(ckpt), "--repo", str(blocker), "--name", "m")
    assert_one_line_error(proc, "not a directory")


def test_bad_model_name_and_bad_numbers(tmp_path, make_checkpoint) -> None:
    ckpt = make_checkpoint("gru")
    assert_one_line_error(
        rnnserve("export", str(ckpt), "--repo", str(tmp_path), "--name", "../escape"),
        "invalid model name")
    assert_one_line_error(
        rnnserve("export", str(ckpt), "--repo", str(tmp_path), "--name", "m", "--version", "0"),
        "positive integer")
    assert_one_line_error(rnnserve("train", "--out", str(tmp_path), "--hidden", "-3"),
                          "positive integer")


def test_not_a_checkpoint_and_not_a_model(tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    assert_one_line_error(rnnserve("export", str(junk), "--repo", str(tmp_path), "--name", "m"),
                          "cannot read checkpoint")
    assert_one_line_error(rnnserve("verify", str(tmp_path / "missing")), "not found")


def test_init_export_verify_models_end_to_end(tmp_path) -> None:
    ckpt = tmp_path / "speech.pt"
    proc = rnnserve("init", "--arch", "lstm", "--input", "features", "--input-size", "80",
                    "--outputs", "12", "--hidden", "32", "--layers", "2", "--out", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    repo = tmp_path / "repo"
    proc = rnnserve("export", str(ckpt), "--repo", str(repo), "--name", "speech")
    assert proc.returncode == 0, proc.stderr
    assert "verify PASSED" in proc.stderr and "largest differences" in proc.stderr
    model = repo / "speech" / "1" / "model.onnx"
    assert model.is_file()
    proc = rnnserve("verify", str(repo / "speech"), "--cases", "3")
    assert proc.returncode == 0, proc.stderr
    assert "comparing with the checkpoint recorded at export" in proc.stderr
    assert "vs torch" in proc.stderr
    proc = rnnserve("models", "--repo", str(repo))
    assert proc.returncode == 0 and "speech\t1\tlstm 2x32\tfeatures\tfeatures\tverified" in \
        proc.stdout


def test_serving_side_imports_no_torch() -> None:
    code = ("import sys, rnnserve.cli, rnnserve.export.metadata, rnnserve.export.repository, "
            "rnnserve.server.app, rnnserve.client.stream, rnnserve.client.bench, "
            "rnnserve.client.load, rnnserve.audio, rnnserve.kws, "
            "rnnserve.training.speech_data; "
            "rnnserve.cli.build_parser(); sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
def test_quick_gru_preset_reaches_the_target_and_exports(tmp_path) -> None:
    """The README's demo path: quick GRU to <= 2.3 bits/byte, exported and verified."""
    out = tmp_path / "run"
    proc = rnnserve("train", "--task", "text", "--arch", "gru", "--quick", "--out", str(out),
                    "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    bpb = float(line.split("validation: ")[1].split(" bits")[0])
    assert bpb <= 2.3, line
    assert "unigram entropy of the same text: 4.7" in line
    repo = tmp_path / "repo"
    proc = rnnserve("export", str(out / "best.pt"), "--repo", str(repo), "--name", "text")
    assert proc.returncode == 0, proc.stderr
    import onnxruntime as ort

    sess = ort.InferenceSession(str(repo / "text" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
    assert meta.training["val_bits_per_byte"] <= 2.3
    v = meta.verification
    assert v["passed"] and v["torch_parity"] == "run"
    assert v["max_abs_diff_chunked_vs_whole"] <= 1e-5
    assert v["max_abs_diff_batched_vs_single"] <= 1e-5
    # trained logits reach ~20, where float32 steps are ~2e-6: differences from torch are
    # float32 rounding, no larger than torch's own distance from float64
    assert v["max_abs_diff_vs_torch"] <= 1e-5 or (
        v["onnx_vs_float64"] <= 2 * v["torch_float32_vs_float64"] + 1e-5)


def test_serve_on_a_cuda_device_it_cannot_get_says_so_as_an_error(repo) -> None:
    """``--device cuda`` where onnxruntime cannot run CUDA: a user's mistake, told as
    one ``error:`` line (exit 1), not an internal error (exit 70)."""
    from rnnserve.server.errors import DeviceUnavailable
    from rnnserve.server.runtime import ModelRegistry, RuntimeOptions

    try:
        ModelRegistry(repo, RuntimeOptions(device="cuda"))
    except DeviceUnavailable:
        pass
    else:
        pytest.skip("CUDA works here")
    proc = rnnserve("serve", "--repo", str(repo), "--device", "cuda", "--grpc-port", "0",
                    "--metrics-port", "0", "--host", "127.0.0.1", timeout=120)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rnnserve serve: error: ") and "cuda" in last.lower(), last
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("task", ["text", "speech"])
def test_resume_refuses_another_arch(tmp_path, task) -> None:
    """``--resume`` continues the saved run: ``--arch`` would silently be ignored (a text
    run went on as the GRU it was), so it is refused like the other overrides."""
    proc = rnnserve("train", "--task", task, "--arch", "lstm", "--resume", "--out",
                    str(tmp_path / "run"))
    assert_one_line_error(proc, "--resume continues the saved run")
    assert proc.returncode == 1


def test_say_refuses_a_pitch_espeak_would_clamp_and_empty_text(tmp_path) -> None:
    proc = rnnserve("say", "hi", "--out", str(tmp_path / "a.wav"), "--pitch", "500")
    assert_one_line_error(proc, "--pitch", "0..99")
    assert proc.returncode == 2
    proc = rnnserve("say", "  ", "--out", str(tmp_path / "b.wav"))
    assert_one_line_error(proc, "nothing to say")
    assert proc.returncode == 1
    assert not (tmp_path / "a.wav").exists() and not (tmp_path / "b.wav").exists()
