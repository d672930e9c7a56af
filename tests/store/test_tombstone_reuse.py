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
from rnnserve.server.shared import (
    Handoff,
    MovingStore,
    RedisStore,
    resharding_id,
    shard_of,
)

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


def test_a_leftover_tombstone_over_a_record_refuses_a_create_and_a_resume(shards) -> None:
    """A record under a tombstone (an old copy a hand-off left) is a session handed off:
    even once no resharding is under way, a create of its id is refused as existing and
    a resume as relocated (not answered as none), and neither key changes (``RESTORE``
    or the sweep deals with them)."""
    a = shards[0].url
    sid, = ids("under", 1)
    rec, lease = keys(sid)
    shards[0].client().hset(rec, mapping={"seq": 3, "data": b"old", "w": "x|0"})
    shards[0].client().set(lease, "moved", px=60000)

    async def main() -> None:
        plain = RedisStore(a, owner="p|0", ttl_s=60, lease_s=5)
        try:
            await plain.ping()
            assert shards[0].client().get("rnnserve:resharding") is None
            with pytest.raises(SessionExists):
                await plain.create(sid, b"zero")
            with pytest.raises(SessionRelocated, match="online resharding"):
                await plain.acquire(sid)
        finally:
            await plain.close()

    asyncio.run(main())
    assert shards[0].client().hgetall(rec) == {b"seq": b"3", b"data": b"old", b"w": b"x|0"}
    assert shards[0].client().get(lease) == b"moved"
    assert keys_of(shards[0], sid) == {"s", "l"}


def arrival(sid: str) -> str:
    return f"rnnserve:{{{sid}}}:a"


async def end_a_reshard_back(a: str, b: str) -> MovingStore:
    """Resharding online from [A, B] back to [A], ended by `reshard --online` (nothing
    to move): a tombstone ``leave_tombstones`` left on A stays there (the new list puts
    its id on A). Returns a server of that resharding, started before the end and not
    aware of it yet (the caller closes it)."""
    back = MovingStore([a], [a, b], owner="back|0", ttl_s=60, lease_s=5)
    await back.ping()
    ended = await asyncio.to_thread(reshard_online, [a, b], [a], ttl_s=60,
                                    log=lambda _: None)
    assert ended["moved"] == 0
    return back


def test_a_resume_over_a_leftover_tombstone_with_nothing_under_it_finds_no_session(
        shards) -> None:
    """A leftover tombstone with no record under it holds no session: a resume of its id
    is answered as for any id the store does not hold (None), not as relocated; by the
    store of a server of the resharding under way there (its own), and by a plain
    server once that resharding ended ("done ..."). Nothing is written: the tombstone
    stays, no lease is taken."""
    a, b = shards[0].url, shards[1].url
    own, done = ids("resume", 2)
    leave_tombstones(shards, [own, done])

    async def main() -> None:
        back = MovingStore([a], [a, b], owner="back|0", ttl_s=60, lease_s=5)
        try:
            await back.ping()
            assert shards[0].client().get("rnnserve:resharding") == \
                resharding_id([a, b], [a]).encode()
            assert await back.new.acquire(own) is None  # its shard of the new list: A
            assert await back.acquire(own) is None  # nor on its old shard, B
        finally:
            await back.close()
        ended = await asyncio.to_thread(reshard_online, [a, b], [a], ttl_s=60,
                                        log=lambda _: None)
        assert ended["moved"] == 0
        assert shards[0].client().get("rnnserve:resharding").startswith(b"done ")
        plain = RedisStore(a, owner="p|0", ttl_s=60, lease_s=5)
        try:
            await plain.ping()
            for sid in (done, own):
                assert await plain.acquire(sid) is None
        finally:
            await plain.close()

    asyncio.run(main())
    for sid in (own, done):
        assert keys_of(shards[0], sid) == {"l"}
        assert shards[0].client().get(keys(sid)[1]) == b"moved"
        assert keys_of(shards[1], sid) == {"a"}


def test_a_server_answers_a_resume_over_a_leftover_tombstone_as_unknown(
        repo, shards, tmp_path) -> None:
    """After an offline reshard back to [A] (no resharding recorded on A any more), a
    real server on [A] asked to resume an id whose tombstone A still holds, with no
    record under it, answers NOT_FOUND as for any unknown id (it answered ABORTED,
    relocated, before), and writes nothing; the id then opens as a new session."""
    a, b = shards[0].url, shards[1].url
    sid, = ids("srvresume", 1)
    leave_tombstones(shards, [sid])
    back = rnnserve("reshard", "--from", f"{a},{b}", "--to", a)
    assert back.returncode == 0, back.stderr
    assert shards[0].client().get("rnnserve:resharding") is None
    assert shards[0].client().get(keys(sid)[1]) == b"moved"
    p = serve(repo, tmp_path, "p", a)
    try:
        with Client(p.target, timeout=10) as on_p:
            err = refused(on_p.open_session, "feat", session_id=sid, resume=True)
            assert err.code() == grpc.StatusCode.NOT_FOUND, (err.code(), err.details())
            assert "is unknown to this server" in err.details(), err.details()
            assert keys_of(shards[0], sid) == {"l"}
            assert shards[0].client().get(keys(sid)[1]) == b"moved"
            assert on_p.open_session("feat", session_id=sid).next_seq == 0
    finally:
        assert p.stop() == 0


