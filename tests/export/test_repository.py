"""The model repository's listing on odd directory and model names (torch-free)."""

from __future__ import annotations

import pytest

from rnnserve.errors import ModelRepositoryError
from rnnserve.export import repository


def _version(root, name: str, version: str) -> None:
    d = root / name / version
    d.mkdir(parents=True)
    (d / repository.MODEL_FILE).write_bytes(b"onnx")


def test_only_canonical_version_directories_are_versions(tmp_path) -> None:
    _version(tmp_path, "m", "2")
    _version(tmp_path, "m", "01")  # not version 1: its path would be m/1/model.onnx
    _version(tmp_path, "m", "²")  # str.isdigit() takes it, int() refuses it
    _version(tmp_path, "m", "٣")  # an Arabic-Indic three
    (tmp_path / "m" / "³").mkdir()
    assert repository.versions(tmp_path, "m") == [2]
    assert repository.next_version(tmp_path, "m") == 3
    listed = repository.list_models(tmp_path)
    assert [(mv.name, mv.version) for mv in listed] == [("m", 2)]
    assert all(mv.path.is_file() for mv in listed)
    assert repository.resolve(tmp_path / "m").version == 2
    assert repository.resolve(tmp_path / "m" / "²" / repository.MODEL_FILE).version == 0


@pytest.mark.parametrize("name", ["m\n", "m\r", "", "-m", "m/x", "m x", "é"])
def test_model_names_with_odd_characters_are_refused(name) -> None:
    with pytest.raises(ModelRepositoryError):
        repository.check_name(name)


def test_a_model_directory_with_a_trailing_newline_is_not_listed(tmp_path) -> None:
    _version(tmp_path, "m\n", "1")
    assert repository.list_models(tmp_path) == []


def test_resolve_takes_relative_paths_such_as_dot(tmp_path, monkeypatch) -> None:
    """`cd REPO/m && rnnserve verify .` (or `verify 3`, `verify 3/..`)."""
    _version(tmp_path, "m", "3")
    monkeypatch.chdir(tmp_path / "m")
    want = (tmp_path / "m" / "3" / repository.MODEL_FILE).resolve()
    for given in (".", "3", "3/.", "3/..", "3/model.onnx"):
        mv = repository.resolve(given)
        assert (mv.name, mv.version, mv.path.resolve()) == ("m", 3, want), given
