"""Several server processes on one port: ``rnnserve serve --workers N``.

One Python process answers a few thousand chunks a second at most (its event loop
and gRPC's work per message bound it), far less than a GPU or a many-core host
computes. With ``--workers N`` this process starts N worker processes that each run
the whole server (their own onnxruntime sessions on the same device, batchers,
sessions) and listen on the same gRPC port with SO_REUSEPORT, so the kernel spreads
new connections over them. This process supervises them:

- it starts worker 0 first (it picks the port when the port is 0), then the others;
  it prints one ready line when all are serving, or exits with the first failure.
  Each worker reports NOT_SERVING on gRPC health for the inference services (those
  readiness asks about; app.HELD_SERVICES) until all are ready and this process tells
  them so: worker 0 listens while the others still load, and a readiness probe or a
  client reaching it alone then would take the server for ready with one worker of N
  (and its connections would stay on that one). A worker started again later serves
  as soon as it is ready: the others serve already;
- it serves /metrics for all of them: each worker's series with a ``worker`` label,
  plus ``rnnserve_worker_up`` and ``rnnserve_worker_restarts_total`` of its own;
- a worker that dies is started again (after a pause that doubles while it keeps
  dying young); the others serve on, and the kernel stops sending it connections;
- a worker that hangs is killed: one not serving ``worker_start_s`` after its start
  (then, at the start, this process exits with an error; later, it is started again),
  or one serving whose event loop sent no heartbeat for ``worker_hang_s``;
- SIGTERM or SIGINT drains every worker (each as ``rnnserve serve`` alone would) and
  exits 0 when they all stopped cleanly; a worker whose supervisor dies drains itself;
- a worker that stopped itself because a reshard changed the list of shards under it
  (``EXIT_STORE_CHANGED``) is not started again: every worker is drained, and this
  process exits with that status (started again, it would be refused at once).

A session lives in the worker that opened it. Calls on the connection that opened it
(a stream, or one client's channel) reach it; a call on a new connection reaches any
worker, which takes the session from the shared store with ``--session-store``, and
otherwise answers NOT_FOUND naming its worker unless it is the session's own.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import http.client
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from rnnserve.cli import EXIT_ERROR
from rnnserve.errors import RnnserveError, UsageError
from rnnserve.server.app import (
    EXIT_STORE_CHANGED,
    RELEASE,
    RELEASED,
    Worker,
    log_to_stderr,
    serve,
    server_name,
)
from rnnserve.server.settings import Settings

log = logging.getLogger("rnnserve.workers")
YOUNG_S = 30.0  # a worker that dies sooner after it began to serve (or before) is
# restarted after a pause that doubles each time
MAX_PAUSE_S = 30.0
# The most a scrape of /metrics waits for the workers' own (all fetched at once): a
# worker that has not answered whole by then is left out of that scrape. Well within
# the ServiceMonitor's scrapeTimeout (4 s, deploy/k8s; a test keeps it at half or
# less), or one hung worker would fail the whole pod's scrape instead.
SCRAPE_BUDGET_S = 2.0
# The most the supervisor waits for its workers to say they serve once released (a set
# of gRPC health on each one's event loop: milliseconds, unless a loop is blocked).
RELEASE_WAIT_S = 10.0
# Beyond the drain grace, before a worker that has not exited is killed. After the grace
# a worker only stops its batchers and hands its sessions to the store (bounded by
# --store-timeout-ms); the margin must end before the pod's own margin does (deploy/k8s:
# terminationGracePeriodSeconds = preStop sleep + grace + 5 s), or the kubelet's SIGKILL
# comes first and the supervisor never reports the stuck worker.
STOP_MARGIN_S = 3.0
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
HEARTBEAT_S = 1.0  # a serving worker's event loop sends one this often (see watch)
# The workers' /metrics are on 127.0.0.1: never through a proxy from the environment
# (urllib's default opener follows http_proxy for any host, 127.0.0.1 included).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def worker_settings(settings: Settings, port: int) -> Settings:
    """A worker's settings: the shared port, and its share of the CPU cores for
    onnxruntime's threads when they are left at onnxruntime's default (all cores per
    process would oversubscribe them N times)."""
    update: dict[str, Any] = {"workers": 1, "grpc_port": port}
    if settings.intra_op_threads == 0:
        update["intra_op_threads"] = max(1, (os.cpu_count() or 1) // settings.workers)
    return settings.model_copy(update=update)


def _worker_main(settings: Settings, worker: Worker, conn: Connection, held: bool) -> None:
    """A worker process: the server as ``rnnserve serve`` runs it, its ready line sent
    to the supervisor over ``conn``, stopping when ``conn`` closes; ``held``: NOT_SERVING
    until the supervisor sends RELEASE over ``conn``."""
    index = worker.index
    log_to_stderr(f"[worker {index}]")
    beats: set[asyncio.Task[None]] = set()

    async def heartbeat() -> None:  # a blocked event loop sends none
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                conn.send(None)
            except OSError:  # the supervisor is gone: serve() stops on the pipe's end
                return

    def ready(line: dict[str, Any]) -> None:  # called on the event loop
        conn.send(line)
        beats.add(asyncio.get_running_loop().create_task(heartbeat()))

    try:
        code = asyncio.run(serve(settings, worker, on_ready=ready, control=conn, held=held))
    except RnnserveError as exc:
        print(f"rnnserve serve: error: [worker {index}] {exc}", file=sys.stderr, flush=True)
        code = EXIT_ERROR
    sys.exit(code)


class _Slot:
    """One worker: its process, the pipe to it, and what its ready line said."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: BaseProcess | None = None
        self.conn: Connection | None = None
        self.ready: dict[str, Any] | None = None
        self.started = 0.0
        self.serving: float | None = None  # when its ready line came
        self.beat = 0.0  # when its last message (ready line or heartbeat) came
        self.pause = 1.0
        self.restart_at: float | None = None
        self.killed = False  # killed as hung, not yet seen dead


