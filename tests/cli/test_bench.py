"""A short run of `rnnserve bench` on a tiny model: the output's format and that every
figure is there (not a speed)."""

from __future__ import annotations

import json
import math
import re

import pytest

from rnnserve.client.bench import CpuSampler, Level, median_closed, median_level
from rnnserve.client.load import LoadResult

from ..conftest import build_repo
from ..server.serving import metric_value
from .test_cli import assert_one_line_error, rnnserve


def test_bench_sweeps_levels_with_baselines_and_writes_json_and_plot(tmp_path) -> None:
    repo = build_repo(tmp_path)
    out = tmp_path / "bench"
    proc = rnnserve("bench", "--repo", str(repo), "--model", "feat", "--streams", "1,3",
                    "--duration-s", "1", "--out", str(out), "--baselines", "--load-procs", "2",
                    "--idle-sessions", "300", "--repeats", "2",
                    "--serve-arg=--intra-op-threads=1", timeout=240)
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
        assert 0 <= lv["start_skew_s"] < lv["duration_s"]  # 2 load processes
    # the started server's CPU per chunk over each level's window (a clock tick is 10 ms:
    # a level this small may show 0), none for a server without redis-servers
    assert all(lv["server_cpu_us_per_chunk"] >= 0 and lv["redis_cpu_us_per_chunk"] is None
               for lv in levels)
    assert sum(lv["server_cpu_us_per_chunk"] for lv in levels) > 0
    assert sum("[CPU per chunk: server " in x for x in lines) >= 2, lines
    within = [lv["latency_ms"]["p99"] <= 100 for lv in levels]
    assert report["capacity_streams"] == (3 if all(within) else 1 if within[0] else 0)
    sat = report["saturation"]
    assert sat["streams"] == 3 and sat["throughput"] > 0 and sat["latency_ms"]["p50"] > 0
    # two runs, the lower counting (the median of an even count)
    assert len(sat["throughput_repeats"]) == 2
    assert sat["throughput"] == min(sat["throughput_repeats"])
    # the started server's CPU per answered chunk: tens of microseconds at the least
    assert 20 < sat["server_cpu_us_per_chunk"] < 1e6
    assert report["load_generator"]["processes"] == 2
    base = report["baselines"]
    assert all(lv["server_cpu_us_per_chunk"] >= 0 for lv in base["transport"]["levels"])
    for name in ("transport", "unbatched"):
        assert [lv["streams"] for lv in base[name]["levels"]] == [1, 3]
        assert base[name]["capacity_streams"] in (0, 1, 3)
        assert all(lv["answered"] > 0 for lv in base[name]["levels"])
    ceiling = base["compute_ceiling"]
    assert ceiling["batch"] == 64 and ceiling["steps_per_s"] > 0
    assert 0 < ceiling["host_cpu_ms"] < 60 * ceiling["run_ms"]  # at most the machine's cores
    assert ceiling["streams"] == pytest.approx(ceiling["steps_per_s"] * 0.04)
    # the echo server in closed loop too, its CPU per chunk beside rnnserve's
    echo = base["transport"]["saturation"]
    assert echo["streams"] == 3 and echo["throughput"] > 0 and echo["errors"] == {}
    assert len(echo["throughput_repeats"]) == 2
    assert echo["throughput"] == min(echo["throughput_repeats"])
    assert echo["started"] > 1.7e9 and sat["started"] > 1.7e9
    assert 20 < echo["server_cpu_us_per_chunk"] < 1e6
    # the closed loops take turns: rnnserve's, the echo server's, rnnserve's, ...
    order = [m.group(1) or "rnnserve" for m in re.finditer(
        r"^(transport ceiling, )?closed loop \d/2, 3 streams: ", proc.stdout, re.M)]
    assert order == ["rnnserve", "transport ceiling, "] * 2, proc.stdout
    ratios = report["ratios"]
    assert set(ratios) == {"capacity_vs_transport", "capacity_vs_unbatched",
                           "saturation_vs_compute_ceiling", "saturation_vs_transport",
                           "server_cpu_vs_transport", "bounds"}
    # each round's two runs paired, the lower of the two rounds' ratios counting
    rounds = [round(a / b, 3) for a, b in zip(sat["throughput_repeats"],
                                               echo["throughput_repeats"], strict=True)]
    assert ratios["saturation_vs_transport"] == min(rounds)
    assert 0 < ratios["server_cpu_vs_transport"] < 1e3
    # a capacity whose every level passed is only a lower bound, and so are its ratios
    assert report["capacity_is_lower_bound"] == all(within)
    for name in ("transport", "unbatched"):
        capped = base[name]["capacity_is_lower_bound"]
        assert capped == (base[name]["capacity_streams"] == 3)
        want = {(False, False): "exact", (True, False): "at least",
                (False, True): "at most", (True, True): "unknown"}[
            (report["capacity_is_lower_bound"], capped)]
        assert ratios["bounds"][f"capacity_vs_{name}"] == want
    assert ratios["saturation_vs_compute_ceiling"] == round(
        sat["throughput"] / ceiling["steps_per_s"], 3)
    idle = report["idle_memory"]
    assert idle["sessions"] == 300 and idle["rss_before"] > 0 and idle["rss_after"] > 0
    assert idle["stepped"] == 300  # each holds its state, not the pool's zero row
    assert sat["errors"] == {}
    assert idle["raw_state_bytes"] == 300 * idle["state_bytes_per_session"] > 0
    assert idle["growth_vs_raw"] == round(idle["rss_growth"] / idle["raw_state_bytes"], 3)
    for line in ("transport ceiling", "rnnserve unbatched", "compute ceiling", "closed loop",
                 "300 idle sessions"):
        assert any(line in x for x in lines), line
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "server.log").exists() and (out / "echo.log").exists()


