"""A session loaded from the shared store into a full state pool: the pool grows for
its row, which waits for the runs in flight; the server's event loop must go on
answering meanwhile. Server B runs in this process (its pool is reachable to hold it
as a run would); server A is a real `rnnserve serve` process; the store a real Redis."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rnnserve.client import Client
from rnnserve.server.settings import Settings

from ..server.serving import InProcessServer
from ..server.test_grpc_api import whole_run
from .test_failover import serve


def test_a_load_that_grows_the_pool_waits_in_a_thread_not_on_the_event_loop(
        repo, redis_server, tmp_path) -> None:
    x = np.random.default_rng(31).standard_normal((7, 20)).astype(np.float32)
    want = whole_run(repo, "feat", 1, x)
    a = serve(repo, tmp_path, "a", redis_server.url)
    # a pool of 3 rows: the zero row, the trash row and one session's
    b = InProcessServer(Settings(repo=repo, host="127.0.0.1", grpc_port=0, metrics_port=0,
                                 device="cpu", intra_op_threads=1,
                                 session_store=redis_server.url, pool_rows=1,
                                 max_batch_delay_ms=2))
    try:
        with Client(a.target, timeout=10) as on_a, Client(b.target, timeout=5) as on_b:
            sid = on_a.open_session("feat").session_id
            parts = [on_a.step(sid, 0, x[:3])["logits"]]
            assert a.stop() == 0  # hands its lease over
            own = on_b.open_session("feat").session_id
            on_b.step(own, 0, x[:1])  # takes the pool's one session row
            assert b.server is not None
            pool = b.server.registry.get("feat").pool
            assert (pool.capacity, pool.used, pool.resizes) == (3, 1, 0)
            pool.acquire(pool.capacity)  # a run in flight on the pool's buffers
            held = True
            try:
                with ThreadPoolExecutor(1) as ex:
                    # B loads the session from the store: its row lies beyond the buffers
                    moved = ex.submit(on_b.step, sid, 1, x[3:], True)
                    deadline = time.monotonic() + 10
                    while pool.used < 2 and time.monotonic() < deadline:
                        time.sleep(0.01)  # its row is handed out: the write comes next
                    assert pool.used == 2
                    time.sleep(0.2)
                    assert "feat" in [m.name for m in on_b.list_models()]  # the loop answers
                    assert not moved.done() and pool.resizes == 0  # growth waits
                    pool.release()
                    held = False
                    parts.append(moved.result(30)["logits"])
            finally:
                if held:
                    pool.release()
            assert pool.resizes == 1 and pool.capacity >= 4
            on_b.step(own, 1, x[1:2])  # the row kept across the growth goes on
    finally:
        a.stop()
        b.stop()
    assert float(np.abs(np.concatenate(parts) - want).max()) <= 1e-5
