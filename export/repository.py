"""The model repository on disk: ``REPO/<model name>/<version>/model.onnx``.

Versions are positive integers; the highest is served unless a request names one.
Torch-free: the server uses it to discover models.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from rnnserve.errors import ModelRepositoryError

MODEL_FILE = "model.onnx"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # fullmatch: "$" takes "m\n"
_VERSION = re.compile(r"[1-9][0-9]{0,17}")  # not "01" (its path is not "1"), "²" or "٣"
# The highest version: 18 digits, as _VERSION reads folders (and as the protocol's
# int64 and the Open Inference Protocol's version strings carry them)
MAX_VERSION = 10**18 - 1


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path  # the model.onnx file


def is_model_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ModelRepositoryError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' "
            "(at most 128, not starting with a separator)"
        )
    return name


def check_version(version: int) -> int:
    """``version`` if a repository may hold it, else why not."""
    if not 1 <= version <= MAX_VERSION:
        raise ModelRepositoryError(f"versions are integers from 1 to {MAX_VERSION} (at most "
                                   f"18 digits), got {version}")
    return version


def _version_number(dir_name: str) -> int | None:
    """The version a directory name stands for: a positive decimal integer written the
    one way ``str(version)`` writes it, else None (such a directory is not a version)."""
    return int(dir_name) if _VERSION.fullmatch(dir_name) else None


def versions(repo: str | Path, name: str) -> list[int]:
    """Versions of ``name`` that hold a model file, ascending."""
    model_dir = Path(repo) / check_name(name)
    if not model_dir.is_dir():
        return []
    found = []
    for child in model_dir.iterdir():
        v = _version_number(child.name)
        if v is not None and (child / MODEL_FILE).is_file():
            found.append(v)
    return sorted(found)


def next_version(repo: str | Path, name: str) -> int:
    """One past the highest version directory, whether or not it holds a model yet."""
    model_dir = Path(repo) / check_name(name)
    taken = [_version_number(c.name) for c in model_dir.iterdir()] if model_dir.is_dir() else []
    return max((v for v in taken if v is not None), default=0) + 1


def list_models(repo: str | Path) -> list[ModelVersion]:
    root = Path(repo)
    if not root.is_dir():
        raise ModelRepositoryError(f"model repository {str(root)!r} is not a directory")
    out = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and _NAME.fullmatch(child.name):
            for v in versions(root, child.name):
                out.append(ModelVersion(child.name, v, child / str(v) / MODEL_FILE))
    return out


def resolve(path: str | Path) -> ModelVersion:
    """Accept a model.onnx file, a version directory, or a model directory (highest version)."""
    p = Path(os.path.abspath(path))  # "." and "3/.." have no name to read the model's from
    if p.is_file():
        version_dir, model_file = p.parent, p
    elif (p / MODEL_FILE).is_file():
        version_dir, model_file = p, p / MODEL_FILE
    elif p.is_dir():
        vs = versions(p.parent, p.name) if _NAME.fullmatch(p.name) else []
        if not vs:
            raise ModelRepositoryError(
                f"{str(path)!r} holds no {MODEL_FILE} and no numbered version directories with one"
            )
        version_dir = p / str(vs[-1])
        model_file = version_dir / MODEL_FILE
    else:
        raise ModelRepositoryError(f"model {str(path)!r} not found")
    version = _version_number(version_dir.name) or 0
    return ModelVersion(version_dir.parent.name, version, model_file)
