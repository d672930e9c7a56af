"""Errors raised by rnnserve at its boundaries.

Hierarchy::

    RnnserveError                 anything the user can act on; the CLI prints one line
    ├── UsageError                bad option values or combinations
    ├── MissingDependencyError    an optional extra (e.g. ``train``) is not installed
    ├── CheckpointError           a checkpoint is missing, unreadable or of another format
    ├── DataError                 a training corpus could not be built
    ├── ModelRepositoryError      a model repository cannot be read or written
    ├── ModelMetadataError        an ONNX model lacks or has malformed rnnserve metadata
    ├── StoreMisconfigured        a shard of the session store is listed in another place
    └── ExportError               torch -> ONNX export failed
        └── VerificationError     the exported model does not match its contract

Errors from dependencies are translated once, where they are caught, with
``raise Mapped(msg) from exc`` so the cause stays in the chain.
"""

from __future__ import annotations


class RnnserveError(Exception):
    """Base class: a failure the user can act on, described in one line."""


class UsageError(RnnserveError):
    pass


class MissingDependencyError(RnnserveError):
    pass


class CheckpointError(RnnserveError):
    pass


class DataError(RnnserveError):
    pass


class ModelRepositoryError(RnnserveError):
    pass


class ModelMetadataError(RnnserveError):
    pass


class StoreMisconfigured(RnnserveError):
    pass


class ExportError(RnnserveError):
    pass


class VerificationError(ExportError):
    pass


def require_train_extra(feature: str) -> None:
    """Fail with a clear message when torch (the ``train`` extra) is missing."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the 'train' extra (torch, onnx): "
            "pip install 'rnnserve[train]' (torch==2.13.0)"
        ) from exc
