"""RedisStore on a real redis-server, without a gRPC server: the batch write path."""

from __future__ import annotations

import asyncio

import pytest

from rnnserve.server.errors import SessionExists, SessionHeld, SessionMoved, StoreUnavailable
from rnnserve.server.shared import RedisStore


def two_servers(url: str, ops: list[str]) -> tuple[RedisStore, RedisStore]:
    """This server's store (its operations noted in ``ops``) and another server's."""
    return (RedisStore(url, owner="me", ttl_s=60, lease_s=10,
                       on_op=lambda op, s, ok: ops.append(op)),
            RedisStore(url, owner="them", ttl_s=60, lease_s=10))


def test_batches_that_finish_during_a_write_go_out_together(redis_server) -> None:
    """20 batches at once: the first writes at once, the other 19 wait for it and go
    out in one more script call; each step gets its own verdict."""
    ops: list[str] = []

    async def main():
        store, other = two_servers(redis_server.url, ops)
        try:
            sids = [f"s{i}" for i in range(40)]
            for sid in sids[:39]:
                await store.create(sid, b"rec0")
            await other.create(sids[39], b"theirs")
            # batch i: two steps; the step of s5 claims the wrong seq; s39 is another's
            batches = [[(sids[2 * i], b"rec1", 0, 1, False, False),
                        (sids[2 * i + 1], b"rec1", 3 if 2 * i + 1 == 5 else 0, 1, False,
                         False)]
                       for i in range(20)]
            ops.clear()
            results = await asyncio.gather(*(store.checkpoint_many(b) for b in batches))
            r = redis_server.client()
            seqs = [r.hget(f"rnnserve:{{{sid}}}:s", "seq") for sid in sids]
            return results, seqs
        finally:
            await store.close()
            await other.close()

    results, seqs = asyncio.run(main())
    assert ops.count("write") == 2
    flat = [v for batch in results for v in batch]
    assert isinstance(flat[5], SessionMoved) and "chunk 0" in str(flat[5])
    assert isinstance(flat[39], SessionHeld)
    assert all(v is None for i, v in enumerate(flat) if i not in (5, 39))
    assert seqs == [b"0" if i in (5, 39) else b"1" for i in range(40)]


def test_a_burst_of_new_sessions_and_closes_is_a_few_writes(redis_server) -> None:
    ops: list[str] = []

    async def main():
        store, other = two_servers(redis_server.url, ops)
        try:
            await other.create("n7", b"theirs")
            await store.create("n3", b"mine")
            ops.clear()
            made = await asyncio.gather(*(store.create(f"n{i}", b"rec") for i in range(50)),
                                        return_exceptions=True)
            writes_to_open = ops.count("write")
            closed = await asyncio.gather(*(store.delete(f"n{i}") for i in range(50)),
                                          return_exceptions=True)
            left = redis_server.session_keys()
            return made, writes_to_open, closed, left
        finally:
            await store.close()
            await other.close()

    made, writes_to_open, closed, left = asyncio.run(main())
    assert writes_to_open == 2 and ops.count("write") == 4
    assert isinstance(made[3], SessionExists) and isinstance(made[7], SessionHeld)
    assert all(m is None for i, m in enumerate(made) if i not in (3, 7))
    assert isinstance(closed[7], SessionHeld)
    assert all(c is None for i, c in enumerate(closed) if i != 7)
    assert left == ["rnnserve:{n7}:l", "rnnserve:{n7}:s"]


def test_a_write_to_a_store_that_is_gone_fails_every_waiting_batch(redis_server) -> None:
    async def main():
        store = RedisStore(redis_server.url, owner="me", ttl_s=60, lease_s=10,
                           timeout_s=0.5)
        try:
            for i in range(6):
                await store.create(f"g{i}", b"rec0")
            redis_server.stop()
            return await asyncio.gather(
                *(store.checkpoint_many([(f"g{i}", b"rec1", 0, 1, False, False)])
                  for i in range(6)),
                return_exceptions=True)
        finally:
            await store.close()

    results = asyncio.run(main())
    assert all(isinstance(e, StoreUnavailable) for e in results), results


@pytest.mark.parametrize("final", [False, True])
def test_a_write_after_the_store_came_back_succeeds(redis_server, final) -> None:
    async def main():
        store = RedisStore(redis_server.url, owner="me", ttl_s=60, lease_s=10,
                           timeout_s=0.5, upsert=True)
        try:
            await store.create("c", b"rec0")
            redis_server.stop()
            with pytest.raises(StoreUnavailable):
                await store.checkpoint_many([("c", b"rec1", 0, 1, False, False)])
            redis_server.start()  # empty; upsert writes the missing record
            return await store.checkpoint_many([("c", b"rec1", 0, 1, final, False)])
        finally:
            await store.close()

    assert asyncio.run(main()) == [None]
    r = redis_server.client()
    if final:
        assert r.get("rnnserve:{c}:f") == b"rec1" and not r.exists("rnnserve:{c}:s")
    else:
        assert r.hget("rnnserve:{c}:s", "seq") == b"1"