@pytest.mark.parametrize("many", ["0", "4", "packed"])
def test_bench_loads_the_version_it_names(server, tmp_path, many) -> None:
    """``--version 1`` of a model with two versions: every stream (one per call, and
    several per StreamMany or StreamPacked message) opens version 1, not the highest
    (the GPU runs measured the fp16 v2 of speech-small as "v1")."""
    def chunks(version: str) -> float:
        return metric_value(server.metrics(), "rnnserve_chunks_total", model="text",
                            version=version, code="OK")

    def requests(method: str) -> float:
        return metric_value(server.metrics(), "rnnserve_requests_total", method=method)

    before = chunks("1"), chunks("2")
    packed_before = requests("StreamPacked")
    how = ["--many", "4", "--packed"] if many == "packed" else ["--many", many]
    proc = rnnserve("bench", "--server", server.target, "--model", "text", "--version", "1",
                    "--streams", "4", "--duration-s", "1", "--load-procs", "1", *how,
                    "--no-plot", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "text v1 " in proc.stdout
    assert chunks("1") - before[0] >= 4 * 20 and chunks("2") == before[1]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["load_generator"]["rpc"] == {"0": "Stream", "4": "StreamMany",
                                               "packed": "StreamPacked"}[many]
    for lv in report["levels"]:
        assert lv["errors"] == {}
    # the packed streams' chunks went as StreamPacked requests (a stream per run)
    assert (requests("StreamPacked") > packed_before) == (many == "packed")


def test_bench_refuses_bad_arguments(tmp_path) -> None:
    proc = rnnserve("bench", "--server", "127.0.0.1:1", "--model", "x", "--streams", "1,a",
                    "--out", str(tmp_path))
    assert_one_line_error(proc, "--streams")
    proc = rnnserve("bench", "--model", "x")
    assert proc.returncode == 2 and "--server" in proc.stderr
    proc = rnnserve("bench", "--server", "127.0.0.1:1", "--model", "x", "--baselines")
    assert_one_line_error(proc, "--baselines", "--repo")
    proc = rnnserve("bench", "--server", "127.0.0.1:1", "--model", "x", "--connections",
                    "-1", "--out", str(tmp_path))
    assert_one_line_error(proc, "--connections")
    proc = rnnserve("bench", "--server", "127.0.0.1:1", "--model", "x", "--packed",
                    "--out", str(tmp_path))
    assert_one_line_error(proc, "--packed", "--many")
    proc = rnnserve("bench", "--repo", str(tmp_path), "--model", "x", "--baselines",
                    "--many", "4", "--packed", "--out", str(tmp_path))
    assert_one_line_error(proc, "--baselines", "--packed", "StreamMany")
    # the batch size the bench sets itself would be overridden without a word: in any
    # spelling the server reads (an abbreviation too)
    for flags in (["--serve-arg=--max-batch-size=1"], ["--serve-arg=--max-batch-s=1"],
                  ["--serve-arg=--max-batch-size", "--serve-arg=1"]):
        proc = rnnserve("bench", "--repo", str(tmp_path), "--model", "x", *flags,
                        "--out", str(tmp_path))
        assert_one_line_error(proc, "--serve-arg", "--max-batch-size N")
    # one it cannot read as serve would is one line too, not a usage text
    proc = rnnserve("bench", "--repo", str(tmp_path), "--model", "x",
                    "--serve-arg=--max-batch=8", "--out", str(tmp_path))
    assert_one_line_error(proc, "--serve-arg", "ambiguous option: --max-batch")
    # other server flags pass (the run then stops at the missing model)
    proc = rnnserve("bench", "--repo", str(tmp_path), "--model", "x",
                    "--serve-arg=--max-sessions=50000", "--serve-arg=--max-batch-delay-ms=5",
                    "--out", str(tmp_path))
    assert proc.returncode != 0 and "--serve-arg" not in proc.stderr, proc.stderr


def test_a_level_counts_its_median_repeat_and_every_repeats_errors() -> None:
    def level(p99: float, errors: dict[str, int] | None = None, unsent: int = 0) -> Level:
        return Level(4, 1.0, 100, 4, 0, unsent, errors or {}, 100.0,
                     {"p50": 1.0, "p90": 2.0, "p99": p99, "p99.9": p99, "max": p99}, 0.1)

    got = median_level([level(90.0), level(20.0), level(50.0, {"UNAVAILABLE": 2}, 3)])
    assert got.latency_ms["p99"] == 50.0 and got.p99_repeats == [90.0, 20.0, 50.0]
    assert got.errors == {"UNAVAILABLE": 2} and got.unsent == 3 and not got.within_budget
    clean = median_level([level(120.0), level(30.0), level(60.0), level(80.0)])
    assert clean.latency_ms["p99"] == 80.0 and clean.within_budget


def test_a_closed_loop_counts_its_median_run_and_every_runs_errors() -> None:
    def run(throughput: float, errors: dict[str, int] | None = None) -> tuple[Level, float]:
        return (Level(8, 1.0, 100, 8, 0, 0, errors or {}, throughput,
                      {"p50": 1.0, "p90": 2.0, "p99": 3.0, "p99.9": 3.0, "max": 3.0}, 0.1,
                      server_cpu_us_per_chunk=throughput / 100),
                1.8e9 + throughput)

    level, started = median_closed([run(300.0), run(100.0, {"INTERNAL": 1}), run(200.0)])
    assert (level.throughput, level.server_cpu_us_per_chunk, started) == \
        (200.0, 2.0, 1.8e9 + 200.0)
    assert level.errors == {"INTERNAL": 1}  # another run's, charged to the one that counts
    assert median_closed([run(400.0), run(100.0)])[0].throughput == 100.0  # the lower one
    assert median_closed([run(50.0)])[0].throughput == 50.0


def test_bench_compares_the_redis_session_store(tmp_path) -> None:
    repo = build_repo(tmp_path)
    out = tmp_path / "bench"
    proc = rnnserve("bench", "--repo", str(repo), "--model", "feat", "--streams", "1,2",
                    "--duration-s", "1", "--out", str(out), "--redis-store", "--no-plot",
                    "--repeats", "2", "--serve-arg=--intra-op-threads=1", "--redis-shards", "2",
                    timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "with the Redis session store:" in proc.stdout
    # the two servers take turns at each level, each level twice
    tags = re.findall(r"^ +(\d+) .*\[(\w+) (\d)/2\]$", proc.stdout, re.M)
    assert tags == [(n, name, r) for n in ("1", "2") for r in ("1", "2")
                    for name in ("rnnserve", "redis_store")], proc.stdout
    assert "median p99 ms per level: rnnserve 1: " in proc.stdout
    # the closed loop twice too, the lower of the two counting (the median of an even
    # count, as for throughput the cautious one)
    assert re.findall(r"^closed loop (\d)/2, 2 streams: ", proc.stdout, re.M) == ["1", "2"]
    assert "closed loops, the median run's chunks/s: rnnserve " in proc.stdout
    report = json.loads((out / "bench.json").read_text())
    sat = report["saturation"]
    assert len(sat["throughput_repeats"]) == 2
    assert sat["throughput"] == min(sat["throughput_repeats"]) > 0
    store = report["redis_store"]
    for levels in (report["levels"], store["levels"]):
        assert [lv["streams"] for lv in levels] == [1, 2]
        for lv in levels:
            assert lv["answered"] > 0 and lv["errors"] == {}
            assert lv["server_cpu_us_per_chunk"] >= 0
            assert len(lv["p99_repeats"]) == 2
            assert lv["latency_ms"]["p99"] == max(lv["p99_repeats"])  # the upper median
    # each level's redis-servers' CPU too, on the store only
    assert all(lv["redis_cpu_us_per_chunk"] is None for lv in report["levels"])
    assert all(lv["redis_cpu_us_per_chunk"] >= 0 for lv in store["levels"])
    assert store["capacity_streams"] in (0, 1, 2) and store["shards"] == 2
    # Redis's CPU per chunk, each shard's (a clock tick is 10 ms: small runs may show 0)
    assert len(store["redis_cpu_us_per_chunk_each"]) == 2
    assert store["redis_cpu_us_per_chunk"] == pytest.approx(
        sum(store["redis_cpu_us_per_chunk_each"]), abs=0.02)
    assert re.search(r"^redis-server CPU per chunk answered on the store: [0-9.]+ us "
                     r"\([0-9.]+ \+ [0-9.]+\) over \d+ chunks$", proc.stdout, re.M), proc.stdout
    said = (out / "server-redis.log").read_text()
    assert re.search(r"session store redis://127.0.0.1:\d+/0,redis://127.0.0.1:\d+/0 \(2 "
                     "shards", said), said



def test_bench_soaks_and_reports_windows_and_memory(tmp_path) -> None:
    repo = build_repo(tmp_path)
    out = tmp_path / "bench"
    proc = rnnserve("bench", "--repo", str(repo), "--model", "feat", "--streams", "2",
                    "--duration-s", "1", "--out", str(out), "--no-plot", "--soak-s", "5",
                    "--soak-streams", "3", "--serve-arg=--intra-op-threads=1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^soak: 3 streams for 5 s: \d+ chunks, errors none; p99 per 30 s window "
                     r"\d+ ms; server memory \d+ -> \d+ MiB \(max \d+\): (ok|NOT ok)$",
                     proc.stdout, re.M), proc.stdout
    s = json.loads((out / "bench.json").read_text())["soak"]
    assert s["streams"] == 3 and s["errors"] == {} and s["answered"] > 0
    assert len(s["windows"]) == 1 and s["windows"][0]["chunks"] == s["answered"]
    assert s["memory"]["samples"] >= 1 and s["memory"]["max_mib"] > 10


def test_bench_sends_many_streams_per_message_to_several_workers(tmp_path) -> None:
    repo = build_repo(tmp_path)
    out = tmp_path / "bench"
    proc = rnnserve("bench", "--repo", str(repo), "--model", "feat", "--streams", "3,8",
                    "--duration-s", "1", "--out", str(out), "--no-plot", "--many", "4",
                    "--connections", "2", "--serve-arg=--workers=2",
                    "--serve-arg=--intra-op-threads=1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["load_generator"]["streams_per_message"] == 4
    assert report["load_generator"]["connections"] == 2
    assert report["load_generator"]["spread"] is True
    # two load processes, one group of 4 each at 8 streams: one group on each worker (at
    # 3 streams the second process has 1 stream, so 1 connection, placed by the kernel)
    spread = [lv["worker_streams"] for lv in report["levels"]]
    assert len(spread[0]) == 2 and sum(spread[0]) == 3 and spread[1] == [4, 4]
    for lv in report["levels"]:
        # every stream's chunk each tick, its session opened in the item of its first
        assert 20 * lv["streams"] <= lv["answered"] <= 26 * lv["streams"]
        assert lv["errors"] == {} and lv["sessions"] == lv["streams"]
    assert "[worker 1]" in (out / "server.log").read_text()
    # counted over the worker processes too (the supervisor alone answers nothing)
    assert report["saturation"]["server_cpu_us_per_chunk"] > 20


def test_bench_opens_a_connection_per_worker_unless_told(tmp_path) -> None:
    """Without --connections the load processes open one connection per worker process
    of the server (its ListModels answer says how many), spread one to each: every
    worker gets load. With one connection per process, as before, two processes could
    leave workers of a bigger server idle."""
    repo = build_repo(tmp_path)
    out = tmp_path / "bench"
    proc = rnnserve("bench", "--repo", str(repo), "--model", "feat", "--streams", "8",
                    "--duration-s", "1", "--out", str(out), "--no-plot", "--many", "2",
                    "--serve-arg=--workers=2", "--serve-arg=--intra-op-threads=1",
                    timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 load process(es) with 2 connection(s) each" in proc.stdout
    report = json.loads((out / "bench.json").read_text())
    assert report["load_generator"]["connections"] == 2
    assert report["levels"][0]["worker_streams"] == [4, 4]
    assert report["levels"][0]["errors"] == {}


def test_the_cli_offers_every_reference_workload() -> None:
    """The parser lists the workloads without importing the bench (numpy, grpc): the
    two lists must not drift apart."""
    from rnnserve.cli import build_parser
    from rnnserve.client.bench import WORKLOADS

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    (workload,) = [a for a in bench._actions if a.dest == "workload"]
    assert sorted(workload.choices) == sorted(WORKLOADS)


def test_loop_cost_measures_this_build_against_another(repo, tmp_path) -> None:
    """scripts/loop_cost.py: the loop's CPU per StreamMany item, in process, for a
    tensor model and a text model, this checkout in turns with another (here a copy
    of this one, laid out from its own folders)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    other = tmp_path / "other"
    for name in ("rnnserve", "training", "export", "server", "client", "protos"):
        shutil.copytree(root / name, other / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for model in ("feat", "text"):
        run = subprocess.run([sys.executable, str(root / "scripts" / "loop_cost.py"),
                              "--repo", str(repo), "--model", model, "--groups", "2",
                              "--per", "4", "--rounds", "4", "--repeats", "1",
                              "--against", str(other)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        lines = run.stdout.strip().splitlines()
        assert lines[0].startswith(f"this ({root})") and f"against ({other})" in lines[1]
        m = re.search(r"this ([0-9.]+) us, against ([0-9.]+) us; this / against", lines[-1])
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, lines
        assert "(8 items)" in lines[0]  # 2 streams x 4 sessions x (4 - 3 warm-up) rounds
    # the two RPCs of this build in turns
    run = subprocess.run([sys.executable, str(root / "scripts" / "loop_cost.py"),
                          "--repo", str(repo), "--model", "feat", "--groups", "2",
                          "--per", "4", "--rounds", "4", "--repeats", "1",
                          "--rpc", "many,packed"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("this many") and lines[1].startswith("this packed"), lines
    assert "(8 items)" in lines[1]
    assert re.search(r"this many [0-9.]+ us, this packed [0-9.]+ us$", lines[-1]), lines
    # packed, both builds, on the shared store (two redis-servers started per run)
    run = subprocess.run([sys.executable, str(root / "scripts" / "loop_cost.py"),
                          "--repo", str(repo), "--model", "feat", "--groups", "2",
                          "--per", "4", "--rounds", "4", "--repeats", "1", "--rpc", "packed",
                          "--store", "redis", "--shards", "2", "--against", str(other)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    for line in lines[:2]:
        # (8 items may take less than one clock tick of redis-server's CPU)
        assert re.search(r"redis-server CPU [0-9.]+ us \([0-9.]+ \+ [0-9.]+\) \(8 items\)",
                         line), lines
    assert "this / against" in lines[-1], lines


def test_capacity_is_the_top_of_the_levels_that_all_passed() -> None:
    """A level that passes above one that failed (by the luck of a run) is not the
    capacity: a fleet sized from it would run where a smaller load failed."""
    from rnnserve.client.bench import Level, capacity, capacity_capped

    def level(streams: int, p99: float, errors: int = 0) -> Level:
        return Level(streams, 1.0, 10 * streams, streams, 0, 0,
                     {"UNAVAILABLE": errors} if errors else {}, 10.0 * streams,
                     {"p50": 1.0, "p90": 1.0, "p99": p99, "p99.9": p99, "max": p99}, 0.1)

    assert capacity([level(32, 40), level(64, 150), level(96, 90)]) == 32
    assert capacity([level(96, 90), level(32, 40), level(64, 80)]) == 96  # any order
    assert capacity([level(32, 40), level(64, 50, errors=1), level(96, 60)]) == 32
    assert capacity([level(1, 120), level(4, 30)]) == 0
    assert capacity([]) == 0
    assert capacity_capped([level(32, 40), level(96, 90)])  # the top passed: at least 96
    assert not capacity_capped([level(32, 40), level(64, 150), level(96, 90)])
    assert not capacity_capped([level(1, 120)]) and not capacity_capped([])


def test_a_load_process_that_started_late_is_recorded_as_the_levels_skew() -> None:
    """Load processes start together at a shared time; one that connected after it
    starts late and the load overlaps for less than the level's duration: the level
    says by how much (and the bench prints a note past 5% of the duration)."""
    from rnnserve.client.bench import summarize
    from rnnserve.client.load import LoadResult

    first = LoadResult(latencies=[0.01], times=[0.0], sessions=1, started=100.0,
                       latest_start=100.0, ended=102.0)
    late = LoadResult(latencies=[0.02], times=[0.0], sessions=1, started=100.4,
                      latest_start=100.4, ended=102.4)
    merged = LoadResult()
    for part in (late, first):
        merged.merge(part)
    level = summarize(2, 2.0, merged)
    assert level.start_skew_s == 0.4 and merged.started == 100.0
    assert summarize(1, 2.0, first).start_skew_s == 0.0
    # times count from the first start once merged: the late process's chunk was due
    # 0.4 s into the level
    assert sorted(merged.times) == [0.0, pytest.approx(0.4)]
    empty = LoadResult()
    empty.merge(first)
    first.merge(LoadResult())  # an empty part moves nothing
    assert empty.started == first.started == 100.0
    assert summarize(1, 2.0, first).start_skew_s == 0.0
    # a level stands for its repeats with the most skew of any
    from dataclasses import replace

    from rnnserve.client.bench import median_level

    repeats = [replace(level, start_skew_s=k) for k in (0.0, 0.9, 0.1)]
    assert median_level(repeats).start_skew_s == 0.9


def test_cpu_per_chunk_is_what_the_processes_used_in_the_window() -> None:
    import subprocess
    import sys

    # a process busy all along: 0.3 s in the window, 0.25 s before and after it; it
    # says when the window opened and closed, and the CPU it had used by then
    spinner = """
import time
def spin(s):
    until = time.time() + s
    while time.time() < until:
        pass
    print(time.time(), time.process_time(), flush=True)
spin(0.25); spin(0.3); spin(0.25)
"""
    proc = subprocess.Popen([sys.executable, "-c", spinner], stdout=subprocess.PIPE,
                            text=True)
    with CpuSampler(proc.pid, every_s=0.02) as cpu:
        marks = [tuple(map(float, line.split())) for line in proc.stdout]  # type: ignore[union-attr]
        assert proc.wait() == 0
    (started, at_start), (ended, at_end), (_, last) = marks
    result = LoadResult(latencies=[0.01] * 1000, started=started, ended=ended)
    # the CPU it used in the window over 1,000 chunks (about 300 us each; the whole
    # run's about 800), give or take a clock tick at each end and the interpolation
    # between samples; against its own CPU time, not the wall, which a busy machine
    # would not give it all of
    window = (at_end - at_start) * 1e3
    assert abs(cpu.per_chunk(result) - window) <= 30
    assert last * 1e3 > 2 * window
    with CpuSampler() as none:  # no process: nothing sampled, nothing told
        pass
    assert none.per_chunk(result) is None
    assert cpu.per_chunk(LoadResult(started=started, ended=ended)) is None  # no answers
