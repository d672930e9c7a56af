"""Staged batch writes (``RedisStore``, ``_WRITE_MANY``): a step's record goes to Redis
as a staging hash ahead of the script call, which renames it into place, so no record
passes through Lua. Where an ACL refuses CLIENT REPLY the records go through the script
as before; both ways leave the same keys."""

from __future__ import annotations

import asyncio
import logging

import pytest

from rnnserve.server.errors import SessionExists, SessionHeld, SessionMoved
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
        out[key.decode()] = (value, r.pttl(key) > 0)
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
    assert "refuses CLIENT REPLY" not in caplog.text
    got_plain = asyncio.run(scenario(limited_url(plain)))
    assert "refuses CLIENT REPLY" in caplog.text
    assert verdicts(got_staged) == verdicts(got_plain) == [
        None, "SessionMoved", None, "SessionHeld", None, None,
        "SessionExists", "SessionHeld", None, None]
    keys = dump(staged)
    assert keys == dump(plain)
    assert not any(":n:" in k for k in keys), keys
    assert keys["rnnserve:{c}:s"] == ({b"seq": b"2", b"data": R("c2"), b"w": b"srv-a|1"}, True)
    assert keys["rnnserve:{new}:s"] == ({b"seq": b"4", b"data": R("n4"), b"w": b"srv-a|0"},
                                        True)
    assert keys["rnnserve:{b}:s"][0][b"data"] == R("b0")
    assert keys["rnnserve:{e}:f"] == (R("eF"), True) and "rnnserve:{gone}:s" not in keys
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


def test_a_staged_batch_after_the_script_cache_was_flushed(redis_server) -> None:
    """SCRIPT FLUSH between two writes: the records staged with the second are renamed
    into place once the script is loaded again; a refused one's staging key goes."""
    async def main():
        me = RedisStore(redis_server.url, owner="me", ttl_s=60, lease_s=10)
        r = redis_server.client()
        try:
            await me.create("x", R("rec0"))
            await me.create("y", R("rec0"))
            r.script_flush()
            got = await me.checkpoint_many([("x", R("rec1"), 0, 1, False, False),
                                            ("y", R("bad"), 7, 8, False, False)])
            return got, r.hgetall("rnnserve:{x}:s"), r.hget("rnnserve:{y}:s", "data"), \
                [k for k in r.keys("*") if b":n:" in k]
        finally:
            await me.close()

    got, x, y, staging = asyncio.run(main())
    assert got[0] is None and isinstance(got[1], SessionMoved)
    assert x == {b"seq": b"1", b"data": R("rec1"), b"w": b"me"} and y == R("rec0")
    assert staging == []


def test_a_held_session_create_refused_leaves_no_staging_key(redis_server) -> None:
    async def main():
        me = RedisStore(redis_server.url, owner="me", ttl_s=60, lease_s=10)
        them = RedisStore(redis_server.url, owner="them", ttl_s=60, lease_s=10)
        r = redis_server.client()
        try:
            await them.create("x", R("theirs"))
            refused = await me.checkpoint_many([("x", R("mine"), 0, 1, False, False)])
            return refused, r.keys("*:n:*"), r.hget("rnnserve:{x}:s", "data")
        finally:
            await me.close()
            await them.close()

    refused, staging, data = asyncio.run(main())
    assert isinstance(refused[0], SessionHeld) and staging == [] and data == R("theirs")


def test_small_records_go_through_the_script_with_replies_on(redis_server) -> None:
    """Records under ``STAGE_MIN_BYTES`` are not staged (two commands more would cost
    about what they save), and a batch of only such records leaves replies on: the one
    CLIENT REPLY is the connection's check."""
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
    assert stats["cmdstat_client|reply"]["calls"] == 1 and "cmdstat_rename" not in stats
