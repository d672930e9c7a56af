"""A short run of `rnnserve bench` on a tiny model: the output's format and that every
figure is there (not a speed)."""

from __future__ import annotations

import json
import math

import pytest

from ..conftest import build_repo
from .test_cli import assert_one_line_error, rnnserve


def test_bench_sweeps_levels_with_baselines_and_writes_json_and_plot(tmp_path) -> None:
    repo = build_repo(tmp_path)
    out = tmp_path / "bench"
    proc = rnnserve("bench", "--repo", str(repo), "--model", "feat", "--streams", "1,3",
                    "--duration-s", "1", "--out", str(out), "--baselines", "--load-procs", "2",
                    "--idle-sessions", "300",
                    "--serve-arg=--intra-op-threads=1", timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.split()[:3] == ["streams", "chunks/s", "p50"] for line in lines), lines
    assert any(line.startswith("capacity: ") for line in lines), lines
    report = json.loads((out / "bench.json").read_text())
    assert report["model"] == "feat" and report["arch"] == "lstm"
    assert report["provider"] == "CPUExecutionProvider" and report["chunk_ms"] == 40
    assert report["machine"]["cpus"] >= 1 and report["budget_ms"] == 100
    levels = report["levels"]
    assert [lv["streams"] for lv in levels] == [1, 3]
    for lv in levels:
        assert set(lv["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max"}
        ms = lv["latency_ms"]
        assert all(math.isfinite(v) and v > 0 for v in ms.values())
        assert ms["p50"] <= ms["p90"] <= ms["p99"] <= ms["p99.9"] <= ms["max"]
        # one chunk per 40 ms per stream for a second, give or take the last tick
        assert 20 * lv["streams"] <= lv["answered"] <= 26 * lv["streams"]
        assert 0.7 * lv["answered"] / lv["duration_s"] <= lv["throughput"] <= \
            lv["answered"] / lv["duration_s"]
        assert lv["errors"] == {} and lv["sessions"] == lv["streams"]
        assert 0 < lv["load_busy"] < 1.5
    within = [lv["streams"] for lv in levels if lv["latency_ms"]["p99"] <= 100]
    assert report["capacity_streams"] == max(within, default=0)
    sat = report["saturation"]
    assert sat["streams"] == 3 and sat["throughput"] > 0 and sat["latency_ms"]["p50"] > 0
    assert report["load_generator"]["processes"] == 2
    base = report["baselines"]
    for name in ("transport", "unbatched"):
        assert [lv["streams"] for lv in base[name]["levels"]] == [1, 3]
        assert base[name]["capacity_streams"] in (0, 1, 3)
        assert all(lv["answered"] > 0 for lv in base[name]["levels"])
    ceiling = base["compute_ceiling"]
    assert ceiling["batch"] == 64 and ceiling["steps_per_s"] > 0
    assert ceiling["streams"] == pytest.approx(ceiling["steps_per_s"] * 0.04)
    ratios = report["ratios"]
    assert set(ratios) == {"capacity_vs_transport", "capacity_vs_unbatched",
                           "saturation_vs_compute_ceiling"}
    assert ratios["saturation_vs_compute_ceiling"] == round(
        sat["throughput"] / ceiling["steps_per_s"], 3)
    idle = report["idle_memory"]
    assert idle["sessions"] == 300 and idle["rss_before"] > 0 and idle["rss_after"] > 0
    assert idle["raw_state_bytes"] == 300 * idle["state_bytes_per_session"] > 0
    assert idle["growth_vs_raw"] == round(idle["rss_growth"] / idle["raw_state_bytes"], 3)
    for line in ("transport ceiling", "rnnserve unbatched", "compute ceiling", "closed loop",
                 "300 idle sessions"):
        assert any(line in x for x in lines), line
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "server.log").exists() and (out / "echo.log").exists()


def test_bench_refuses_bad_arguments(tmp_path) -> None:
    proc = rnnserve("bench", "--server", "127.0.0.1:1", "--model", "x", "--streams", "1,a",
                    "--out", str(tmp_path))
    assert_one_line_error(proc, "--streams")
    proc = rnnserve("bench", "--model", "x")
    assert proc.returncode == 2 and "--server" in proc.stderr
    proc = rnnserve("bench", "--server", "127.0.0.1:1", "--model", "x", "--baselines")
    assert_one_line_error(proc, "--baselines", "--repo")


def test_bench_compares_the_redis_session_store(tmp_path) -> None:
    repo = build_repo(tmp_path)
    out = tmp_path / "bench"
    proc = rnnserve("bench", "--repo", str(repo), "--model", "feat", "--streams", "2",
                    "--duration-s", "1", "--out", str(out), "--redis-store", "--no-plot",
                    "--serve-arg=--intra-op-threads=1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "with the Redis session store:" in proc.stdout
    report = json.loads((out / "bench.json").read_text())
    store = report["redis_store"]
    (level,) = store["levels"]
    assert level["streams"] == 2 and level["answered"] > 0 and level["errors"] == {}
    assert store["capacity_streams"] in (0, 2)
    assert "session store redis://127.0.0.1:" in (out / "server-redis.log").read_text()

