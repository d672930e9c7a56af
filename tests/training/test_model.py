from __future__ import annotations

import pytest
import torch

from rnnserve.errors import CheckpointError, UsageError
from rnnserve.training.checkpoint import load_checkpoint, model_from_checkpoint
from rnnserve.training.model import ModelConfig, RecurrentModel

from ..conftest import tiny_config


def _input(cfg: ModelConfig, b: int, t: int) -> torch.Tensor:
    if cfg.input_kind == "bytes":
        return torch.randint(0, 256, (b, t), dtype=torch.uint8)
    return torch.randn(b, t, cfg.input_size)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
@pytest.mark.parametrize("kind", ["bytes", "features"])
def test_state_is_batch_major_and_explicit(arch: str, kind: str) -> None:
    cfg = tiny_config(arch, kind, num_layers=3, hidden_size=10)
    model = RecurrentModel(cfg).eval()
    y, state = model(_input(cfg, 5, 7))
    assert y.shape == (5, 7, cfg.output_size)
    assert len(state) == (2 if arch == "lstm" else 1)
    assert all(s.shape == (5, 3, 10) for s in state)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
@pytest.mark.parametrize("kind", ["bytes", "features"])
def test_chunked_forward_equals_whole_sequence(arch: str, kind: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(arch, kind)
    model = RecurrentModel(cfg).eval()
    x = _input(cfg, 3, 23)
    s0 = tuple(torch.rand(3, cfg.num_layers, cfg.hidden_size) - 0.5 for _ in cfg.state_names)
    with torch.no_grad():
        y_whole, s_whole = model(x, s0)
        state, ys = s0, []
        for a, b in [(0, 1), (1, 9), (9, 10), (10, 23)]:
            y, state = model(x[:, a:b], state)
            ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=1), y_whole, rtol=0, atol=1e-6)
    for got, want in zip(state, s_whole, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_config_is_frozen_and_rebuilt_from_checkpoint(make_checkpoint) -> None:
    path = make_checkpoint("lstm", "features", hidden_size=12, num_layers=3)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    assert model.config == tiny_config("lstm", "features", hidden_size=12, num_layers=3)
    with pytest.raises(AttributeError):
        model.config.hidden_size = 5  # type: ignore[misc]


def test_bad_configs_say_what_is_wrong() -> None:
    with pytest.raises(UsageError, match="unknown arch 'rnn'"):
        tiny_config("rnn")
    with pytest.raises(UsageError, match="256 values"):
        tiny_config("gru", input_size=300)
    with pytest.raises(CheckpointError, match="unknown fields"):
        ModelConfig.from_dict({**tiny_config("gru").to_dict(), "bidirectional": True})


def test_not_a_checkpoint_is_refused(tmp_path) -> None:
    bogus = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    with pytest.raises(CheckpointError, match="not an rnnserve checkpoint"):
        load_checkpoint(bogus)
    garbage = tmp_path / "y.pt"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_file_has_the_mode_the_umask_gives(tmp_path) -> None:
    # as torch.save would: another user (a server, an export job) can read a run's files
    import os
    import stat

    from rnnserve.training.checkpoint import new_model_checkpoint, save_checkpoint

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "x.pt", new_model_checkpoint(tiny_config("gru"), "text"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.pt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary left
    assert load_checkpoint(tmp_path / "x.pt")["task"] == "text"
