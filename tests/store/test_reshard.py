"""``rnnserve reshard``: a new list of shards, and the sessions moved to where the new
list puts them, so that servers with that list go on with every one of them exactly.
Real servers, real redis-servers, the command as a user runs it."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client, packed_request
from rnnserve.server.shared import shard_of

from ..cli.test_cli import assert_one_line_error, rnnserve
from ..server.test_grpc_api import whole_run
from .test_failover import serve

N, STEPS = 24, 3  # sessions, steps per chunk
ENDED = [0, 1, 18, 19]  # end at chunk 1: two that stay on their shard, two that move


def _where(shards, sid: str) -> list[int]:
    return [i for i, s in enumerate(shards)
            if s.client().exists(*(f"rnnserve:{{{sid}}}:{k}" for k in "slf"))]


@pytest.mark.parametrize("old_n,new_n", [(2, 3), (3, 2)], ids=["grow", "shrink"])
def test_reshard_moves_the_sessions_the_new_list_puts_elsewhere_and_servers_go_on_exactly(
        repo, shards, tmp_path, old_n: int, new_n: int) -> None:
    """Two shards to three, and three to two: with the server running (its leases live)
    the move is refused; stopped, a dry run moves nothing; then the sessions of the third
    shard move (to it, or from it), record, final answer and time to live, and the rest
    stay. A server on the new list goes on with every live session exactly and answers a
    retry of an ended one's last chunk from the moved final answer. A wrong --from is
    refused; a shard left out is marked retired."""
    old, new = (",".join(s.url for s in shards[:n]) for n in (old_n, new_n))
    sids = [f"rs-{i}" for i in range(N)]
    movers = [s for s in sids if shard_of(s, 3) == 2]
    assert [shard_of(sids[i], 3) == 2 for i in ENDED] == [False, False, True, True]
    assert 0 < len(movers) < N and all(shard_of(s, 2) == shard_of(s, 3) for s in sids
                                       if s not in movers)  # the third shard's, only
    x = np.random.default_rng(71).standard_normal((N, 3 * STEPS, 20)).astype(np.float32)

    def part(k: int, rows=slice(None)) -> np.ndarray:
        return np.ascontiguousarray(x[rows, k * STEPS:(k + 1) * STEPS])

    async def first_two(target: str) -> list[np.ndarray]:
        async with AsyncClient(target, timeout=20) as c, c.packed() as p:
            got = []
            for k in range(2):
                ans = await p.send(packed_request("feat", sids, [k] * N, part(k),
                                                  opens=range(N) if k == 0 else (),
                                                  ends=ENDED if k == 1 else ()))
                assert not ans.failures, ans.failures
                got.append(ans.outputs["logits"])
            return got

    a = serve(repo, tmp_path, "a", old, "--lease-s", "30")
    try:
        before = asyncio.run(first_two(a.target))
        live = rnnserve("reshard", "--from", old, "--to", new)
        assert_one_line_error(live, "hold a live lease", "stop every server")
    finally:
        assert a.stop() == 0  # SIGTERM: its leases released
    for sid in sids:
        assert _where(shards, sid) == [shard_of(sid, old_n)]
    mover = "rs-20"  # moves, and lives on (its record's time to live is the idle timeout)
    assert mover in movers and sids.index(mover) not in ENDED
    ttl = shards[shard_of(mover, old_n)].client().pttl(f"rnnserve:{{{mover}}}:s")

    swapped = ",".join(s.url for s in [shards[1], shards[0], *shards[2:old_n]])
    wrong = rnnserve("reshard", "--from", swapped, "--to", new)
    assert_one_line_error(wrong, f"{shards[1].url} is shard 1/{old_n}", f"not 0/{old_n}")
    dry = rnnserve("reshard", "--from", old, "--to", new, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"{len(movers)} session(s) move, {N - len(movers)} stay" in dry.stdout, dry.stdout
    for sid in sids:
        assert _where(shards, sid) == [shard_of(sid, old_n)]  # nothing moved
    done = rnnserve("reshard", "--from", old, "--to", new)
    assert done.returncode == 0, done.stderr
    assert f"moved {len(movers)} session(s); 0 left on both" in done.stdout, done.stdout
    for sid in sids:
        assert _where(shards, sid) == [shard_of(sid, new_n)], sid
    moved_ttl = shards[shard_of(mover, new_n)].client().pttl(f"rnnserve:{{{mover}}}:s")
    assert 0 < moved_ttl <= ttl  # the idle timeout carried over, not reset nor dropped
    marks = [s.client().get("rnnserve:shard") for s in shards]
    assert marks == ([b"0/3", b"1/3", b"2/3"] if new_n == 3 else [b"0/2", b"1/2", b"retired"])
    for listed in (old, new):  # again: nothing left to move
        again = rnnserve("reshard", "--from", listed, "--to", new)
        assert again.returncode == 0 and "0 session(s) move" in again.stdout, again.stdout

    b = serve(repo, tmp_path, "b", new)
    live = [i for i in range(N) if i not in ENDED]
    live_ids = [sids[i] for i in live]
    try:
        async def last() -> np.ndarray:
            async with AsyncClient(b.target, timeout=20) as c, c.packed() as p:
                ans = await p.send(packed_request(
                    "feat", live_ids, [2] * len(live_ids), part(2, live),
                    ends=range(len(live_ids))))
                assert not ans.failures, ans.failures
                return ans.outputs["logits"]

        tail = asyncio.run(last())
        with Client(b.target, timeout=10) as client:  # retries of the ended ones' last chunk
            retried = [client.step(sids[i], 1, part(1, i), end=True)["logits"]
                       for i in ENDED]
    finally:
        assert b.stop() == 0
    for k, i in enumerate(ENDED):
        assert np.array_equal(retried[k], before[1][i])  # the stored answer, not a rerun
        want = whole_run(repo, "feat", 1, x[i, :2 * STEPS])
        assert float(np.abs(np.concatenate([before[0][i], before[1][i]]) - want).max()) <= 1e-5
    for k, i in enumerate(live):
        y = np.concatenate([before[0][i], before[1][i], tail[k]])
        assert float(np.abs(y - whole_run(repo, "feat", 1, x[i])).max()) <= 1e-5


def wait_exit(server, timeout: float = 20.0) -> int:
    """The exit status of a server that stops by itself."""
    return server.proc.wait(timeout)


def test_a_server_that_missed_a_reshard_stops_and_a_retired_shard_is_refused(
        repo, shards, tmp_path) -> None:
    """Three shards to two while a server on the three (two worker processes), holding
    no lease, kept running (it missed the rollout): within --store-check-s a worker
    finds its list changed, says why, drains and exits with status 3, and the
    supervisor, rather than start it again, drains the other and exits with status 3
    too. A server on the new list runs on, also through a shard's mark lost (as by a
    Redis restarted empty: a check writes nothing, and leaves none missing). The shard
    left out stays marked retired: a server that lists it is refused at start, while
    `rnnserve reshard` run again moves nothing, and a reshard that lists it among its
    new shards takes it again."""
    three, two = (",".join(s.url for s in shards[:n]) for n in (3, 2))
    stray = serve(repo, tmp_path, "stray", three, "--store-check-s", "0.3", "--workers", "2")
    try:
        with Client(stray.target, timeout=10) as client:
            client.open_session("feat", session_id="before")
            client.step("before", 0, np.zeros((STEPS, 20), np.float32), end=True)
        done = rnnserve("reshard", "--from", three, "--to", two)
        assert done.returncode == 0, done.stderr
        assert shards[2].client().get("rnnserve:shard") == b"retired"
        assert wait_exit(stray) == 3
    finally:
        stray.stop()
    log = stray.log.read_text()
    assert "but this server lists it as 0/3: the list was changed" in log, log
    assert "This server stops (exit status 3)" in log, log
    assert "the list of shards changed under it" in log and "started again" not in log, log
    assert log.count("INFO rnnserve.server[worker") and log.count(": stopped\n") == 2, log

    b = serve(repo, tmp_path, "b", two, "--store-check-s", "0.3")
    try:
        with pytest.raises(RuntimeError) as refused:
            serve(repo, tmp_path, "old", three)
        assert f"{shards[2].url} was dropped from its servers' list of shards" in \
            str(refused.value), str(refused.value)
        shards[0].client().delete("rnnserve:shard")  # as a Redis that lost its data
        with Client(b.target, timeout=10) as client:
            client.open_session("feat", session_id="after")
            client.step("after", 0, np.zeros((STEPS, 20), np.float32))
        time.sleep(1)
        assert b.proc.poll() is None  # checked its marks a few times meanwhile
        assert shards[0].client().get("rnnserve:shard") is None
    finally:
        assert b.stop() == 0
    again = rnnserve("reshard", "--from", three, "--to", two)
    assert again.returncode == 0 and "0 session(s) move" in again.stdout, again.stdout
    back = rnnserve("reshard", "--from", two, "--to", three)
    assert back.returncode == 0, back.stderr
    assert [s.client().get("rnnserve:shard") for s in shards] == [b"0/3", b"1/3", b"2/3"]
    assert serve(repo, tmp_path, "c", three).stop() == 0
