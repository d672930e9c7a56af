from __future__ import annotations

import pytest

from ..conftest import build_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """text v1, v2 (GRU, bytes) and feat v1 (LSTM, 20 features -> 7 outputs)."""
    return build_repo(tmp_path_factory.mktemp("repo"))
