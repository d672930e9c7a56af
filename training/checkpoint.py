"""Checkpoint files (``*.pt``): weights, frozen model config, training state and metrics.

A checkpoint is a plain dict saved with ``torch.save`` and loaded with
``weights_only=True`` (no pickled code runs on load). Everything needed to rebuild
the model travels inside it: ``ModelConfig.from_dict(ckpt["model_config"])``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from rnnserve.errors import CheckpointError
from rnnserve.files import fsync_dir, new_file
from rnnserve.training.model import ModelConfig, RecurrentModel

FORMAT = "rnnserve.checkpoint/1"
TASKS = ("text", "features")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint.

    The data is written to a new file beside ``path``, synced, renamed over it, and
    the folder synced. The file gets the mode the umask gives (0644 under umask 022),
    as ``torch.save`` would, not ``mkstemp``'s owner-only 0600.
    """
    path = Path(path)
    payload = {"format": FORMAT, **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory; pass a *.pt file in it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {first}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{str(path)!r} is not an rnnserve checkpoint (format {found!r}, expected {FORMAT!r})"
        )
    for key in ("model_config", "model_state", "task"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks {key!r}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> RecurrentModel:
    """Rebuild the model from the config saved inside the checkpoint, in eval mode."""
    config = ModelConfig.from_dict(ckpt["model_config"])
    model = RecurrentModel(config)
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit its own config: {exc}") from exc
    return model.eval()


def new_model_checkpoint(config: ModelConfig, task: str, seed: int = 0) -> dict[str, Any]:
    """An untrained model (seeded random weights): enough for speed tests and benchmarks."""
    if task not in TASKS:
        raise CheckpointError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    torch.manual_seed(seed)
    model = RecurrentModel(config)
    return {
        "task": task,
        "model_config": config.to_dict(),
        "model_state": model.state_dict(),
        "step": 0,
        "metrics": {},
        "seed": seed,
    }


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
