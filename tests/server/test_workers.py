"""``rnnserve serve --workers N``: several real server processes on one port, their
metrics gathered by the supervising process, restarted when they die, drained together."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve.client import OWN_CONNECTION, AsyncClient, Client
from rnnserve.server.settings import Settings
from rnnserve.server.workers import SCRAPE_BUDGET_S, WorkerScrape, worker_settings

from ..monitoring.prom import promtool
from .serving import ServerProcess, launch_server, metric_value, start_server
from .test_grpc_api import mixed_jobs, whole_run


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by a parent that died) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # reaped meanwhile
        return False


def wait_until(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.1)


def run_server(repo: Path, log: Path, *flags: str, timeout: float = 60
               ) -> tuple[int, str, str]:
    """launch_server to its end: its exit status, stdout and stderr (the log)."""
    proc = launch_server(repo, log, *flags)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, log.read_text()


def stream_jobs(target: str, jobs) -> list[np.ndarray]:
    """Each job on its own connection (so that the kernel spreads them over the
    workers), all at once; the concatenated outputs."""

    async def one(name: str, x: np.ndarray, cuts: list[int]) -> np.ndarray:
        async with AsyncClient(target, timeout=20, options=OWN_CONNECTION) as client:
            ys = []
            async with client.stream(name) as s:
                for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                    ys.append((await s.send(x[a:b], end=b == len(x)))["logits"])
            return np.concatenate(ys)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(one(*job) for job in jobs))

    return asyncio.run(main())


@pytest.fixture
def workers(repo, tmp_path):
    srv = start_server(repo, tmp_path / "workers.log", "--workers", "2",
                       "--max-batch-delay-ms", "5", "--shutdown-grace-s", "5")
    yield srv
    srv.stop()
    for pid in srv.workers:
        wait_until(f"worker {pid} gone", lambda pid=pid: not alive(pid), 20)


def test_workers_share_the_port_and_answer_exactly(workers: ServerProcess, repo,
                                                   tmp_path: Path) -> None:
    assert len(workers.workers) == 2 and all(alive(pid) for pid in workers.workers)
    jobs = mixed_jobs(np.random.default_rng(11), 24, 40)
    results = stream_jobs(workers.target, jobs)
    for (name, x, cuts), y in zip(jobs, results, strict=True):
        want = whole_run(repo, name, 2 if name == "text" else 1, x)
        assert np.abs(y - want).max() <= 1e-5, f"{name} with cuts {cuts}"

    text = workers.metrics()
    # 24 connections: both workers took some (all on one: probability 2^-23)
    started = [metric_value(text, "rnnserve_sessions_started_total", worker=str(w))
               for w in (0, 1)]
    assert min(started) > 0 and sum(started) == 24, started
    steps = sum(len(c) - 1 for _, _, c in jobs)
    assert metric_value(text, "rnnserve_chunk_latency_seconds_count") == steps
    assert metric_value(text, "rnnserve_chunks_total", code="OK") == steps
    for w in ("0", "1"):
        assert metric_value(text, "rnnserve_worker_up", worker=w) == 1
        assert metric_value(text, "rnnserve_worker_restarts_total", worker=w) == 0
        assert metric_value(text, "rnnserve_model_info", worker=w, model="feat") == 1
    assert metric_value(text, "rnnserve_state_pool_rows") == 0  # every row came back
    # one family per name with the workers' series side by side: valid exposition
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked.stdout

    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(20) == 0
    for pid in workers.workers:
        wait_until(f"worker {pid} gone", lambda pid=pid: not alive(pid), 5)
    log = workers.log.read_text()
    assert log.count("[worker 0]: stopped") == 1 and log.count("[worker 1]: stopped") == 1
    assert "Traceback" not in log


def test_clients_spread_their_connections_evenly_over_the_workers(
        workers: ServerProcess, server) -> None:
    """open_spread: each worker holds its share of the connections (the kernel's hash
    alone loaded one worker 2.5 times the mean in a bench), in turns; a session opened
    on each is counted by the worker the client said. A server of one process says 0/1."""
    x = np.zeros((2, 20), np.float32)

    async def main(target: str, n: int) -> tuple[list[int], list[tuple[int, int] | None]]:
        placed = await AsyncClient.open_spread(target, n, timeout=30)
        try:
            seen = [await c.worker() for c, _ in placed]
            for c, _ in placed:
                async with c.stream("feat") as s:
                    await s.send(x, end=True)
        finally:
            for c, _ in placed:
                await c.close()
        return [i for _, i in placed], seen

    before = [metric_value(workers.metrics(), "rnnserve_sessions_started_total", worker=w)
              for w in "01"]
    order, seen = asyncio.run(main(workers.target, 6))
    assert order == [0, 1, 0, 1, 0, 1] and seen == [(i, 2) for i in order]
    text = workers.metrics()
    after = [metric_value(text, "rnnserve_sessions_started_total", worker=w) for w in "01"]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3]
    assert asyncio.run(main(server.target, 3)) == ([0, 0, 0], [(0, 1)] * 3)


def test_a_session_lives_in_its_worker_and_elsewhere_the_error_says_so(
        workers: ServerProcess) -> None:
    with Client(workers.target, timeout=10, options=OWN_CONNECTION) as first:
        sid = first.open_session("text").session_id
        first.step(sid, 0, "held here")
    outcomes: list[str] = []
    for _ in range(40):  # each a new connection: either worker (all one: 2^-40)
        with Client(workers.target, timeout=10, options=OWN_CONNECTION) as other:
            try:
                info = other.open_session("text", session_id=sid, resume=True)
                assert info.next_seq == 1
                outcomes.append("OK")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc.details()
                outcomes.append(exc.details())
        if "OK" in outcomes and len(set(outcomes)) > 1:
            break
    refused = [o for o in outcomes if o != "OK"]
    assert "OK" in outcomes and refused, outcomes
    assert "a session lives in the worker process that opened it" in refused[0]
    assert "--session-store" in refused[0] and "of 2" in refused[0]


def test_a_killed_worker_is_started_again_and_the_others_serve_on(
        workers: ServerProcess, repo) -> None:
    victim = workers.workers[1]
    os.kill(victim, signal.SIGKILL)
    wait_until("worker 1 restarted and up", lambda: metric_value(
        workers.metrics(), "rnnserve_worker_restarts_total", worker="1") == 1 and
        metric_value(workers.metrics(), "rnnserve_worker_up", worker="1") == 1)
    assert workers.proc.poll() is None
    jobs = mixed_jobs(np.random.default_rng(12), 16, 30)
    for (name, x, _), y in zip(jobs, stream_jobs(workers.target, jobs), strict=True):
        assert np.abs(y - whole_run(repo, name, 2 if name == "text" else 1, x)).max() <= 1e-5
    text = workers.metrics()
    assert metric_value(text, "rnnserve_sessions_started_total", worker="1") > 0
    log = workers.log.read_text()
    assert "worker 1 (pid" in log and "exited with status -9" in log


def test_workers_drain_themselves_when_the_supervisor_is_killed(repo, tmp_path) -> None:
    srv = start_server(repo, tmp_path / "w.log", "--workers", "2")
    srv.proc.kill()
    srv.proc.wait(5)
    for pid in srv.workers:
        wait_until(f"orphaned worker {pid} gone", lambda pid=pid: not alive(pid), 20)
    assert (tmp_path / "w.log").read_text().count("stopped") == 2


def test_a_worker_that_cannot_start_stops_the_server_with_its_error(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    code, out, err = run_server(tmp_path / "empty", tmp_path / "empty.log", "--workers", "3")
    assert code == 1, err
    assert out == ""  # never ready
    assert "rnnserve serve: error: [worker 0] no models in" in err
    assert "Traceback" not in err


def test_ports_another_server_holds_are_refused_in_one_line(workers: ServerProcess,
                                                            repo, tmp_path) -> None:
    # a lone server must not share the gRPC port of another (gRPC would allow it)
    code, _, err = run_server(repo, tmp_path / "lone.log", "--grpc-port",
                              str(workers.grpc_port))
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{workers.grpc_port}: the port is taken" in err
    for flags in ([], ["--workers", "2"]):
        code, _, err = run_server(repo, tmp_path / "taken.log", *flags, "--metrics-port",
                                  str(workers.metrics_port))
        assert code == 1, err
        assert f"cannot serve metrics on 127.0.0.1:{workers.metrics_port}: Address already " \
            "in use" in err, err
        assert "Traceback" not in err and "internal error" not in err


def test_worker_settings_share_the_port_and_split_the_cores() -> None:
    cpus = os.cpu_count() or 1
    s = worker_settings(Settings(workers=4, grpc_port=0), 4242)
    assert (s.workers, s.grpc_port) == (1, 4242)
    assert s.intra_op_threads == max(1, cpus // 4)
    kept = worker_settings(Settings(workers=4, intra_op_threads=3), 1)
    assert kept.intra_op_threads == 3


@pytest.mark.parametrize("age_s", [0.0, 0.4])
def test_connections_past_their_age_reconnect_and_spread_over_the_workers(
        repo, tmp_path, age_s) -> None:
    """One client connection: without --max-connection-age-s all its calls reach the
    worker it first connected to; with it, the server's GOAWAY makes the client
    reconnect, and its new streams reach both workers, while a session's stream open
    across many GOAWAYs goes on, exact."""
    flags = ["--max-connection-age-s", str(age_s)] if age_s else []
    srv = start_server(repo, tmp_path / "age.log", "--workers", "2",
                       "--max-batch-delay-ms", "2", *flags)
    rng = np.random.default_rng(12)
    long_x = rng.standard_normal((30, 20)).astype(np.float32)
    short_x = rng.standard_normal((3, 20)).astype(np.float32)

    async def main() -> tuple[np.ndarray, int]:
        async with AsyncClient(srv.target, timeout=20, options=OWN_CONNECTION) as client:
            async def long_stream() -> np.ndarray:
                ys = []
                async with client.stream("feat") as s:
                    for k in range(30):  # 6 s on one stream
                        ys.append((await s.send(long_x[k:k + 1], end=k == 29))["logits"])
                        await asyncio.sleep(0.2)
                return np.concatenate(ys)

            async def short_streams() -> int:
                n = 0
                deadline = time.monotonic() + 5.5
                while time.monotonic() < deadline:
                    async with client.stream("feat") as s:
                        await s.send(short_x, end=True)
                    n += 1
                    await asyncio.sleep(0.1)
                return n

            y, n = await asyncio.gather(long_stream(), short_streams())
            return y, n

    try:
        y, n = asyncio.run(main())
        text = srv.metrics()
    finally:
        assert srv.stop() == 0
    assert float(np.abs(y - whole_run(repo, "feat", 1, long_x)).max()) <= 1e-5
    started = [metric_value(text, "rnnserve_sessions_started_total", worker=w)
               for w in ("0", "1")]
    assert sum(started) == n + 1 and n > 20
    if age_s:  # ~13 reconnects: all on one worker has probability 2^-13
        assert min(started) > 0, started
    else:
        assert min(started) == 0, started


def _workers_of(pid: int) -> list[int]:
    """The worker processes a supervisor started: spawned ones, past their exec (a child
    between its fork and exec still shows the supervisor's command line, and may be
    multiprocessing's resource tracker on its way)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmd:
                found.append(int(child))
    return found


def test_worker_metrics_are_gathered_with_a_proxy_in_the_environment(repo, tmp_path) -> None:
    no_proxy = {"http_proxy": "", "HTTP_PROXY": "", "no_proxy": "", "NO_PROXY": ""}
    srv = start_server(repo, tmp_path / "proxy.log", "--workers", "2",
                       env={**no_proxy, "http_proxy": "http://127.0.0.1:9",
                            "HTTP_PROXY": "http://127.0.0.1:9"})
    try:
        text = srv.metrics()
        for w in ("0", "1"):
            assert metric_value(text, "rnnserve_worker_up", worker=w) == 1
            assert metric_value(text, "rnnserve_model_info", worker=w, model="feat") == 1
    finally:
        assert srv.stop() == 0


def test_a_worker_that_dies_mid_response_is_left_out_of_the_scrape() -> None:
    """A worker's /metrics cut short (it died while answering) is that worker's
    series left out, not an error for the whole /metrics."""
    bodies = [b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n# TYPE a gauge\na 1\n",
              b"HTTP/1.0 200 OK\r\n\r\n# TYPE a gauge\na{x=\"1",
              b"HTTP/1.0 200 OK\r\n\r\n# TYPE a gauge\na 2\n"]
    servers = []
    for body in bodies:
        s = socket.create_server(("127.0.0.1", 0))
        servers.append(s)

        def answer(s: socket.socket = s, body: bytes = body) -> None:
            conn, _ = s.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(body)

        threading.Thread(target=answer, daemon=True).start()
    ports = {i: s.getsockname()[1] for i, s in enumerate(servers)}
    try:
        families = list(WorkerScrape(lambda: ports, len(ports)).collect())
    finally:
        for s in servers:
            s.close()
    assert [(f.name, [(x.labels, x.value) for x in f.samples]) for f in families] == [
        ("a", [({"worker": "2"}, 2.0)])]


def test_workers_that_do_not_answer_are_left_out_within_the_scrape_budget() -> None:
    """Hung workers (the kernel accepts their connections, nobody answers), more of
    them than a pool of 4 threads, and one whose body trickles in (each read well within
    a socket timeout) are left out, and the scrape ends within SCRAPE_BUDGET_S (half
    the ServiceMonitor's scrapeTimeout, tests/deploy) with the worker that answered."""
    hung = [socket.create_server(("127.0.0.1", 0)) for _ in range(6)]  # never accept
    trickle, answers = socket.create_server(("127.0.0.1", 0)), socket.create_server(
        ("127.0.0.1", 0))
    done = threading.Event()

    def trickling() -> None:
        conn, _ = trickle.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n# TYPE b gauge\n")
            until = time.monotonic() + 10  # a bound for a scrape that waits for it all
            while not done.wait(0.1) and time.monotonic() < until:
                conn.sendall(b"#")

    def answering() -> None:
        conn, _ = answers.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n# TYPE a gauge\na 2\n")

    for target in (trickling, answering):
        threading.Thread(target=target, daemon=True).start()
    servers = [*hung, trickle, answers]
    ports = {i: s.getsockname()[1] for i, s in enumerate(servers)}
    try:
        began = time.monotonic()
        families = list(WorkerScrape(lambda: ports, len(ports)).collect())
        took = time.monotonic() - began
    finally:
        done.set()
        for s in servers:
            s.close()
    assert took < SCRAPE_BUDGET_S + 0.5, took
    assert [(f.name, [(x.labels, x.value) for x in f.samples]) for f in families] == [
        ("a", [({"worker": "7"}, 2.0)])]


def test_a_worker_killed_while_it_starts_is_reported(repo, tmp_path) -> None:
    log = tmp_path / "killed.log"
    proc = launch_server(repo, log, "--workers", "2")
    wait_until("worker 0 started", lambda: _workers_of(proc.pid), 30)
    (victim,) = _workers_of(proc.pid)
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(30) == 1
    assert proc.stdout is not None and proc.stdout.read() == ""
    assert f"worker 0 (pid {victim}) died during start (signal 9)" in log.read_text()


def test_a_worker_dead_at_the_stop_sets_the_exit_status(workers: ServerProcess) -> None:
    os.kill(workers.workers[1], signal.SIGKILL)
    workers.proc.send_signal(signal.SIGTERM)  # before it is started again
    assert workers.proc.wait(30) == 1
    assert "rnnserve-worker-1 (pid" in workers.log.read_text()


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_a_stop_signal_while_the_workers_load_drains_them(repo, tmp_path, how) -> None:
    log = tmp_path / "early.log"
    proc = launch_server(repo, log, "--workers", "2", start_new_session=True)
    wait_until("worker 0 started", lambda: _workers_of(proc.pid), 30)
    (first,) = _workers_of(proc.pid)  # just started: importing, then loading
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:  # the terminal sends it to the whole process group
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    wait_until("worker gone", lambda: not alive(first), 10)
    text = log.read_text()
    assert "[worker 0]: stopped" in text and "Traceback" not in text, text[-3000:]


def test_a_stop_signal_while_a_worker_starts_again_drains_it(workers: ServerProcess) -> None:
    os.kill(workers.workers[1], signal.SIGKILL)
    wait_until("worker 1 started again", lambda: "started again" in workers.log.read_text())
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(30) == 0, workers.log.read_text()[-3000:]
    assert workers.log.read_text().count("[worker 1]: stopped") == 1


def test_the_supervisor_exports_no_created_series(workers: ServerProcess) -> None:
    text = workers.metrics()
    assert "_created" not in text, [x for x in text.splitlines() if "_created" in x]


def test_a_second_supervisor_on_the_port_is_refused_in_one_line(repo, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = start_server(repo, tmp_path / "first.log", "--workers", "2",
                         "--grpc-port", str(port))
    try:
        code, out, err = run_server(repo, tmp_path / "second.log", "--grpc-port", str(port),
                                    "--workers", "2")
        assert code == 1, err
        assert out == ""
        assert err.strip().splitlines() == [
            f"rnnserve serve: error: cannot listen on 127.0.0.1:{port}: the port is taken "
            "(another server?)"], err
        # the first serves on, alone
        assert metric_value(first.metrics(), "rnnserve_worker_up") == 2
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize(("first", "host", "kind"), [
    ("127.0.0.2", "0.0.0.0", "lone"), ("127.0.0.2", "0.0.0.0", "workers"),
    ("0.0.0.0", "127.0.0.2", "workers")])
def test_a_port_served_on_an_overlapping_address_is_refused_in_one_line(
        repo, tmp_path, first, host, kind) -> None:
    """One server on a single address of the host and the next on all of them (or the
    reverse) share a port with SO_REUSEPORT (the first's workers), or the workers find
    it taken only once they loaded (a lone first); the supervisor refuses it at once,
    also when the first's lock file is elsewhere (another XDG_RUNTIME_DIR)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    srv = start_server(repo, tmp_path / "first.log", "--host", first, "--grpc-port",
                       str(port), *(["--workers", "2"] if kind == "workers" else []),
                       env={"XDG_RUNTIME_DIR": str(elsewhere)})
    try:
        code, out, err = run_server(repo, tmp_path / "second.log", "--host", host,
                                    "--grpc-port", str(port), "--workers", "2", timeout=30)
        assert code == 1, err
        assert out == ""
        assert err.strip().splitlines() == [
            f"rnnserve serve: error: cannot listen on {host}:{port}: the port is taken "
            "(another server?)"], err
        # the first serves on
        reach = first if first != "0.0.0.0" else "127.0.0.1"
        with grpc.insecure_channel(f"{reach}:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
    finally:
        assert srv.stop() == 0


def test_a_hung_worker_is_killed_and_started_again(repo, tmp_path) -> None:
    srv = start_server(repo, tmp_path / "hung.log", "--workers", "2", "--worker-hang-s", "2")
    try:
        victim = srv.workers[1]
        os.kill(victim, signal.SIGSTOP)  # its event loop sends no heartbeat
        wait_until("worker 1 killed, restarted and up", lambda: metric_value(
            srv.metrics(), "rnnserve_worker_restarts_total", worker="1") == 1 and
            metric_value(srv.metrics(), "rnnserve_worker_up", worker="1") == 1)
        wait_until("the hung worker gone", lambda: not alive(victim), 5)
        log = srv.log.read_text()
        assert f"worker 1 (pid {victim}) is hung: no heartbeat for" in log
        # the other was never taken for hung
        assert metric_value(srv.metrics(), "rnnserve_worker_restarts_total", worker="0") == 0
    finally:
        assert srv.stop() == 0


def test_a_worker_that_hangs_while_it_loads_fails_the_start(repo, tmp_path) -> None:
    log = tmp_path / "stuck.log"
    proc = launch_server(repo, log, "--workers", "2", "--worker-start-s", "5")
    victim = 0
    try:
        wait_until("worker 0 started", lambda: _workers_of(proc.pid), 30)
        (victim,) = _workers_of(proc.pid)
        os.kill(victim, signal.SIGSTOP)  # still importing or loading: it never gets ready
        assert proc.wait(60) == 1, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        if victim and alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert proc.stdout is not None and proc.stdout.read() == ""  # never ready
    wait_until("the stuck worker gone", lambda: not alive(victim), 5)
    text = log.read_text()
    assert (f"worker 0 (pid {victim}) did not start serving within 5s (--worker-start-s)"
            in text), text[-3000:]
    assert "Traceback" not in text


def test_a_worker_started_again_that_hangs_while_it_loads_is_killed_and_started_again(
        repo, tmp_path) -> None:
    # the bound must cover a worker's normal start on a busy machine: the second restart
    srv = start_server(repo, tmp_path / "restuck.log", "--workers", "2",
                       "--worker-start-s", "10")
    stuck = 0
    try:
        os.kill(srv.workers[1], signal.SIGKILL)
        wait_until("worker 1 started again", lambda: set(_workers_of(srv.proc.pid))
                   - set(srv.workers), 30)
        (stuck,) = set(_workers_of(srv.proc.pid)) - set(srv.workers)
        os.kill(stuck, signal.SIGSTOP)  # importing or loading: it never gets ready
        wait_until("the stuck worker killed, worker 1 started again and up", lambda:
                   metric_value(srv.metrics(), "rnnserve_worker_restarts_total",
                                worker="1") == 2 and
                   metric_value(srv.metrics(), "rnnserve_worker_up", worker="1") == 1, 90)
        wait_until("the stuck worker gone", lambda: not alive(stuck), 5)
        log = srv.log.read_text()
        assert (f"worker 1 (pid {stuck}) did not start serving within 10s "
                "(--worker-start-s); killing it") in log, log[-3000:]
        assert metric_value(srv.metrics(), "rnnserve_worker_restarts_total", worker="0") == 0
    finally:
        if stuck and alive(stuck):
            os.kill(stuck, signal.SIGKILL)
        assert srv.stop() == 0
