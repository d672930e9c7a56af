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


def test_batch_buckets_pool_rows_and_cuda_graphs() -> None:
    s = Settings.load(max_batch_size="48", batch_buckets="pow2")
    assert s.buckets() == (1, 2, 4, 8, 16, 32, 48) and s.state_pool_rows() == 64
    assert Settings.load(batch_buckets="32, 8,8").buckets() == (8, 32)
    assert Settings.load().buckets() == ()
    # auto: pow2 for a model on CUDA (else every size up to the largest is warmed up)
    assert Settings.load(max_batch_size="48").buckets(cuda=True) == (1, 2, 4, 8, 16, 32, 48)
    none = Settings.load(batch_buckets="none")
    assert none.buckets() == none.buckets(cuda=True) == ()
    listed = Settings.load(batch_buckets="8,32")
    assert listed.buckets() == listed.buckets(cuda=True) == (8, 32)
    with pytest.raises(ValidationError, match="batch_buckets none"):
        Settings.load(cuda_graphs=True, device="cuda", batch_buckets="none")
    for bad in ("0,8", "eight", "8,,16"):
        with pytest.raises(ValidationError, match="batch"):
            Settings.load(batch_buckets=bad)
    with pytest.raises(ValidationError, match="cuda_graphs needs device cuda"):
        Settings.load(cuda_graphs=True, device="cpu")
    with pytest.raises(ValidationError, match="cuda_sync needs device cuda"):
        Settings.load(cuda_sync="blocking")  # device auto may end on the CPU
    with pytest.raises(ValidationError, match="cuda_sync"):
        Settings.load(cuda_sync="sleep", device="cuda")
    assert Settings.load(cuda_sync="blocking", device="cuda").cuda_sync == "blocking"
    with pytest.raises(ValidationError, match="captures its graphs at warm-up"):
        Settings.load(cuda_graphs=True, device="cuda", warmup="off")
    g = Settings.load(cuda_graphs=True, device="cuda", max_sessions="1000",
                      max_batch_size="64", batch_runners="2")
    assert g.buckets() == (1, 2, 4, 8, 16, 32, 64)  # graphs need buckets: pow2 by default
    assert g.state_pool_rows() == 1000 + 2 * 2 * 64 + 2  # fixed: every session and batch
    shared = Settings.load(cuda_graphs=True, device="cuda", max_sessions="1000",
                           max_batch_size="64", batch_runners="2",
                           session_store="redis://127.0.0.1:6379")
    assert shared.state_pool_rows() == 2 * 1000 + 2 * 2 * 64 + 2  # a row per write in flight
    assert Settings.load(pool_rows="5000").state_pool_rows() == 5000


def test_worker_start_bound() -> None:
    # generous by default: loading big models and warming CUDA graphs take minutes
    assert Settings.load().worker_start_s == 300.0
    assert Settings.load(worker_start_s="45").worker_start_s == 45.0
    for bad in ("0", "-1"):
        with pytest.raises(ValidationError, match="worker_start_s"):
            Settings.load(worker_start_s=bad)
