from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the 'train' extra (torch) is not installed")

from rnnserve.training.checkpoint import new_model_checkpoint, save_checkpoint  # noqa: E402
from rnnserve.training.data import TextCorpus, load_text_corpus  # noqa: E402
from rnnserve.training.model import ModelConfig  # noqa: E402


@pytest.fixture(scope="session")
def small_corpus() -> TextCorpus:
    """Only the pydoc topics (~465 KB): loads in well under a second."""
    return load_text_corpus(("pydoc_topics",))


def tiny_config(arch: str, input_kind: str = "bytes", **kw: object) -> ModelConfig:
    base: dict[str, object] = dict(
        arch=arch,
        input_kind=input_kind,
        input_size=256 if input_kind == "bytes" else 20,
        output_size=256 if input_kind == "bytes" else 7,
        hidden_size=24,
        num_layers=2,
        embed_size=16,
    )
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def speech_checkpoint(path: Path, arch: str = "lstm", hidden_size: int = 32, seed: int = 3,
                      normalised: bool = True) -> Path:
    """An untrained keyword-spotting checkpoint (log-mel front end, the speech labels);
    ``normalised``: a realistic feature normalisation, so the recurrent part sees
    features of unit scale."""
    from rnnserve.training.speech_data import LABELS
    from rnnserve.training.speech_train import new_speech_checkpoint

    cfg = ModelConfig(arch=arch, input_kind="features", input_size=80,
                      output_size=len(LABELS), hidden_size=hidden_size, num_layers=2,
                      embed_size=hidden_size // 2)
    ckpt = new_speech_checkpoint(cfg, seed=seed)
    if normalised:
        ckpt["feature_mean"] = torch.full((80,), -6.0)
        ckpt["feature_std"] = torch.full((80,), 3.0)
    save_checkpoint(path, ckpt)
    return path


def build_repo(root: Path) -> Path:
    """A model repository of tiny untrained models: text v1, v2 (GRU, bytes) and
    feat v1 (LSTM, 20 features -> 7 outputs); returns its path."""
    from rnnserve.export.onnx_export import export_checkpoint

    for name, arch, kind, seed in [("text", "gru", "bytes", 1), ("text", "gru", "bytes", 2),
                                   ("feat", "lstm", "features", 3)]:
        ckpt = root / f"{name}-{seed}.pt"
        task = "text" if kind == "bytes" else "features"
        save_checkpoint(ckpt, new_model_checkpoint(tiny_config(arch, kind), task, seed))
        export_checkpoint(ckpt, root / "models", name, log=lambda _: None)
    return root / "models"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """text v1, v2 (GRU, bytes) and feat v1 (LSTM, 20 features -> 7 outputs)."""
    return build_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    """``rnnserve serve`` on ``repo``, batching (up to 32 steps, 5 ms)."""
    from .server.serving import start_server

    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(repo, log, "--max-batch-delay-ms", "5", "--max-batch-size", "32")
    yield srv
    assert srv.stop() == 0, log.read_text()[-3000:]


@pytest.fixture
def make_checkpoint(tmp_path: Path):
    """Write an untrained (seeded random) checkpoint and return its path."""

    def make(arch: str, input_kind: str = "bytes", seed: int = 0, **kw: object) -> Path:
        path = tmp_path / f"{arch}-{input_kind}-{seed}.pt"
        task = "text" if input_kind == "bytes" else "features"
        save_checkpoint(path, new_model_checkpoint(tiny_config(arch, input_kind, **kw), task, seed))
        return path

    return make
