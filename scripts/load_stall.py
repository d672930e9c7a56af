"""How long answers wait while ``serve --repo-poll-s`` loads a large model version: one
client steps a session back to back (a 40 ms PCM16 chunk per unary ``Step``) while a
version padded to ``--pad-mb`` MB (the model's graph plus an unused initializer) is
moved into the repository; the slowest answers while it loads, against those before.

    python scripts/load_stall.py --repo runs/workloads/speech-small [--model NAME]
        [--pad-mb 200] [--rounds 3] [--against DIR] [--in-process]

``--against DIR``: another checkout of rnnserve (``git worktree add /tmp/base REV``);
the builds take turns, each round a fresh server, and the medians are compared. The
server runs on the CPU; traffic stays on 127.0.0.1.
``--in-process``: no server; in one process, how late an asyncio loop runs a callback
another thread asks for every 3 ms while the version is loaded as the poller loads it
(``prepared_apart`` then ``ModelRuntime``) and, in turns, as at the start (the file
parsed in this process), each round a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_cost import _lay_out  # noqa: E402  (the script's neighbour, not a package)

CHUNK = bytes(2 * 640)  # 40 ms of 16 kHz PCM16 silence


def padded(src: Path, dst: Path, mb: int) -> None:
    """``src`` with an unused float32 initializer of ``mb`` MiB: as large to parse and
    write as a model of that size (onnxruntime drops it when it builds the session)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    pad = np.random.default_rng(0).random(mb * 2**18, dtype=np.float32)
    model.graph.initializer.append(numpy_helper.from_array(pad, "load_stall_pad"))
    dst.parent.mkdir(parents=True)
    onnx.save(model, str(dst))


def one_round(python_path: str, repo: Path, model: str, big: Path, work: Path
              ) -> dict[str, Any]:
    from rnnserve.client import Client

    served = work / "models"
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(repo / model / "1", served / model / "1")
    log = (work / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": python_path}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnserve", "serve", "--repo", str(served), "--device", "cpu",
         "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
         "--repo-poll-s", "0.2"], stdout=subprocess.PIPE, stderr=log, env=env, text=True,
        cwd=work)  # not a checkout: its rnnserve/ would go before PYTHONPATH's
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["grpc_port"]
        answers: list[tuple[float, float]] = []  # (sent at, seconds)
        stop = threading.Event()

        def step() -> None:
            with Client(f"127.0.0.1:{port}", timeout=30) as client:
                sid = client.open_session(model).session_id
                seq = 0
                while not stop.is_set():
                    sent = time.perf_counter()
                    client.step(sid, seq, CHUNK, pcm16=True)
                    answers.append((sent, time.perf_counter() - sent))
                    seq += 1

        stepper = threading.Thread(target=step)
        stepper.start()
        time.sleep(2.0)
        moved = time.perf_counter()
        staging = work / "staging"
        shutil.copytree(big.parent, staging)
        os.rename(staging, served / model / "2")
        while f"serving {model} version 2" not in (work / "server.log").read_text():
            if time.perf_counter() - moved > 120:
                raise RuntimeError("version 2 not served: " +
                                   (work / "server.log").read_text()[-2000:])
            time.sleep(0.05)
        loaded = time.perf_counter()
        time.sleep(0.5)
        stop.set()
        stepper.join()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    before = sorted(s for t, s in answers if t < moved)
    during = sorted(s for t, s in answers if moved <= t <= loaded)
    return {"before_p99_ms": _p99_ms(before), "before_max_ms": 1000 * before[-1],
            "during_max_ms": 1000 * during[-1], "during_p99_ms": _p99_ms(during),
            "load_s": loaded - moved, "answers_during": len(during)}


def _p99_ms(ordered: list[float]) -> float:
    return 1000 * ordered[int(0.99 * (len(ordered) - 1))]


def _print_medians(label: str, results: dict[str, list[dict[str, Any]]]) -> None:
    """One JSON line per entry of ``results``: the median of each figure of its rounds."""
    for name, rounds in results.items():
        print(json.dumps({label: name, "median": {
            k: round(statistics.median(x[k] for x in rounds), 3) for k in rounds[0]}}))


def loop_lag(path: Path, apart: bool) -> dict[str, Any]:
    """The latest callback while ``path`` loads: a thread asks the event loop for one
    every 3 ms (as a request arriving would) and times how long it waits."""
    import asyncio

    from rnnserve.server.runtime import ModelRuntime, RuntimeOptions

    async def measure() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        waits: list[float] = []
        stop = threading.Event()

        def ping() -> None:
            while not stop.is_set():
                done, asked = threading.Event(), time.perf_counter()
                loop.call_soon_threadsafe(done.set)
                done.wait()
                waits.append(time.perf_counter() - asked)
                time.sleep(0.003)

        pinger = threading.Thread(target=ping)
        pinger.start()
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        options = RuntimeOptions(device="cpu")
        if apart:
            from rnnserve.server.prepare import prepared_apart

            async with prepared_apart(path) as prepared:
                await loop.run_in_executor(None, ModelRuntime, path, "m", 2, options,
                                           prepared)
        else:
            await loop.run_in_executor(None, ModelRuntime, path, "m", 2, options)
        took = time.perf_counter() - started
        stop.set()
        await asyncio.to_thread(pinger.join)  # it may wait on this loop meanwhile
        return {"load_s": took, "worst_wait_ms": 1000 * max(waits), "pings": len(waits)}

    return asyncio.run(measure())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--model", default="")
    p.add_argument("--pad-mb", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--against", type=Path, default=None)
    p.add_argument("--in-process", action="store_true")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # PATH apart|here: a round
    args = p.parse_args()
    if args.one:
        print(json.dumps(loop_lag(Path(args.one[0]), args.one[1] == "apart")))
        return
    model = args.model or next(d.name for d in sorted(args.repo.iterdir()) if d.is_dir())
    with tempfile.TemporaryDirectory(prefix="load-stall-") as tmp:
        work = Path(tmp)
        big = work / "big" / "model.onnx"
        padded(args.repo / model / "1" / "model.onnx", big, args.pad_mb)
        if args.in_process:  # this build (the installed one) only: its two load paths
            lags: dict[str, list[dict[str, Any]]] = {"apart": [], "here": []}
            for r in range(args.rounds):
                for how in lags:
                    out = subprocess.run([sys.executable, __file__, "--repo", "-", "--one",
                                          str(big), how], check=True, text=True,
                                         capture_output=True, cwd=work).stdout
                    lags[how].append(json.loads(out.splitlines()[-1]))
                    print(json.dumps({"round": r, "load": how, **lags[how][-1]}), flush=True)
            _print_medians("load", lags)
            return
        builds = {"this": Path(__file__).resolve().parent.parent}
        if args.against is not None:
            builds["against"] = args.against.resolve()
        paths = {}
        for name, root in builds.items():
            (work / name).mkdir()
            _lay_out(root, work / name)
            paths[name] = str(work / name)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in builds}
        for r in range(args.rounds):
            for name in builds:
                got = one_round(paths[name], args.repo, model, big, work)
                results[name].append(got)
                print(json.dumps({"round": r, "build": name, **got}), flush=True)
        _print_medians("build", results)


if __name__ == "__main__":
    main()
