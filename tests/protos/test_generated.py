from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (the 'dev' extra) generates the modules")

ROOT = Path(__file__).resolve().parents[2] / "protos"


def test_committed_modules_match_the_proto_sources(tmp_path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", ROOT / "generate.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "no modules generated"
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is not committed; run `make protos`"
        assert committed.read_text() == path.read_text(), (
            f"{rel} differs from its .proto source; run `make protos` and commit")