def test_a_leftover_tombstone_still_refuses_a_resume_while_another_resharding_is_under_way(
        shards) -> None:
    """A server on [A] (started once the reshard back ended) while another resharding,
    from [A] to [A, C], is under way on A: it is refused an id whose leftover tombstone A
    holds as relocated, to resume and to open anew, and writes nothing."""
    a, b, c = (s.url for s in shards)
    sid, = ids("other", 1)
    leave_tombstones(shards, [sid])

    async def main() -> None:
        await (await end_a_reshard_back(a, b)).close()
        plain = RedisStore(a, owner="p|0", ttl_s=60, lease_s=5)
        other = MovingStore([a, c], [a], owner="o|0", ttl_s=60, lease_s=5)
        try:
            await plain.ping()
            await other.ping()  # claims its resharding on A (and C)
            assert shards[0].client().get("rnnserve:resharding") == \
                resharding_id([a], [a, c]).encode()
            with pytest.raises(SessionRelocated, match="online resharding"):
                await plain.acquire(sid)
            with pytest.raises(SessionRelocated):
                await plain.create(sid, b"zero")
        finally:
            await plain.close()
            await other.close()

    asyncio.run(main())
    assert keys_of(shards[0], sid) == {"l"}
    assert shards[0].client().get(keys(sid)[1]) == b"moved"
    assert keys_of(shards[2], sid) == set()


def test_a_server_of_one_resharding_cannot_create_over_a_tombstone_while_another_is_under_way(
        shards) -> None:
    """A server of the resharding back to [A], still running after it ended (it has not
    seen the end), while another resharding (from [A] to [A, C]) is under way on A: its
    create of an id whose leftover tombstone A holds is refused as relocated (the
    tombstone may be that other resharding's), and nothing is written anywhere."""
    a, b, c = (s.url for s in shards)
    sid, = ids("rival", 1)
    leave_tombstones(shards, [sid])

    async def main() -> None:
        back = await end_a_reshard_back(a, b)
        other = MovingStore([a, c], [a], owner="o|0", ttl_s=60, lease_s=5)
        try:
            await other.ping()
            assert shards[0].client().get("rnnserve:resharding") == \
                other.resharding.encode() != back.resharding.encode()
            with pytest.raises(SessionRelocated):
                await back.create(sid, b"zero")
            with pytest.raises(SessionRelocated):  # its store of A, the shard of its id
                await back.new.acquire(sid)
        finally:
            await back.close()
            await other.close()

    asyncio.run(main())
    assert keys_of(shards[0], sid) == {"l"}
    assert shards[0].client().get(keys(sid)[1]) == b"moved"
    assert keys_of(shards[1], sid) == {"a"}
    assert keys_of(shards[2], sid) == set()


def test_a_create_over_a_leftover_tombstone_forgets_what_arrived_there_before(
        shards) -> None:
    """A shard can hold a session's tombstone and its arrival both: it arrived on B
    (resharding from [A] to [A, B]), was opened again there and handed off back to A
    after the reshard back ended, and ended on A. A server resharding to [A, B] again
    opens a new session of that id on B over that tombstone: the arrival goes with it.
    An older copy of the id handed off to B after that is then a session of that id
    opened there meanwhile (``RESTORE`` answers 0: left alone and logged), not one that
    arrived before (2: dropped); the new session's record stays as it is."""
    a, b = shards[0].url, shards[1].url
    sid, = ids("arrived", 1)
    leave_tombstones(shards, [sid])

    async def main() -> None:
        stray = RedisStore(b, owner="stray|0", ttl_s=60, lease_s=5, place=(1, 2))
        await stray.ping()  # on [A, B], not aware of the reshard back
        back = await end_a_reshard_back(a, b)
        try:
            await stray.create(sid, b"v0")  # B holds its arrival, no tombstone
            assert await stray.checkpoint_many([(sid, b"v1", 0, 1, False, False)]) == [None]
            await stray.release([sid])
            assert await back.acquire(sid) == (b"v1", True)  # handed off to A
            await back.delete(sid)  # ended on A
        finally:
            await stray.close()
            await back.close()
        assert keys_of(shards[1], sid) == {"l", "a"}
        assert shards[1].client().get(keys(sid)[1]) == b"moved"
        assert keys_of(shards[0], sid) == {"a"}

        again = MovingStore([a, b], [a], owner="again|0", ttl_s=60, lease_s=5)
        try:
            await again.ping()
            await again.create(sid, b"zero")
            assert keys_of(shards[1], sid) == {"s", "l"}  # the arrival went
            old = Handoff(b"v1", 1, 60000, "stray|0")
            assert await again._to(sid).restore(sid, old, lease=False) == 0
        finally:
            await again.close()

    asyncio.run(main())
    assert shards[1].client().hgetall(keys(sid)[0]) == \
        {b"seq": b"0", b"data": b"zero", b"w": b"again|0"}
    assert shards[1].client().get(keys(sid)[1]) == b"again|0"
    assert shards[1].client().get(arrival(sid)) is None
    assert keys_of(shards[0], sid) == {"a"}  # the other shard's keys are its own


