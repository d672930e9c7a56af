"""The tombstone an online resharding leaves on a session's old shard (``moved``)
refuses that id to servers still on the old list while the resharding is under way,
creates included. One left behind after the resharding ended (a hand-off that came
after `reshard --online` dropped the tombstones) does not keep a later session of that
id from opening where a later list puts it: a create is new data. Real redis-servers,
the stores as the server uses them, `rnnserve reshard` and a real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from rnnserve.client import Client
from rnnserve.server.errors import SessionExists, SessionHeld, SessionRelocated
from rnnserve.server.reshard import reshard_online
from rnnserve.server.shared import MovingStore, RedisStore, resharding_id, shard_of

from ..cli.test_cli import rnnserve
from .test_failover import serve
from .test_reshard_online import Sessions, keys_of, refused


def ids(prefix: str, count: int) -> list[str]:
    """Ids that two shards put on the second one (one shard: on the first)."""
    return [s for s in (f"{prefix}-{i}" for i in range(200)) if shard_of(s, 2) == 1][:count]


def keys(sid: str) -> tuple[str, str]:
    return f"rnnserve:{{{sid}}}:s", f"rnnserve:{{{sid}}}:l"


def leave_tombstones(shards, sids: list[str]) -> None:
    """Resharding online from [A] to [A, B] puts ``sids`` on B; it ends (`reshard
    --online` finds nothing to move and drops no tombstone). A server left on [A] that
    has not seen the end yet opens them on A, and stops; a server of the resharding
    that has not seen the end either loads them: handed off to B, each leaves its
    tombstone on A, after the last sweep. Then they end (closed) on B."""
    a, b = shards[0].url, shards[1].url

    async def main() -> None:
        stray = RedisStore(a, owner="stray|0", ttl_s=60, lease_s=5)
        await stray.ping()
        moving = MovingStore([a, b], [a], owner="n|0", ttl_s=60, lease_s=5)
        await moving.ping()
        try:
            ended = await asyncio.to_thread(reshard_online, [a], [a, b], ttl_s=60,
                                            log=lambda _: None)
            assert ended["moved"] == 0
            for sid in sids:
                await stray.create(sid, b"old")
            await stray.release(sids)
            for sid in sids:
                assert await moving.acquire(sid) == (b"old", True)
                await moving.delete(sid)
        finally:
            await stray.close()
            await moving.close()

    asyncio.run(main())
    for sid in sids:  # nothing of the sessions lives anywhere: a tombstone on A
        assert keys_of(shards[0], sid) == {"l"}
        assert shards[0].client().get(keys(sid)[1]) == b"moved"
        assert keys_of(shards[1], sid) == {"a"}  # B: it arrived (and ended) there


def test_an_id_reused_after_a_reshard_back_opens_over_a_leftover_tombstone(shards) -> None:
    """Resharding back online from [A, B] to [A]: its server opens a new session of
    an id whose tombstone A still holds (its new list puts the id there, where this
    resharding never leaves one): a fresh record at seq 0 under its lease, stepped as
    any; another server is refused it as held, not relocated. Once that resharding
    ended, a server on [A] alone opens another such id too."""
    a, b = shards[0].url, shards[1].url
    during, after = ids("reuse", 2)
    leave_tombstones(shards, [during, after])

    async def main() -> None:
        back = MovingStore([a], [a, b], owner="back|0", ttl_s=60, lease_s=5)
        other = MovingStore([a], [a, b], owner="other|0", ttl_s=60, lease_s=5)
        try:
            await back.ping()
            await other.ping()
            await back.create(during, b"zero")
            assert shards[0].client().hgetall(keys(during)[0]) == \
                {b"seq": b"0", b"data": b"zero", b"w": b"back|0"}
            assert shards[0].client().get(keys(during)[1]) == b"back|0"
            assert await back.checkpoint_many([(during, b"one", 0, 1, False, False)]) == [None]
            with pytest.raises(SessionHeld) as held:
                await other.acquire(during)
            assert not isinstance(held.value, SessionRelocated), held.value
            await back.release([during])
            assert await other.acquire(during) == (b"one", True)
            with pytest.raises(SessionExists):  # a live id stays refused
                await other.create(during, b"again")
        finally:
            await back.close()
            await other.close()
        ended = await asyncio.to_thread(reshard_online, [a, b], [a], ttl_s=60,
                                        log=lambda _: None)
        assert ended["moved"] == 0
        assert shards[0].client().get(keys(after)[1]) == b"moved"  # on the new list's shard
        plain = RedisStore(a, owner="p|0", ttl_s=60, lease_s=5)
        try:
            await plain.ping()
            await plain.create(after, b"zero")
            assert await plain.checkpoint_many([(after, b"one", 0, 1, False, False)]) == [None]
            assert shards[0].client().hget(keys(after)[0], "data") == b"one"
        finally:
            await plain.close()

    asyncio.run(main())
    done = f"done {resharding_id([a, b], [a])}".encode()
    assert shards[0].client().get("rnnserve:resharding") == done


def test_a_server_opens_a_reused_id_over_a_leftover_tombstone_from_zero(
        repo, shards, tmp_path) -> None:
    """After an offline reshard back to [A], a real server on [A] opens a session of an
    id whose tombstone A still holds: it starts from the zero state and steps exactly
    as one run of its inputs (it was refused as relocated before), and while it is
    live, its id is refused to another open as existing."""
    a, b = shards[0].url, shards[1].url
    sid, = ids("srv", 1)
    leave_tombstones(shards, [sid])
    back = rnnserve("reshard", "--from", f"{a},{b}", "--to", a)
    assert back.returncode == 0, back.stderr
    assert shards[0].client().get(keys(sid)[1]) == b"moved"
    work = Sessions([sid], seed=91)
    p = serve(repo, tmp_path, "p", a)
    try:
        with Client(p.target, timeout=10) as on_p:
            on_p.open_session("feat", session_id=sid)
            work.step(on_p, sid)
            work.step(on_p, sid)
            err = refused(on_p.open_session, "feat", session_id=sid)
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
            work.step(on_p, sid, end=True)
    finally:
        assert p.stop() == 0
    work.check(repo)


def test_a_tombstone_still_refuses_the_old_list_while_the_resharding_is_under_way(
        shards) -> None:
    """Resharding online from [A] to [A, B], under way: a session handed off to B leaves
    its tombstone on A, and a server still on [A] is refused it as relocated, to resume,
    to step and to open anew (a second session of that id on A), also once it ended on
    B (the arrival B keeps would drop an id opened on A as a stale copy). The
    resharding's server opens the ended id anew on B."""
    a, b = shards[0].url, shards[1].url
    sid, = ids("fence", 1)

    async def main() -> None:
        old = RedisStore(a, owner="old|0", ttl_s=60, lease_s=5)
        await old.ping()
        moving = MovingStore([a, b], [a], owner="n|0", ttl_s=60, lease_s=5)
        try:
            await moving.ping()
            await old.create(sid, b"v0")
            assert await old.checkpoint_many([(sid, b"v1", 0, 1, False, False)]) == [None]
            await old.release([sid])
            assert await moving.acquire(sid) == (b"v1", True)  # handed off to B
            assert shards[0].client().get(keys(sid)[1]) == b"moved"
            for call in (lambda: old.acquire(sid), lambda: old.create(sid, b"new")):
                with pytest.raises(SessionRelocated, match="online resharding"):
                    await call()
            refusals = await old.checkpoint_many([(sid, b"v2", 1, 2, False, False)])
            assert isinstance(refusals[0], SessionRelocated)
            await moving.delete(sid)  # ended on B
            with pytest.raises(SessionRelocated):
                await old.create(sid, b"new")
            assert keys_of(shards[0], sid) == {"l"}  # nothing written on A
            await moving.create(sid, b"anew")  # its new list puts it on B
            assert shards[1].client().hget(keys(sid)[0], "data") == b"anew"
        finally:
            await old.close()
            await moving.close()

    asyncio.run(main())


def test_a_leftover_tombstone_over_a_record_is_not_overwritten_by_a_create(shards) -> None:
    """A record under a tombstone (an old copy a hand-off left) is not replaced by a
    create, even once no resharding is under way: the create is refused as existing and
    both keys stay as they were (``RESTORE`` or the sweep deals with them)."""
    a = shards[0].url
    sid, = ids("under", 1)
    rec, lease = keys(sid)
    shards[0].client().hset(rec, mapping={"seq": 3, "data": b"old", "w": "x|0"})
    shards[0].client().set(lease, "moved", px=60000)

    async def main() -> None:
        plain = RedisStore(a, owner="p|0", ttl_s=60, lease_s=5)
        try:
            await plain.ping()
            with pytest.raises(SessionExists):
                await plain.create(sid, b"zero")
        finally:
            await plain.close()

    asyncio.run(main())
    assert shards[0].client().hget(rec, "data") == b"old"
    assert shards[0].client().get(lease) == b"moved"
