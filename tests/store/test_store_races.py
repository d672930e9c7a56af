"""Second-pass races of the session core with the shared store: two real servers on
loopback, one real redis-server."""

from __future__ import annotations

import time

import grpc
import numpy as np

from rnnserve.client import Client

from ..server.serving import start_server
from ..server.test_grpc_api import whole_run
from .test_failover import code_and_message


def serve(repo, tmp_path, name: str, url: str, *flags: str):
    return start_server(repo, tmp_path / f"{name}.log", "--session-store", url,
                        "--max-batch-delay-ms", "2", *flags)


def test_a_dropped_outdated_copy_does_not_end_the_session_on_its_server(
        repo, redis_server, tmp_path) -> None:
    """A's copy is behind the store (B went on with it); A's step of it is refused and
    the copy dropped. The session has not ended: a unary step on A, without a resume,
    takes it from the store (the retry of B's last chunk gets its stored answer), as on
    any replica that does not hold it."""
    x = np.random.default_rng(21).standard_normal((12, 20)).astype(np.float32)
    want = whole_run(repo, "feat", 1, x)
    a = serve(repo, tmp_path, "a", redis_server.url, "--lease-s", "1")
    b = serve(repo, tmp_path, "b", redis_server.url, "--lease-s", "1")
    try:
        with Client(a.target, timeout=10) as on_a, Client(b.target, timeout=10) as on_b:
            sid = on_a.open_session("feat").session_id
            y0 = on_a.step(sid, 0, x[:3])["logits"]
            time.sleep(1.3)  # A's lease lapses
            y1 = on_b.step(sid, 1, x[3:6])["logits"]  # B takes it; the answer "lost"
            time.sleep(1.3)  # B's lease lapses
            code, msg = code_and_message(on_a.step, sid, 1, x[3:6])  # A's copy: outdated
            assert code == grpc.StatusCode.ABORTED and "resume it" in msg, msg
            # the retry again on A, without a resume: the stored answer
            assert np.array_equal(on_a.step(sid, 1, x[3:6])["logits"], y1)
            y2 = on_a.step(sid, 2, x[6:], end=True)["logits"]
        got = np.concatenate([y0, y1, y2])
        assert float(np.abs(got - want).max()) <= 1e-5
    finally:
        assert a.stop() == 0 and b.stop() == 0