class WorkerScrape:
    """A collector that gathers the workers' own /metrics on each scrape (all at once,
    the whole bounded by SCRAPE_BUDGET_S) and labels every series with its worker; a
    worker that does not answer in time (restarting, hung) is left out of that scrape."""

    def __init__(self, ports: Callable[[], dict[int, int]], count: int) -> None:
        self._ports = ports  # {worker index: metrics port} of the workers serving now
        # A thread per worker, twice over: a fetch given up on at the budget still holds
        # its thread until its read times out (SCRAPE_BUDGET_S more at most), and a
        # scrape that comes meanwhile (a second Prometheus) must not queue behind it.
        self._pool = ThreadPoolExecutor(2 * count, thread_name_prefix="scrape")

    @staticmethod
    def _fetch(port: int, deadline: float) -> list[Metric] | None:
        """A worker's metric families; None when it does not answer whole by
        ``deadline`` (hung, or answering slowly), or answers cut short (it may be dying
        mid-response: a truncated body, a broken exposition). Read piece by piece: the
        socket's timeout bounds each read, not a body that trickles in."""
        try:
            with _DIRECT.open(f"http://127.0.0.1:{port}/metrics",
                              timeout=SCRAPE_BUDGET_S) as r:
                body = bytearray()
                while chunk := r.read1(1 << 16):
                    body += chunk
                    if time.monotonic() > deadline:
                        return None
                if r.length:  # the connection closed before its Content-Length
                    return None
                return list(text_string_to_metric_families(body.decode()))
        except (OSError, http.client.HTTPException, ValueError):
            return None

    def collect(self) -> Iterator[Metric]:
        ports = self._ports()
        deadline = time.monotonic() + SCRAPE_BUDGET_S
        fetches = {index: self._pool.submit(self._fetch, port, deadline)
                   for index, port in ports.items()}
        wait_futures(fetches.values(), timeout=SCRAPE_BUDGET_S)
        merged: dict[str, Metric] = {}
        for index, fetch in fetches.items():
            if not fetch.done():  # left out; one not started yet never starts
                fetch.cancel()
                continue
            families = fetch.result()
            if families is None:
                continue
            for family in families:
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
                into.samples += [s._replace(labels={**s.labels, "worker": str(index)})
                                 for s in family.samples]
        yield from merged.values()


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.workers
        self.slots = [_Slot(i) for i in range(self.count)]
        self.port = settings.grpc_port
        self.owner = server_name()
        self.stopping = threading.Event()
        self.failure: int | None = None  # a worker's status that stops them all
        self._ctx = multiprocessing.get_context("spawn")
        self._lock: int | None = None  # the port's lock file (see hold_port)
        disable_created_metrics()  # no *_created series, as in the workers (app.py)
        self.registry = CollectorRegistry()
        self.up = Gauge("rnnserve_worker_up", "1 while the worker process serves, by worker",
                        ["worker"], registry=self.registry)
        self.restarts = Counter("rnnserve_worker_restarts",
                                "Worker processes started again after they died, by worker",
                                ["worker"], registry=self.registry)
        for slot in self.slots:
            self.up.labels(str(slot.index)).set(0)
            self.restarts.labels(str(slot.index))
        self.registry.register(WorkerScrape(lambda: {
            s.index: s.ready["metrics_port"] for s in self.slots if s.ready is not None},
            self.count))

    def _spawn(self, slot: _Slot, held: bool) -> None:
        """Start a slot's worker; ``held``: NOT_SERVING until ``_release`` (see the
        module docstring)."""
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main, name=f"rnnserve-worker-{slot.index}",
            args=(worker_settings(self.settings, self.port),
                  Worker(slot.index, self.count, self.owner), theirs, held))
        # The worker starts with SIGTERM and SIGINT blocked (the mask is inherited
        # across the spawn's fork and exec) and unblocks them once its handlers are in
        # place (app.serve): one that arrives while it imports or loads is delivered
        # then and drains it, instead of killing it with the default action. Here they
        # are held for the moment of the start; ours runs when they are unblocked.
        # multiprocessing's resource tracker is started first: starting it (in the first
        # proc.start) unblocks both signals, which would leave the worker without them.
        resource_tracker.ensure_running()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        theirs.close()
        slot.proc, slot.conn, slot.ready = proc, ours, None
        slot.started, slot.restart_at, slot.serving = time.monotonic(), None, None
        slot.killed = False
        slot.beat = slot.started

    def _await_ready(self, slots: list[_Slot]) -> int | None:
        """Wait until every slot's worker is ready; the exit status of the first that
        died instead (or 0 when told to stop meanwhile)."""
        waiting = list(slots)
        while waiting:
            if self.stopping.is_set():
                return 0
            for slot in list(waiting):
                assert slot.proc is not None and slot.conn is not None
                if slot.conn.poll():
                    try:
                        slot.ready = slot.conn.recv()
                    except EOFError:
                        return self._failed_start(slot)
                    slot.beat = slot.serving = time.monotonic()
                    self.up.labels(str(slot.index)).set(1)
                    waiting.remove(slot)
                elif not slot.proc.is_alive():
                    return self._failed_start(slot)
                elif self._stuck(slot, "; the server stops"):
                    return EXIT_ERROR
            if waiting:
                wait([s.conn for s in waiting if s.conn is not None]
                     + [s.proc.sentinel for s in waiting if s.proc is not None], timeout=0.5)
        return None

    def _stuck(self, slot: _Slot, then: str) -> bool:
        """Whether a worker not serving yet has outlasted worker_start_s (hung while it
        imports, loads or warms up); if so it is killed, with a line saying so and
        ``then`` (what follows). SIGKILL: its loading blocks the event loop that would
        act on a SIGTERM. Not waited for: a process blocked in the kernel (a hung
        network file system) dies only when the call returns; watch sees it die."""
        assert slot.proc is not None
        bound = self.settings.worker_start_s
        if slot.ready is not None or time.monotonic() - slot.started <= bound:
            return False
        log.error("worker %d (pid %s) did not start serving within %gs (--worker-start-s); "
                  "killing it%s", slot.index, slot.proc.pid, bound, then)
        slot.proc.kill()
        slot.killed = True
        return True

    @staticmethod
    def _failed_start(slot: _Slot) -> int:
        """The exit status for a worker that exited before it was ready: its own when it
        exited with one (it said why on stderr), else EXIT_ERROR, and a line saying so
        (a signal, e.g. the OOM killer's, leaves nothing else)."""
        assert slot.proc is not None
        slot.proc.join()
        code = slot.proc.exitcode
        if code is not None and code > 0:
            return code
        how = f"signal {-code}" if code is not None and code < 0 else f"status {code}"
        log.error("worker %d (pid %s) died during start (%s)", slot.index, slot.proc.pid, how)
        return EXIT_ERROR

    def hold_port(self) -> None:
        """Refuse a gRPC port that another server serves already. The workers bind it
        with SO_REUSEPORT, which lets any socket of the same user with that option join
        (and take a share of the connections), so their bind alone cannot tell: a
        supervisor takes a lock on the port (a lock file, held while it runs) against
        one starting beside it whose workers do not listen yet, and refuses the port
        when a plain bind of it fails (a server that does not take the lock, or took
        another file: on this address, on all addresses while this binds one, or on one
        while this binds all). A lone server's plain bind already fails on the workers'
        port, and theirs on its port. Port 0 is the kernel's pick."""
        port = self.port
        if port == 0:
            return
        where = f"{self.settings.host}:{port}"
        taken = UsageError(f"cannot listen on {where}: the port is taken (another server?)")
        path = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(),
                            f"rnnserve-{os.getuid()}-port-{port}.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.warning("cannot lock %s (%s): checking port %d by connecting only", path,
                        exc.strerror or exc, port)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise taken from None
                raise
            self._lock = fd  # released when this process exits, however it exits
        if _listened(self.settings.host, port):
            raise taken

    def start(self) -> int | None:
        """Start the workers: the first picks the port when it is 0; None when all
        serve, else the exit status to leave with."""
        self._spawn(self.slots[0], held=True)
        failed = self._await_ready(self.slots[:1])
        if failed is not None:
            return failed
        assert self.slots[0].ready is not None
        self.port = int(self.slots[0].ready["grpc_port"])
        for slot in self.slots[1:]:
            self._spawn(slot, held=True)
        failed = self._await_ready(self.slots[1:])
        if failed is None:
            self._release()
        return failed

    def _release(self) -> None:
        """Tell every worker that all serve, and wait until each says its gRPC health
        is SERVING (RELEASED), so that the ready line comes after it: a probe or client
        that reads it and asks at once finds every worker serving. Heartbeats that come
        meanwhile are taken as such; a worker that dies meanwhile is left to ``watch``."""
        told = []
        for slot in self.slots:
            if slot.conn is None:
                continue
            try:
                slot.conn.send(RELEASE)
                told.append(slot)
            except OSError:  # it died just now: watch starts it again, not held
                log.warning("worker %d could not be told to serve (it died?)", slot.index)
        deadline = time.monotonic() + RELEASE_WAIT_S
        for slot in told:
            assert slot.conn is not None
            while (left := deadline - time.monotonic()) > 0 and slot.conn.poll(left):
                try:
                    message = slot.conn.recv()
                except (EOFError, OSError):
                    break  # it died: watch sees it
                slot.beat = time.monotonic()
                if message == RELEASED:
                    break
            else:
                log.warning("worker %d did not say it serves within %gs", slot.index,
                            RELEASE_WAIT_S)

    def watch(self) -> None:
        """Until told to stop: restart the workers that die, kill those that hang
        (not serving worker_start_s after their start, or no heartbeat from their
        event loop for worker_hang_s once serving)."""
        while not self.stopping.is_set():
            sentinels = [s.proc.sentinel for s in self.slots
                         if s.proc is not None and s.restart_at is None]
            wait(sentinels, timeout=0.5)
            now = time.monotonic()
            for slot in self.slots:
                if self.stopping.is_set():
                    return
                if slot.restart_at is not None:
                    if now >= slot.restart_at:
                        self._spawn(slot, held=False)  # the others serve already
                        self.restarts.labels(str(slot.index)).inc()
                        log.info("worker %d started again (pid %s)", slot.index,
                                 slot.proc.pid if slot.proc else "?")
                    continue
                if slot.proc is not None and not slot.proc.is_alive():
                    self._died(slot, now)
                    continue
                if slot.killed:
                    continue  # seen dead on a later pass, and started again
                self._read(slot)
                if self._stuck(slot, ""):
                    continue
                hung_s = time.monotonic() - slot.beat
                if (slot.ready is not None and slot.proc is not None
                        and hung_s > self.settings.worker_hang_s):
                    log.error("worker %d (pid %s) is hung: no heartbeat for %.0fs; killing it",
                              slot.index, slot.proc.pid, hung_s)
                    slot.proc.kill()
                    slot.killed = True
                    slot.ready = None
                    self.up.labels(str(slot.index)).set(0)

    def _read(self, slot: _Slot) -> None:
        """Take what a worker sent: its ready line, heartbeats."""
        while slot.conn is not None and slot.conn.poll():
            try:
                message = slot.conn.recv()
            except (EOFError, OSError):
                return  # it died: seen on the next pass
            slot.beat = time.monotonic()
            if isinstance(message, dict) and slot.ready is None:  # not a heartbeat
                slot.ready, slot.serving = message, slot.beat
                self.up.labels(str(slot.index)).set(1)

    def _died(self, slot: _Slot, now: float) -> None:
        assert slot.proc is not None
        slot.proc.join()
        if slot.proc.exitcode == EXIT_STORE_CHANGED:
            log.error("worker %d (pid %d) stopped: the list of shards changed under it "
                      "(its log says how); stopping every worker", slot.index, slot.proc.pid)
            self.up.labels(str(slot.index)).set(0)
            self.failure = EXIT_STORE_CHANGED
            self.stopping.set()
            return
        young = slot.serving is None or now - slot.serving < YOUNG_S
        slot.pause = min(MAX_PAUSE_S, slot.pause * 2) if young else 1.0
        log.error("worker %d (pid %d) exited with status %s; starting it again in %.0fs "
                  "(its sessions are lost unless a session store holds them)", slot.index,
                  slot.proc.pid, slot.proc.exitcode, slot.pause)
        self.up.labels(str(slot.index)).set(0)
        slot.ready = None
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None
        slot.restart_at = now + slot.pause

    def stop(self) -> int:
        """Drain every worker (SIGTERM), kill those that outlast the grace; 0 when
        all exited cleanly, counting those that had died already (before the stop, or
        not yet seen by watch)."""
        procs = [s.proc for s in self.slots if s.proc is not None]
        for proc in procs:
            if proc.is_alive():
                assert proc.pid is not None
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + STOP_MARGIN_S
        status = 0
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("%s did not stop within the grace; killing it", proc.name)
                proc.kill()
                proc.join()
            if proc.exitcode:
                log.error("%s (pid %s) exited with status %s", proc.name, proc.pid,
                          proc.exitcode)
                status = 1
                if proc.exitcode == EXIT_STORE_CHANGED:  # also one stopping meanwhile
                    self.failure = EXIT_STORE_CHANGED
        for slot in self.slots:
            if slot.conn is not None:
                slot.conn.close()
        return status


