"""The model repository on disk: ``REPO/<model name>/<version>/model.onnx``.

Versions are positive integers; the highest is served unless a request names one.
Torch-free: the server uses it to discover models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rnnserve.errors import ModelRepositoryError

MODEL_FILE = "model.onnx"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path  # the model.onnx file


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ModelRepositoryError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' "
            "(at most 128, not starting with a separator)"
        )
    return name


def versions(repo: str | Path, name: str) -> list[int]:
    """Versions of ``name`` that hold a model file, ascending."""
    model_dir = Path(repo) / check_name(name)
    if not model_dir.is_dir():
        return []
    found = []
    for child in model_dir.iterdir():
        if child.name.isdigit() and int(child.name) > 0 and (child / MODEL_FILE).is_file():
            found.append(int(child.name))
    return sorted(found)


def next_version(repo: str | Path, name: str) -> int:
    """One past the highest version directory, whether or not it holds a model yet."""
    model_dir = Path(repo) / check_name(name)
    taken = [int(c.name) for c in model_dir.iterdir() if c.name.isdigit()] if model_dir.is_dir() \
        else []
    return max(taken, default=0) + 1


def list_models(repo: str | Path) -> list[ModelVersion]:
    root = Path(repo)
    if not root.is_dir():
        raise ModelRepositoryError(f"model repository {str(root)!r} is not a directory")
    out = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and _NAME.match(child.name):
            for v in versions(root, child.name):
                out.append(ModelVersion(child.name, v, child / str(v) / MODEL_FILE))
    return out


def resolve(path: str | Path) -> ModelVersion:
    """Accept a model.onnx file, a version directory, or a model directory (highest version)."""
    p = Path(path)
    if p.is_file():
        version_dir, model_file = p.parent, p
    elif (p / MODEL_FILE).is_file():
        version_dir, model_file = p, p / MODEL_FILE
    elif p.is_dir():
        vs = versions(p.parent, p.name) if _NAME.match(p.name) else []
        if not vs:
            raise ModelRepositoryError(
                f"{str(p)!r} holds no {MODEL_FILE} and no numbered version directories with one"
            )
        version_dir = p / str(vs[-1])
        model_file = version_dir / MODEL_FILE
    else:
        raise ModelRepositoryError(f"model {str(p)!r} not found")
    version = int(version_dir.name) if version_dir.name.isdigit() else 0
    return ModelVersion(version_dir.parent.name, version, model_file)
