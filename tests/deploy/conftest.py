from __future__ import annotations

import pytest

from ..conftest import build_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))
