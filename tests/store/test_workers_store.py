"""``serve --workers N`` on the shared store: a session moves between the worker
processes of one server at once, whichever worker a connection reaches."""

from __future__ import annotations

import time

import grpc
import numpy as np

from rnnserve.client import OWN_CONNECTION, Client

from ..server.serving import metric_value
from ..server.test_grpc_api import whole_run
from .test_failover import code_and_message, serve


def test_each_step_on_a_new_connection_continues_the_session_exactly(
        repo, redis_server, tmp_path) -> None:
    steps = 24
    x = np.random.default_rng(8).standard_normal((2 * steps, 20)).astype(np.float32)
    want = whole_run(repo, "feat", 1, x)
    srv = serve(repo, tmp_path, "workers", redis_server.url, "--workers", "2")
    try:
        with Client(srv.target, timeout=10, options=OWN_CONNECTION) as first:
            sid = first.open_session("feat").session_id
        parts = []
        for k in range(steps):  # each on a connection of its own: either worker
            with Client(srv.target, timeout=10, options=OWN_CONNECTION) as client:
                parts.append(client.step(sid, k, x[2 * k:2 * k + 2],
                                         end=k == steps - 1)["logits"])
        text = srv.metrics()
    finally:
        assert srv.stop() == 0
    assert float(np.abs(np.concatenate(parts) - want).max()) <= 1e-5
    # both workers stepped it (all on one: probability 2^-23), taking it from the
    # store whenever it had gone on in the other one; no step waited for a lease
    for w in ("0", "1"):
        assert metric_value(text, "rnnserve_chunks_total", code="OK", worker=w) > 0
    assert metric_value(text, "rnnserve_chunks_total", code="OK") == steps
    assert metric_value(text, "rnnserve_session_resumes_total", source="store") >= 1


def test_a_gap_is_still_refused_and_counts_no_resume(repo, redis_server, tmp_path) -> None:
    """A step ahead of the copy held here asks the store for a newer record; when the
    copy is current the step is refused for its seq, as without a store."""
    srv = serve(repo, tmp_path, "one", redis_server.url)
    x = np.zeros((2, 20), np.float32)
    try:
        with Client(srv.target, timeout=10) as client:
            sid = client.open_session("feat").session_id
            client.step(sid, 0, x)
            code, message = code_and_message(client.step, sid, 5, x)
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "expects chunk 1, got 5" in message
            client.step(sid, 1, x, end=True)  # the state untouched: it goes on at 1
        text = srv.metrics()
    finally:
        assert srv.stop() == 0
    assert metric_value(text, "rnnserve_session_resumes_total") == 0


def test_a_workers_stale_copy_expiring_leaves_its_siblings_lease(repo, redis_server,
                                                                 tmp_path) -> None:
    """The session goes on in worker B while worker A keeps an outdated copy; when A's
    copy expires, A gives up only a lease of its own: B's stays (another server still
    waits it out), and goes when B's copy expires in its turn."""
    x = np.zeros((2, 20), np.float32)
    srv = serve(repo, tmp_path, "lease", redis_server.url, "--workers", "2",
                "--idle-timeout-s", "3", "--lease-s", "60")
    r = redis_server.client()

    def by_worker(name: str, **labels: str) -> dict[str, float]:
        text = srv.metrics()
        return {w: metric_value(text, name, worker=w, **labels) for w in ("0", "1")}

    try:
        with Client(srv.target, timeout=10, options=OWN_CONNECTION) as first:
            sid = first.open_session("feat").session_id
            first.step(sid, 0, x)
        lease_key = f"rnnserve:{{{sid}}}:l"
        a = max(by_worker("rnnserve_chunks_total", code="OK").items(), key=lambda kv: kv[1])[0]
        b = "1" if a == "0" else "0"
        seq = 1
        for _ in range(30):  # a new connection until one reaches B, 1.5 s after A's last
            time.sleep(1.5)  # step: A's copy then expires 1.5 s before B's
            with Client(srv.target, timeout=10, options=OWN_CONNECTION) as client:
                client.step(sid, seq, x)
            seq += 1
            if by_worker("rnnserve_chunks_total", code="OK")[b] > 0:
                break
        else:
            raise AssertionError("30 new connections all reached one worker")
        held_by_b = r.get(lease_key)
        deadline = time.monotonic() + 10
        # A's copy expires and A's release of it reaches the store (counted once done)
        while by_worker("rnnserve_store_seconds_count", op="release")[a] < 1:
            assert time.monotonic() < deadline, "worker A's copy was not released"
            time.sleep(0.05)
        after_a_expired = r.get(lease_key), by_worker("rnnserve_sessions_ended_total",
                                                      reason="expired")[b]
        while r.get(lease_key) is not None:  # B's own copy expires and lets go
            assert time.monotonic() < deadline, "worker B kept its lease"
            time.sleep(0.05)
    finally:
        assert srv.stop() == 0
    assert held_by_b is not None and after_a_expired == (held_by_b, 0)
    assert held_by_b.decode().endswith(f"|{b}")
