from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..conftest import build_repo
from ..server.serving import start_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """text v1, v2 (GRU, bytes) and feat v1 (LSTM, 20 features -> 7 outputs)."""
    return build_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(repo, log, "--max-batch-delay-ms", "5", "--max-batch-size", "32")
    yield srv
    assert srv.stop() == 0, log.read_text()[-3000:]


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """The Python of the tritonclient virtualenv that `make test` builds."""
    path = Path(os.environ.get("RNNSERVE_TRITON_PYTHON", ROOT / ".venv-triton/bin/python"))
    if not path.exists():
        pytest.fail(f"{path} is missing: tritonclient lives in its own virtualenv (its "
                    "protobuf pin clashes with grpcio-tools); `make test` builds it, or "
                    "set RNNSERVE_TRITON_PYTHON")
    return path
