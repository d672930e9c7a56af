"""``rnnserve serve --workers N`` and its health: the port says SERVING for the
inference services (what readiness asks about) only once every worker serves. Worker 0
starts first and binds the port while the others still load; a readiness probe (or a
client) that took worker 0's SERVING then would mark the pod Ready with one worker of
N, and the connections opened meanwhile stay on worker 0."""

from __future__ import annotations

import os
import signal
import socket
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.client import OWN_CONNECTION
from rnnserve.protos.inference import grpc_service_pb2 as oip
from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.server.app import HELD_SERVICES, OIP_SERVICE, SERVICE

from .serving import launch_server, metric_value, start_server
from .test_workers import alive, wait_until

SERVICES = ("", SERVICE, OIP_SERVICE)  # the server's own health, then the inference ones


def health(target: str, ready: list[bool | None] | None = None) -> list[str]:
    """Each service's status on one new connection (the kernel picks its worker): the
    status's name, or the call's code where none answers (UNAVAILABLE: not bound yet).
    ``ready``: gets what the Open Inference Protocol's ServerReady said on the same
    connection first (a worker's readiness only ever turns on: if it said ready, the
    health checks after it must say SERVING)."""
    statuses = []
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        if ready is not None:
            try:
                ready.append(oip_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                    oip.ServerReadyRequest(), timeout=2).ready)
            except grpc.RpcError:
                ready.append(None)  # not bound yet
        stub = health_pb2_grpc.HealthStub(channel)
        for service in SERVICES:
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                    timeout=2)
                statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(
                    answer.status))
            except grpc.RpcError as exc:
                statuses.append(exc.code().name)
    return statuses


def test_the_port_serves_only_once_every_worker_does(repo, tmp_path) -> None:
    """Worker 1 starts only once worker 0 serves (the supervisor learns the port from
    it), so for the whole of worker 1's start (imports, models) worker 0 alone answers
    on the port: it must say NOT_SERVING then for the inference services, and SERVING
    only after worker 1 logged that it serves. The server's own health ("", for the
    startup and liveness probes) says SERVING: worker 0 is up."""
    assert set(HELD_SERVICES) == set(SERVICES[1:])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    log = tmp_path / "held.log"
    proc = launch_server(repo, log, "--workers", "2", "--grpc-port", str(port))
    try:
        seen: list[str] = []  # the inference services' statuses, each change
        up_while_held = False
        readiness: list[bool | None] = []  # ServerReady (Open Inference Protocol), each check
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, (seen, log.read_text()[-3000:])
            overall, *inference = health(target, readiness)
            if readiness[-1]:  # said ready: its worker was released before the checks
                assert inference == ["SERVING"] * 2, (inference, seen)
            # read after the check: a SERVING that the handshake allows comes after
            # worker 1's line was written
            worker_1_serves = "rnnserve.server[worker 1]: serving " in log.read_text()
            for status in inference:  # each change, in order
                if not seen or seen[-1] != status:
                    seen.append(status)
            assert overall in ("UNAVAILABLE", "SERVING"), overall
            up_while_held |= overall == "SERVING" and "NOT_SERVING" in inference
            assert set(inference) <= {"UNAVAILABLE", "NOT_SERVING", "SERVING"}, inference
            if "SERVING" in inference:  # (the two checks may straddle the release)
                assert worker_1_serves, ("SERVING while worker 1 still loads", seen,
                                         log.read_text()[-3000:])
            if inference == ["SERVING"] * 2:
                break
            time.sleep(0.05)
        # worker 0 answered, held, while worker 1 loaded, and said it is up
        assert "NOT_SERVING" in seen and up_while_held, seen
        assert False in readiness, readiness  # answered "not ready" while held
        assert proc.stdout is not None
        assert '"event": "ready"' in proc.stdout.readline()
        # both workers serve once the ready line is out (each said so before it): new
        # connections reach either (all on one: 2^-15)
        for _ in range(16):
            ready: list[bool | None] = []
            assert health(target, ready) == ["SERVING"] * 3 and ready == [True]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0, log.read_text()[-3000:]


def test_a_worker_started_again_serves_as_soon_as_it_is_ready(repo, tmp_path) -> None:
    """The others serve already: a worker that the supervisor starts again later is
    not held until some other worker starts, it serves once it is ready."""
    srv = start_server(repo, tmp_path / "again.log", "--workers", "2")
    try:
        victim = srv.workers[1]
        os.kill(victim, signal.SIGKILL)
        wait_until("worker 1 started again and up", lambda: metric_value(
            srv.metrics(), "rnnserve_worker_restarts_total", worker="1") == 1 and
            metric_value(srv.metrics(), "rnnserve_worker_up", worker="1") == 1, 60)
        wait_until("the killed worker gone", lambda: not alive(victim), 5)
        # new connections reach either worker (all on worker 0: 2^-23)
        statuses = [health(srv.target) for _ in range(24)]
        assert all(s == ["SERVING"] * 3 for s in statuses), statuses
    finally:
        assert srv.stop() == 0
