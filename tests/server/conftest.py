from __future__ import annotations

import pytest

from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.training.checkpoint import new_model_checkpoint, save_checkpoint

from ..conftest import tiny_config


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """text v1, v2 (GRU, bytes) and feat v1 (LSTM, 20 features -> 7 outputs)."""
    root = tmp_path_factory.mktemp("repo")
    for name, arch, kind, seed in [("text", "gru", "bytes", 1), ("text", "gru", "bytes", 2),
                                   ("feat", "lstm", "features", 3)]:
        ckpt = root / f"{name}-{seed}.pt"
        task = "text" if kind == "bytes" else "features"
        save_checkpoint(ckpt, new_model_checkpoint(tiny_config(arch, kind), task, seed))
        export_checkpoint(ckpt, root / "models", name, log=lambda _: None)
    return root / "models"