def _listened(host: str, port: int) -> bool:
    """Whether a socket listens on ``host``:``port`` or on an address that overlaps it
    (the wildcard address and any single one, either way round): a bind of it without
    SO_REUSEPORT fails then. With SO_REUSEADDR, as the server's own sockets have it, the
    connections of a server that just stopped (TIME_WAIT) do not count."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return False  # the workers' bind says what is wrong with the host
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
                # not this machine's address, a privileged port: the workers' bind says
    return False


def supervise(settings: Settings) -> int:
    """``rnnserve serve`` with ``workers`` > 1 (see the module docstring)."""
    log_to_stderr("[supervisor]")
    sup = Supervisor(settings)
    # before any worker starts: a SIGTERM while they load must stop them, not kill us
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sup.stopping.set())
    sup.hold_port()  # before anything else: a second server on the port fails at once
    if settings.session_store == "memory":
        log.warning("%d workers without a shared session store: a session lives in the "
                    "worker that opened it, and a call on a new connection may reach "
                    "another worker (NOT_FOUND); use --session-store to share sessions",
                    settings.workers)
    try:  # before any worker starts: a taken port fails at once
        httpd, _ = start_http_server(settings.metrics_port, addr=settings.host,
                                     registry=sup.registry)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {settings.host}:{settings.metrics_port}: "
                         f"{exc.strerror or exc}") from None
    try:
        failed = sup.start()
        if failed is not None:
            status = sup.stop()
            return sup.failure or failed or status
        ready = {"event": "ready", "grpc_port": sup.port,
                 "metrics_port": httpd.server_port, "host": settings.host,
                 "workers": [s.proc.pid for s in sup.slots if s.proc is not None]}
        log.info("%d workers serving on port %d (metrics of all on port %d)", sup.count,
                 sup.port, httpd.server_port)
        print(json.dumps(ready), flush=True)
        sup.watch()
        log.info("shutting down %d workers", sup.count)
        status = sup.stop()
        return sup.failure or status
    finally:
        httpd.shutdown()
        httpd.server_close()