def test_a_write_of_a_session_served_from_memory_may_start_ahead_of_its_record(
        redis_server) -> None:
    """A session served from memory while the store failed (degrade) is further than its
    record: its next write ("behind") is taken from any stored seq up to where it starts,
    a plain write is not; one that started behind the record, or a session another
    server holds, is still refused."""
    async def main():
        store, other = two_servers(redis_server.url, [])
        try:
            for sid in ("a", "b", "c", "d"):
                await store.create(sid, b"rec0")
            await store.checkpoint_many([(sid, b"rec1", 0, 1, False, False)
                                         for sid in ("a", "b", "c")])  # all at 1
            await other.create("t", b"theirs")
            return await store.checkpoint_many([
                ("a", b"rec4", 3, 4, False, True),  # record at 1, served to 3: taken
                ("b", b"rec4", 3, 4, False, False),  # the same, not marked: moved
                ("c", b"rec1", 0, 1, False, True),  # record at 1 is ahead of 0: moved
                ("d", b"recF", 2, 3, True, True),  # record at 0, ends at 3: taken
                ("t", b"rec9", 8, 9, False, True),  # another server's lease: held
            ])
        finally:
            await store.close()
            await other.close()

    a, b, c, d, t = asyncio.run(main())
    r = redis_server.client()
    assert a is None and r.hget("rnnserve:{a}:s", "seq") == b"4"
    assert isinstance(b, SessionMoved) and "chunk 1" in str(b)
    assert isinstance(c, SessionMoved) and r.hget("rnnserve:{c}:s", "seq") == b"1"
    assert d is None and r.get("rnnserve:{d}:f") == b"recF" and not r.exists("rnnserve:{d}:s")
    assert isinstance(t, SessionHeld) and r.hget("rnnserve:{t}:s", "data") == b"theirs"


def test_sibling_workers_share_a_lease_but_each_lets_go_of_only_its_own(redis_server) -> None:
    """The workers of one server (``name|index``) take a session from each other at
    once; a worker whose copy went stale (expiry, eviction) releasing it must not free
    the lease its sibling holds now, which other servers then still wait out."""
    lease_key = "rnnserve:{w1}:l"

    async def main():
        w0 = RedisStore(redis_server.url, owner="srv-a|0", ttl_s=60, lease_s=30)
        w1 = RedisStore(redis_server.url, owner="srv-a|1", ttl_s=60, lease_s=30)
        other = RedisStore(redis_server.url, owner="srv-b|0", ttl_s=60, lease_s=30)
        lookalike = RedisStore(redis_server.url, owner="srv-a", ttl_s=60, lease_s=30)
        r = redis_server.client()
        try:
            await w0.create("w1", b"rec0")
            seen = [r.get(lease_key)]
            assert await w1.acquire("w1") == (b"rec0", True)  # the sibling takes it at once
            assert (await w1.checkpoint_many([("w1", b"rec1", 0, 1, False, False)])) == [None]
            seen.append(r.get(lease_key))
            await w0.release(["w1"])  # w0's stale copy expires there
            seen.append(r.get(lease_key))
            refusals = []
            for store in (other, lookalike):  # another server, and one named like ours
                try:
                    await store.acquire("w1")
                except SessionHeld as exc:
                    refusals.append(str(exc))
            # w0 steps its outdated copy: the lease would let it, the seq does not
            stale = await w0.checkpoint_many([("w1", b"old", 0, 1, False, False)])
            await w1.release(["w1"])  # the holder lets go: now anyone may take it
            seen.append(r.get(lease_key))
            taken = await other.acquire("w1")
            return seen, refusals, stale, taken
        finally:
            for s in (w0, w1, other, lookalike):
                await s.close()

    seen, refusals, stale, taken = asyncio.run(main())
    assert seen == [b"srv-a|0", b"srv-a|1", b"srv-a|1", None]
    assert len(refusals) == 2 and all("another server" in m for m in refusals)
    assert isinstance(stale[0], SessionMoved)
    assert taken == (b"rec1", True)


def test_a_write_from_memory_is_refused_once_another_server_took_the_session(
        redis_server) -> None:
    """``w`` fences what the seq cannot: a write of steps served from memory (it may
    start ahead of the record) is refused once another server took the session from
    the store, even with both leases lapsed and the record behind it; taking the
    session back makes this server's writes count again. A record from before ``w``
    existed, and one a degraded server writes first (upsert), are taken as they are."""
    async def main():
        me = RedisStore(redis_server.url, owner="me", ttl_s=60, lease_s=0.2, upsert=True)
        them = RedisStore(redis_server.url, owner="them", ttl_s=60, lease_s=0.2)
        r = redis_server.client()
        try:
            await me.create("x", b"rec0")
            await me.checkpoint_many([("x", b"rec1", 0, 1, False, False)])
            await asyncio.sleep(0.3)  # my lease lapses (my steps 1..3 from memory)
            took = await them.acquire("x")
            await them.checkpoint_many([("x", b"theirs2", 1, 2, False, False)])
            await asyncio.sleep(0.3)  # theirs too
            stale = await me.checkpoint_many([("x", b"mine4", 3, 4, False, True),
                                              ("x", b"mineF", 3, 4, True, True)])
            kept = r.hget("rnnserve:{x}:s", "data")
            back = await me.acquire("x")  # taken back: mine from here
            mine = await me.checkpoint_many([("x", b"mine3", 2, 3, False, True)])
            again = await me.acquire("x")  # mine since: nothing taken
            await me.create("old", b"rec0")  # a record written before w existed
            r.hdel("rnnserve:{old}:s", "w")
            legacy = await me.checkpoint_many([("old", b"rec5", 4, 5, False, True),
                                               ("new", b"rec7", 6, 7, False, True)])
            return (took, stale, kept, back, mine, again, legacy,
                    r.hget("rnnserve:{new}:s", "w"))
        finally:
            await me.close()
            await them.close()

    took, stale, kept, back, mine, again, legacy, new_writer = asyncio.run(main())
    assert took == (b"rec1", True)
    assert all(isinstance(s, SessionMoved) and "taken from the session store" in str(s)
               and "chunk 2" in str(s) for s in stale)
    assert kept == b"theirs2"
    assert back == (b"theirs2", True) and mine == [None] and again == (b"mine3", False)
    assert legacy == [None, None] and new_writer == b"me"
