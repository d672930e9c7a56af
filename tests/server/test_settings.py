from __future__ import annotations

import pytest
from pydantic import ValidationError

from rnnserve.server.settings import Settings


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path, monkeypatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("RNNSERVE_"):
            monkeypatch.delenv(key)
    cfg = tmp_path / "serve.toml"
    cfg.write_text('grpc_port = 9001\nmax_batch_size = 7\nidle_timeout_s = 5.0\n'
                   'device = "cpu"\n')
    monkeypatch.setenv("RNNSERVE_MAX_BATCH_SIZE", "9")
    monkeypatch.setenv("RNNSERVE_IDLE_TIMEOUT_S", "6")
    s = Settings.load(cfg, idle_timeout_s="8", repo=None)
    assert s.grpc_port == 9001  # file
    assert s.max_batch_size == 9  # environment over file
    assert s.idle_timeout_s == 8.0  # flag over environment
    assert s.device == "cpu" and s.metrics_port == 8002  # file, default


def test_bad_values_and_unknown_keys_are_refused(tmp_path) -> None:
    with pytest.raises(ValidationError, match="device"):
        Settings.load(device="tpu")
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings.load(max_batch_size="0")
    cfg = tmp_path / "serve.toml"
    cfg.write_text("max_batch_sise = 3\n")
    with pytest.raises(ValidationError, match="max_batch_sise"):
        Settings.load(cfg)
    with pytest.raises(FileNotFoundError):
        Settings.load(tmp_path / "missing.toml")
