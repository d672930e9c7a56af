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


def test_versions_past_eighteen_digits_are_refused_before_anything_is_written(
        tmp_path, make_checkpoint) -> None:
    """A server reads version folders of at most 18 digits: an export to version 10^18,
    or one whose next version would be that, is refused at once, writing nothing."""
    from rnnserve.export.onnx_export import export_checkpoint

    assert repository.check_version(repository.MAX_VERSION) == 10**18 - 1
    for bad in (0, -1, 10**18):
        with pytest.raises(ModelRepositoryError, match="from 1 to 999999999999999999"):
            repository.check_version(bad)
    ckpt = make_checkpoint("gru", seed=1)
    repo = tmp_path / "models"
    lines: list[str] = []
    with pytest.raises(ModelRepositoryError, match="got 1000000000000000000"):
        export_checkpoint(ckpt, repo, "m", 10**18, log=lines.append)
    assert not lines and not repo.exists()  # refused before the export began
    (repo / "m" / str(repository.MAX_VERSION)).mkdir(parents=True)  # the last one taken
    with pytest.raises(ModelRepositoryError, match="got 1000000000000000000"):
        export_checkpoint(ckpt, repo, "m", log=lines.append)
    assert not lines and sorted(p.name for p in (repo / "m").iterdir()) == [
        str(repository.MAX_VERSION)]
