from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """The Python of the tritonclient virtualenv that `make test` builds."""
    path = Path(os.environ.get("RNNSERVE_TRITON_PYTHON", ROOT / ".venv-triton/bin/python"))
    if not path.exists():
        pytest.fail(f"{path} is missing: tritonclient lives in its own virtualenv (its "
                    "protobuf pin clashes with grpcio-tools); `make test` builds it, or "
                    "set RNNSERVE_TRITON_PYTHON")
    return path