def test_creates_over_leftover_tombstones_and_a_step_in_one_script_call(shards) -> None:
    """Writes that queue while one is in flight go out together in one script call:
    creates over leftover tombstones (one with an arrival key: it goes), creates of ids
    with no tombstone (one with an arrival key: it stays, a session of that id arrived
    and ended here), a create over a tombstone with a record under it (refused as
    existing, its keys untouched) and a step of a live session. Each create lands at
    seq 0 under this server's lease, the step applies, and no other key changes: a
    tombstone of an id not written, another server's session, the shard's marks."""
    a, b = shards[0].url, shards[1].url
    tomb1, tomb2, spare = ids("batch", 3)
    leave_tombstones(shards, [tomb1, tomb2, spare])
    back = rnnserve("reshard", "--from", f"{a},{b}", "--to", a)
    assert back.returncode == 0, back.stderr
    fresh0, fresh1, fresh2, live, held, under = (
        f"{n}-x" for n in ("fresh0", "fresh1", "fresh2", "live", "held", "under"))
    r = shards[0].client()
    r.set(arrival(tomb1), "1", px=60000)
    r.set(arrival(fresh1), "1", px=60000)
    r.hset(keys(under)[0], mapping={"seq": 3, "data": b"old", "w": "x|0"})
    r.set(keys(under)[1], "moved", px=60000)
    r.set(arrival(under), "1", px=60000)

    async def main() -> None:
        plain = RedisStore(a, owner="p|0", ttl_s=60, lease_s=5)
        another = RedisStore(a, owner="q|0", ttl_s=60, lease_s=5)
        try:
            await plain.ping()
            await another.ping()
            await another.create(held, b"theirs")
            await plain.create(live, b"zero")
            before = {k: r.dump(k) for k in r.keys("*")}
            calls: list[list[str]] = []
            write = plain._write

            async def spy(writes: list) -> object:
                calls.append([f"{kind} {sid}" for kind, _, _, sid, _ in writes])
                return await write(writes)

            plain._write = spy
            got = await asyncio.gather(
                plain.create(fresh0, b"f0"),  # in flight while the others queue
                plain.create(tomb1, b"t1"),
                plain.create(fresh1, b"f1"),
                plain.create(under, b"u"),
                plain.create(tomb2, b"t2"),
                plain.checkpoint_many([(live, b"one", 0, 1, False, False)]),
                plain.create(fresh2, b"f2"),
                return_exceptions=True)
        finally:
            await plain.close()
            await another.close()
        assert calls == [[f"c {fresh0}"],
                         [f"c {tomb1}", f"c {fresh1}", f"c {under}", f"c {tomb2}",
                          f"s {live}", f"c {fresh2}"]], calls
        assert isinstance(got[3], SessionExists), got
        assert got[:3] + got[4:] == [None, None, None, None, [None], None], got
        return before

    before = asyncio.run(main())
    for sid, data in ((fresh0, b"f0"), (tomb1, b"t1"), (fresh1, b"f1"), (tomb2, b"t2"),
                      (fresh2, b"f2")):
        assert r.hgetall(keys(sid)[0]) == {b"seq": b"0", b"data": data, b"w": b"p|0"}, sid
        assert r.get(keys(sid)[1]) == b"p|0", sid
    assert r.hgetall(keys(live)[0]) == {b"seq": b"1", b"data": b"one", b"w": b"p|0"}
    assert r.get(arrival(tomb1)) is None  # created over its tombstone
    assert keys_of(shards[0], tomb2) == {"s", "l"}
    assert keys_of(shards[0], fresh1) == {"s", "l", "a"}
    written = {k for sid in (fresh0, tomb1, fresh1, tomb2, fresh2, live)
               for k in (*keys(sid), arrival(sid))}
    after = {k: r.dump(k) for k in r.keys("*")}
    assert {k for k in after if k.decode() not in written} == \
        {k for k in before if k.decode() not in written}
    for k, blob in before.items():
        if k.decode() not in written or k.decode() == arrival(fresh1):
            assert after.get(k) == blob, k
    assert r.get(keys(spare)[1]) == b"moved"
    assert r.get(keys(under)[1]) == b"moved" and r.get(arrival(under)) == b"1"
