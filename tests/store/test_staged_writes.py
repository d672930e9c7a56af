"""Staged batch writes (``RedisStore``, ``_WRITE_MANY``): a step's record goes to Redis
as a staging hash ahead of the script call, which renames it into place, so no record
passes through Lua. Where an ACL refuses CLIENT REPLY the records go through the script
as before; both ways leave the same keys."""

from __future__ import annotations

import asyncio
import logging

import pytest

from rnnserve.server.errors import SessionExists, SessionHeld, SessionMoved, StoreUnavailable
from rnnserve.server.shared import STAGE_MIN_BYTES, RedisStore

from .conftest import RedisServer


def R(tag: str) -> bytes:
    """A record large enough to be staged."""
    return tag.encode().ljust(STAGE_MIN_BYTES, b".")


LIMITED = "limited"  # a user of the second redis-server that may not turn replies off


def limited_url(server) -> str:
    server.client().execute_command("ACL", "SETUSER", LIMITED, "on", ">pw", "~*", "&*",
                                    "+@all", "-client|reply")
    return f"redis://{LIMITED}:pw@127.0.0.1:{server.port}/0"


def renames(server) -> int:
    return server.client().info("commandstats").get("cmdstat_rename", {}).get("calls", 0)


async def scenario(url: str) -> list:
    """Creates, steps, a step from memory ahead of its record, refusals of every kind a
    step can meet, an end and a close, as one server (and its sibling worker, and
    another server) write them; the verdicts."""
    me = RedisStore(url, owner="srv-a|0", ttl_s=60, lease_s=30, upsert=True)
    sibling = RedisStore(url, owner="srv-a|1", ttl_s=60, lease_s=30)
    other = RedisStore(url, owner="srv-b|0", ttl_s=60, lease_s=30)
    got: list = []
    try:
        for sid in ("a", "b", "c", "e", "gone"):
            await me.create(sid, R(f"{sid}0"))
        await other.create("theirs", R("t0"))
        assert await sibling.acquire("c") == (R("c0"), True)  # w is now srv-a|1
        got.append(await me.checkpoint_many([
            ("a", b"a1", 0, 1, False, False),  # small: not staged
            ("b", R("b1"), 5, 6, False, False),  # not the stored seq: moved
            ("c", R("c1"), 0, 1, False, False),  # the sibling's lease: a step keeps its w
            ("theirs", R("x1"), 0, 1, False, False),  # another server's lease: held
            ("new", R("n4"), 3, 4, False, True),  # served from memory, no record: upsert
            ("e", R("eF"), 0, 1, True, False),  # the session's last chunk
        ]))
        for sid, data in (("a", R("again")), ("theirs", R("mine"))):
            try:
                await me.create(sid, data)
                got.append(None)
            except (SessionExists, SessionHeld) as exc:
                got.append(exc)
        await me.delete("gone")
        got.append(await me.checkpoint_many([("a", R("a2"), 1, 2, False, False),
                                             ("c", R("c2"), 1, 2, False, False)]))
    finally:
        for store in (me, sibling, other):
            await store.close()
    return got


def dump(server) -> dict:
    """Every key but the store's mark: its value and whether it expires."""
    r = server.client()
    out = {}
    for key in sorted(r.keys("rnnserve:{*")):
        kind = r.type(key).decode()
        value = r.hgetall(key) if kind == "hash" else r.get(key)
        out[key.decode()] = (value, r.pttl(key) // 10_000)  # ttl 60 s, lease 30 s
    return out


def verdicts(got: list) -> list:
    flat = [v for g in got for v in (g if isinstance(g, list) else [g])]
    return [None if v is None else type(v).__name__ for v in flat]


@pytest.fixture
def two(tmp_path):
    made = []
    try:
        for name in ("staged", "plain"):
            (tmp_path / name).mkdir()
            made.append(RedisServer(tmp_path / name))
        yield made
    finally:
        for s in made:
            s.stop()


def test_staged_and_plain_writes_leave_the_same_keys(two, caplog) -> None:
    """The same writes on a store that stages and on one whose ACL refuses CLIENT REPLY:
    the same verdicts and the same keys, values and expiries; no staging key left
    behind (refusals delete theirs); the staged store renamed each record that
    landed into place, the other none, and said why in the log."""
    staged, plain = two
    caplog.set_level(logging.WARNING, logger="rnnserve.shared")
    got_staged = asyncio.run(scenario(staged.url))
    assert "CLIENT REPLY" not in caplog.text
    got_plain = asyncio.run(scenario(limited_url(plain)))
    assert "does not take CLIENT REPLY OFF" in caplog.text
    assert verdicts(got_staged) == verdicts(got_plain) == [
        None, "SessionMoved", None, "SessionHeld", None, None,
        "SessionExists", "SessionHeld", None, None]
    keys = dump(staged)
    assert keys == dump(plain)
    assert not any(":n:" in k for k in keys), keys
    assert keys["rnnserve:{c}:s"] == ({b"seq": b"2", b"data": R("c2"), b"w": b"srv-a|1"}, 5)
    assert keys["rnnserve:{new}:s"] == ({b"seq": b"4", b"data": R("n4"), b"w": b"srv-a|0"}, 5)
    assert keys["rnnserve:{a}:l"] == (b"srv-a|0", 2)
    assert keys["rnnserve:{b}:s"][0][b"data"] == R("b0")
    assert keys["rnnserve:{e}:f"] == (R("eF"), 5) and "rnnserve:{gone}:s" not in keys
    assert keys["rnnserve:{a}:s"][0][b"data"] == R("a2")
    # staged and landed: 6 creates (5 mine, 1 theirs), 2 steps of the first batch (not
    # a's, small, b's or theirs, refused, nor e's end, never staged) and 2 of the last
    assert renames(staged) == 6 + 2 + 2 and renames(plain) == 0


def test_a_step_keeps_a_stored_record_without_writer_so(redis_server) -> None:
    """A record from before ``w`` existed: a step (not taken from memory) leaves it
    without one, as the plain write does."""
    async def main():
        me = RedisStore(redis_server.url, owner="me", ttl_s=60, lease_s=10)
        r = redis_server.client()
        try:
            await me.create("old", R("rec0"))
            r.hdel("rnnserve:{old}:s", "w")
            got = await me.checkpoint_many([("old", R("rec1"), 0, 1, False, False)])
            return got, r.hgetall("rnnserve:{old}:s")
        finally:
            await me.close()

    got, record = asyncio.run(main())
    assert got == [None] and record == {b"seq": b"1", b"data": R("rec1")}
    assert renames(redis_server) == 2


async def store_with(server, *sids: str) -> RedisStore:
    """This server's store, with the sessions ``sids`` created (records SID0)."""
    me = RedisStore(server.url, owner="me", ttl_s=60, lease_s=10)
    for sid in sids:
        await me.create(sid, R(f"{sid}0"))
    return me


def test_a_staged_batch_after_the_script_cache_was_flushed(redis_server) -> None:
    """SCRIPT FLUSH between two writes: the records staged with the second are renamed
    into place once the script is loaded again; a refused one's staging key goes."""
    async def main():
        me, r = await store_with(redis_server, "x", "y"), redis_server.client()
        try:
            r.script_flush()
            got = await me.checkpoint_many([("x", R("rec1"), 0, 1, False, False),
                                            ("y", R("bad"), 7, 8, False, False)])
            return got, r.hgetall("rnnserve:{x}:s"), r.hget("rnnserve:{y}:s", "data"), \
                [k for k in r.keys("*") if b":n:" in k]
        finally:
            await me.close()

    got, x, y, staging = asyncio.run(main())
    assert got[0] is None and isinstance(got[1], SessionMoved)
    assert x == {b"seq": b"1", b"data": R("rec1"), b"w": b"me"} and y == R("y0")
    assert staging == []


def test_refused_creates_and_steps_leave_no_staging_key(redis_server) -> None:
    async def main():
        me = RedisStore(redis_server.url, owner="me", ttl_s=60, lease_s=10)
        them = RedisStore(redis_server.url, owner="them", ttl_s=60, lease_s=10)
        r = redis_server.client()
        try:
            await them.create("x", R("theirs"))
            try:
                await me.create("x", R("mine"))
                created = None
            except SessionHeld as exc:
                created = exc
            stepped = await me.checkpoint_many([("x", R("mine"), 0, 1, False, False)])
            return created, stepped, r.keys("*:n:*"), r.hget("rnnserve:{x}:s", "data")
        finally:
            await me.close()
            await them.close()

    created, stepped, staging, data = asyncio.run(main())
    assert isinstance(created, SessionHeld) and isinstance(stepped[0], SessionHeld)
    assert staging == [] and data == R("theirs")


async def one_call(url: str) -> list:
    """Two creates of one id, two steps of one session from the same seq, and two
    steps of another one after the other, all in one script call (they queue behind a
    write in flight); the verdicts."""
    me = RedisStore(url, owner="me", ttl_s=60, lease_s=30)
    try:
        await me.create("y", R("y0"))
        await me.create("z", R("z0"))
        return await asyncio.gather(
            me.create("w", R("w0")),  # in flight while the others queue
            me.create("x", R("x-first")),
            me.create("x", R("x-second")),
            me.checkpoint_many([("y", R("y1-a"), 0, 1, False, False)]),
            me.checkpoint_many([("y", R("y1-b"), 0, 1, False, False)]),
            me.checkpoint_many([("z", R("z1"), 0, 1, False, False)]),
            me.checkpoint_many([("z", R("z2"), 1, 2, False, False)]),
            return_exceptions=True)
    finally:
        await me.close()


def test_two_writes_of_one_session_in_one_call_stage_apart(two) -> None:
    """Each staged write has a key of its own: the refused one of two writes of a
    session in one call leaves the other's record, as the plain write does."""
    staged, plain = two
    got = [asyncio.run(one_call(staged.url)), asyncio.run(one_call(limited_url(plain)))]
    assert verdicts(got[0]) == verdicts(got[1]) == [
        None, None, "SessionExists", None, "SessionMoved", None, None]
    keys = dump(staged)
    assert keys == dump(plain)
    assert keys["rnnserve:{x}:s"][0][b"data"] == R("x-first")
    assert keys["rnnserve:{y}:s"][0] == {b"seq": b"1", b"data": R("y1-a"), b"w": b"me"}
    assert keys["rnnserve:{z}:s"][0] == {b"seq": b"2", b"data": R("z2"), b"w": b"me"}
    assert renames(staged) == 4 + 3  # y, z, w, x-first; y1-a, z1, z2


def test_a_staged_record_that_did_not_land_fails_its_write_alone(redis_server) -> None:
    """Out of memory (maxmemory reached, no eviction), the staged records' writes fail
    unseen (replies are off): each write whose record is missing is refused alone as
    UNAVAILABLE, nothing is half written, and once memory is there the same writes go
    through."""
    async def main():
        me, r = await store_with(redis_server, "x", "y"), redis_server.client()
        try:
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)
            steps = [("x", R("x1"), 0, 1, False, False), ("y", R("y1"), 0, 1, False, False)]
            full = await me.checkpoint_many(steps)
            r.config_set("maxmemory", 0)
            kept = [r.hget(f"rnnserve:{{{s}}}:s", "data") for s in "xy"]
            again = await me.checkpoint_many(steps)
            return full, kept, again, r.hget("rnnserve:{y}:s", "data"), r.keys("*:n:*")
        finally:
            await me.close()

    full, kept, again, y, staging = asyncio.run(main())
    assert all(isinstance(v, StoreUnavailable) and "did not keep" in str(v) for v in full)
    assert kept == [R("x0"), R("y0")] and again == [None, None] and y == R("y1")
    assert staging == []


def test_small_records_go_through_the_script_with_replies_on(redis_server) -> None:
    """Records under ``STAGE_MIN_BYTES`` are not staged (two commands more would cost
    about what they save), and a batch of only such records leaves replies on: the only
    CLIENT REPLY calls are the connection's check."""
    async def main():
        me = RedisStore(redis_server.url, owner="me", ttl_s=60, lease_s=10)
        try:
            await me.create("x", b"rec0")
            got = await me.checkpoint_many([("x", b"rec1", 0, 1, False, False)])
            return got, redis_server.client().hgetall("rnnserve:{x}:s")
        finally:
            await me.close()

    got, record = asyncio.run(main())
    assert got == [None] and record == {b"seq": b"1", b"data": b"rec1", b"w": b"me"}
    stats = redis_server.client().info("commandstats")
    # the connection's check: OFF, ON
    assert stats["cmdstat_client|reply"]["calls"] == 2 and "cmdstat_rename" not in stats
