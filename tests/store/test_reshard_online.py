"""Resharding online: servers restarted one by one with ``--session-store NEW
--session-store-from OLD`` hand off each session they load that is not on its new
shard yet, servers still on the old list are refused the sessions handed off, and
``rnnserve reshard --online`` moves the rest and marks the shards. Real servers, real
redis-servers, the command as a user runs it; every session goes on exactly."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from rnnserve.client import Client
from rnnserve.server.shared import HANDOFF, RESTORE, resharding_id, shard_of

from ..cli.test_cli import assert_one_line_error, rnnserve
from ..server.serving import metric_value
from ..server.test_grpc_api import whole_run
from .test_failover import serve

STEPS = 3  # steps per chunk


def keys_of(shard, sid: str) -> set[str]:
    """The kinds of session ``sid``'s keys a shard holds (s, l, f, a)."""
    return {k.decode()[-1] for k in shard.client().keys(f"rnnserve:{{{sid}}}:?")}


def refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


class Sessions:
    """Sessions of the feat model fed chunk by chunk from their own inputs, wherever
    they are stepped; what each answered, to compare with one whole run at the end."""

    def __init__(self, sids: list[str], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.x = {s: rng.standard_normal((6 * STEPS, 20)).astype(np.float32) for s in sids}
        self.got: dict[str, list[np.ndarray]] = {s: [] for s in sids}

    def step(self, client: Client, sid: str, end: bool = False) -> None:
        k = len(self.got[sid])
        self.got[sid].append(client.step(sid, k, self.x[sid][k * STEPS:(k + 1) * STEPS],
                                         end=end)["logits"])

    def chunk(self, sid: str) -> np.ndarray:
        k = len(self.got[sid])
        return self.x[sid][k * STEPS:(k + 1) * STEPS]

    def check(self, repo) -> None:
        for sid, parts in self.got.items():
            want = whole_run(repo, "feat", 1, self.x[sid][:len(parts) * STEPS])
            got = np.concatenate(parts)
            assert float(np.abs(got - want).max()) <= 1e-5, sid


def test_servers_hand_off_sessions_as_they_load_them_and_reshard_online_moves_the_rest(
        repo, shards, tmp_path) -> None:
    """Two shards to three, with servers running throughout. Server O runs on the old
    list, N on the new one from the old. A session the third shard takes is refused to
    N while O's lease on it is live, then handed off to N on its first load; O is then
    refused it (it would otherwise write the old copy), an id still on its old shard
    is handed off and refused as live when N opens it, and sessions that stay are
    shared as ever. `reshard
    --online` refuses to finish while O holds sessions, then, O stopped, hands off the
    rest (a session O opened meanwhile too), drops the tombstones and marks the shards;
    a server on the new list alone goes on with every session exactly. Meanwhile a
    server on the new list alone, or on both in another order, does not start, nor
    does the offline reshard."""
    old, new = (",".join(s.url for s in shards[:n]) for n in (2, 3))
    sids = [f"on-{i}" for i in range(12)]
    movers = [s for s in sids if shard_of(s, 3) == 2]
    stay = [s for s in sids if s not in movers]
    assert len(movers) >= 3 and stay
    late = next(f"late-{i}" for i in range(100) if shard_of(f"late-{i}", 3) == 2)
    work = Sessions([*sids, late], seed=81)
    m0, m1 = movers[:2]

    o = serve(repo, tmp_path, "o", old, "--lease-s", "3")
    n = None
    try:
        with Client(o.target, timeout=10) as on_o:
            for sid in sids:
                on_o.open_session("feat", session_id=sid)
                work.step(on_o, sid)
            # before any server runs the resharding, the sweep refuses; a server whose
            # old list is in another order is refused, and leaves no claim behind
            early = rnnserve("reshard", "--from", old, "--to", new, "--online")
            assert_one_line_error(early, "not being resharded online to these lists",
                                  "first restart every server")
            swapped_old = ",".join(x.url for x in (shards[1], shards[0]))
            with pytest.raises(RuntimeError) as failed:
                serve(repo, tmp_path, "bad", new, "--session-store-from", swapped_old)
            assert "every server must list the same shards" in str(failed.value)
            assert {x.client().get("rnnserve:resharding") for x in shards} == {None}
            n = serve(repo, tmp_path, "n", new, "--session-store-from", old, "--lease-s", "3")
            with Client(n.target, timeout=10) as on_n:
                for sid in movers:  # O renews its leases (held for 3 s from now)
                    work.step(on_o, sid)
                # O's lease is live: not handed off, nothing changes
                err = refused(on_n.step, m0, 2, work.chunk(m0))
                assert err.code() == grpc.StatusCode.ABORTED, err.details()
                assert "being written by another server" in err.details()
                assert keys_of(shards[2], m0) == set()
                early = rnnserve("reshard", "--from", old, "--to", new, "--online",
                                 "--wait-s", "0")
                assert_one_line_error(early, "still written by servers on the old list",
                                      "nothing is marked yet")
                # shards of both lists keep their old marks; the new one has its own
                assert [s.client().get("rnnserve:shard") for s in shards] == \
                    [b"0/2", b"1/2", b"2/3"]
                time.sleep(3.2)  # O's leases lapse; O still holds its copies
                work.step(on_n, m0)  # handed off on its first load
                assert keys_of(shards[2], m0) == {"s", "l", "a"}
                src = shards[shard_of(m0, 2)]
                assert keys_of(src, m0) == {"l"}  # the old record dropped, a tombstone
                assert src.client().get(f"rnnserve:{{{m0}}}:l") == b"moved"
                # O's copy is behind and O may no longer write the old one
                for call in (lambda: on_o.step(m0, 2, work.chunk(m0)),
                             lambda: on_o.open_session("feat", session_id=m0, resume=True)):
                    err = refused(call)
                    assert err.code() == grpc.StatusCode.ABORTED, err.details()
                    assert "online resharding" in err.details()
                assert metric_value(o.metrics(), "rnnserve_store_refusals_total",
                                    reason="relocated") == 1  # the step's write
                moves = metric_value(n.metrics(), "rnnserve_store_seconds_count", op="move",
                                     shard="2")
                assert moves == 1  # the restore on the new shard
                work.step(on_n, m0)
                work.step(on_n, stay[0])  # a session that stays: the same keys for both
                # an id on its old shard: handed off, then refused as any live id
                err = refused(on_n.open_session, "feat", session_id=m1)
                assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
                assert keys_of(shards[2], m1) == {"s", "a"}  # no lease taken
                on_o.open_session("feat", session_id=late)  # on the old list, meanwhile
                work.step(on_o, late)
            # while the resharding is under way, a server on the new list alone, or on
            # both lists in another order, would look elsewhere: refused at start
            swapped = ",".join(x.url for x in (shards[1], shards[0], shards[2]))
            for name, flags, needle in (
                    ("alone", (new,), "does not take part"),
                    ("swapped", (swapped, "--session-store-from", old),
                     "runs another resharding")):
                with pytest.raises(RuntimeError) as failed:
                    serve(repo, tmp_path, name, *flags)
                assert needle in str(failed.value), str(failed.value)
            offline = rnnserve("reshard", "--from", old, "--to", new, "--ignore-leases")
            assert_one_line_error(offline, "being resharded online", "--online")
        assert o.stop() == 0  # drains: its leases are released

        done = rnnserve("reshard", "--from", old, "--to", new, "--online")
        assert done.returncode == 0, done.stderr
        handed = len(movers) - 2 + 1  # every mover but m0 and m1, and late
        assert f"handed off {handed} session(s)" in done.stdout, done.stdout
        assert [s.client().get("rnnserve:shard") for s in shards] == [b"0/3", b"1/3", b"2/3"]
        for sid in [*movers, late]:
            assert keys_of(shards[shard_of(sid, 2)], sid) == set(), sid  # no tombstone left
            assert "s" in keys_of(shards[2], sid), sid
        for sid in stay:
            assert "s" in keys_of(shards[shard_of(sid, 3)], sid)
        assert {s.client().get("rnnserve:resharding") for s in shards} == \
            {f"done {resharding_id(old.split(','), new.split(','))}".encode()}
        again = rnnserve("reshard", "--from", old, "--to", new, "--online")
        assert again.returncode == 0 and "handed off 0 session(s)" in again.stdout, again.stdout
    finally:
        o.stop()
        if n is not None:
            assert n.stop() == 0

    p = serve(repo, tmp_path, "p", new)  # the new list alone: the resharding ended
    try:
        with Client(p.target, timeout=10) as on_p:
            for sid in [*sids, late]:
                work.step(on_p, sid, end=True)
    finally:
        assert p.stop() == 0
    work.check(repo)


def test_hand_offs_cut_short_are_finished_and_an_ended_session_stays_ended(
        repo, shards, tmp_path) -> None:
    """Movers that died between the steps of a hand-off. One died after the tombstone,
    before the new shard had the record: N's first load finishes the hand-off and goes
    on exactly. One died after writing the new shard, before dropping the old record:
    N goes on from the new shard; once that session ended there (a retry of its last
    chunk gets the stored final answer), its old record never brings it back: the
    sweep drops it, and the id may be opened anew."""
    old, new = (",".join(s.url for s in shards[:n]) for n in (2, 3))
    cut, late = [sid for sid in (f"cut-{i}" for i in range(100)) if shard_of(sid, 3) == 2][:2]
    work = Sessions([cut, late], seed=82)
    o = serve(repo, tmp_path, "o", old)
    try:
        with Client(o.target, timeout=10) as on_o:
            for sid in (cut, late):
                on_o.open_session("feat", session_id=sid)
                work.step(on_o, sid)
    finally:
        assert o.stop() == 0

    def keys(sid: str) -> tuple[str, str, str]:
        return tuple(f"rnnserve:{{{sid}}}:{k}" for k in "sla")  # type: ignore[return-value]

    for sid in (cut, late):  # the first half, by hand
        src = shards[shard_of(sid, 2)].client()
        status = src.register_script(HANDOFF)(keys=keys(sid)[:2], args=["died|0", 300000])
        assert status[0] == b"ok" and src.get(keys(sid)[1]) == b"moved"
        if sid == late:  # and the second: the new shard written, the old record kept
            wrote = shards[2].client().register_script(RESTORE)(
                keys=list(keys(sid)), args=[status[2], status[1], status[3], status[4], "", 0])
            assert wrote == 1
    assert keys_of(shards[2], cut) == set() and keys_of(shards[2], late) == {"s", "a"}

    n = serve(repo, tmp_path, "n", new, "--session-store-from", old)
    try:
        with Client(n.target, timeout=10) as on_n:
            for sid in (cut, late):
                work.step(on_n, sid)
            src = shards[shard_of(cut, 2)].client()
            assert not src.exists(keys(cut)[0]) and src.get(keys(cut)[1]) == b"moved"
            assert shards[shard_of(late, 2)].client().exists(keys(late)[0])  # left to sweep
            work.step(on_n, late, end=True)
            assert keys_of(shards[2], late) == {"f", "a"}  # ended: its final answer
            retried = on_n.step(late, 2, work.x[late][2 * STEPS:3 * STEPS], end=True)
            assert np.array_equal(retried["logits"], work.got[late][-1])  # not a rerun
            err = refused(on_n.step, late, 3, work.chunk(late))
            assert err.code() in (grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.FAILED_PRECONDITION), err.details()
        done = rnnserve("reshard", "--from", old, "--to", new, "--online")
        assert done.returncode == 0, done.stderr
        assert "handed off 0 session(s) (1 were on their new shard already" in done.stdout, \
            done.stdout
        for sid in (cut, late):
            assert keys_of(shards[shard_of(sid, 2)], sid) == set()
        assert "s" not in keys_of(shards[2], late)  # not brought back
        with Client(n.target, timeout=10) as on_n:
            work.step(on_n, cut, end=True)
            # the ended one's id may be opened anew (as OIP clients reuse sequence ids)
            on_n.open_session("feat", session_id=late)
            on_n.close_session(late)
    finally:
        assert n.stop() == 0
    work.check(repo)


def test_resharding_online_settings_are_checked(repo, tmp_path) -> None:
    for flags, needle in (
            (("--session-store-from", "redis://127.0.0.1:1/0"), "needs a session_store"),
            (("--session-store", "redis://127.0.0.1:1/0",
              "--session-store-from", "redis://127.0.0.1:1/0"), "same list"),
            (("--session-store", "redis://127.0.0.1:1/0",
              "--session-store-from", "http://x"), "session_store_from must be")):
        got = rnnserve("serve", "--repo", str(repo), *flags)
        assert_one_line_error(got, needle)
    both = rnnserve("reshard", "--from", "redis://a:1/0", "--to", "redis://b:1/0",
                    "--online", "--dry-run")
    assert_one_line_error(both, "--online", "no --dry-run")


def test_an_id_whose_old_shard_cannot_be_reached_is_not_served_from_memory(
        repo, shards, tmp_path) -> None:
    """With --store-failure degrade a server serves from memory while the store fails;
    but an id whose old shard does not answer may still live there (on a server of the
    old list): its open is refused UNAVAILABLE, not served from memory, which could run
    one session on two shards. Once the old shard answers, the id opens."""
    old, new = (",".join(s.url for s in shards[:n]) for n in (2, 3))
    sid = next(f"deg-{i}" for i in range(100) if shard_of(f"deg-{i}", 3) == 2)
    n = serve(repo, tmp_path, "n", new, "--session-store-from", old, "--store-failure",
              "degrade", "--store-timeout-ms", "300")
    try:
        with Client(n.target, timeout=10) as on_n:
            shards[shard_of(sid, 2)].client().execute_command("CLIENT", "PAUSE", "1500")
            started = time.monotonic()
            err = refused(on_n.open_session, "feat", session_id=sid)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert "online resharding" in err.details()
            assert metric_value(n.metrics(), "rnnserve_store_degraded_total", op="create") == 0
            time.sleep(max(0.0, 1.7 - (time.monotonic() - started)))
            on_n.open_session("feat", session_id=sid)
            work = Sessions([sid], seed=83)
            work.step(on_n, sid, end=True)
    finally:
        assert n.stop() == 0
    work.check(repo)


def test_a_tombstone_left_by_an_earlier_resharding_does_not_hide_a_session(shards) -> None:
    """Resharding back soon after a resharding (two shards to one): the session's shard
    of the new list still holds a tombstone and a stale record the earlier resharding
    left (a mover that died before dropping them). The session loads from its shard of
    the previous list, over them: the newest record, not the stale one, nor a refusal."""
    import asyncio

    from rnnserve.server.shared import MovingStore

    r0, r1 = shards[0], shards[1]
    sid = next(f"back-{i}" for i in range(100) if shard_of(f"back-{i}", 2) == 1)
    rec, lease = f"rnnserve:{{{sid}}}:s", f"rnnserve:{{{sid}}}:l"
    r0.client().hset(rec, mapping={"seq": 1, "data": b"stale", "w": "a"})
    r0.client().set(lease, "moved", px=60000)
    r1.client().hset(rec, mapping={"seq": 5, "data": b"newest", "w": "b"})
    r1.client().pexpire(rec, 60000)

    async def load() -> tuple[bytes, bool] | None:
        store = MovingStore([r0.url], [r0.url, r1.url], owner="c|0", ttl_s=60, lease_s=5)
        try:
            return await store.acquire(sid)
        finally:
            await store.close()

    assert asyncio.run(load()) == (b"newest", True)
    assert r0.client().hgetall(rec) == {b"seq": b"5", b"data": b"newest", b"w": b"c|0"}
    assert r0.client().get(lease) == b"c|0"
    assert not r1.client().exists(rec) and r1.client().get(lease) == b"moved"


def test_once_the_resharding_ended_a_dropped_shard_may_be_gone(shards) -> None:
    """Three shards to two, ended by `reshard --online`, the third Redis shut down while
    servers still run with --session-store-from: ids it held no longer need it, and an
    id opens on its new shard instead of UNAVAILABLE for an old shard that is gone."""
    import asyncio

    from rnnserve.server.shared import MovingStore

    old, new = [s.url for s in shards], [s.url for s in shards[:2]]
    sid = next(f"gone-{i}" for i in range(100) if shard_of(f"gone-{i}", 3) == 2)
    for s in shards:
        s.client().set("rnnserve:resharding", f"done {resharding_id(old, new)}")
    shards[2].stop()

    async def open_one() -> None:
        store = MovingStore(new, old, owner="c|0", ttl_s=60, lease_s=5, timeout_s=0.5)
        try:
            await store.create(sid, b"first")
        finally:
            await store.close()

    asyncio.run(open_one())
    home = shards[shard_of(sid, 2)].client()
    assert home.hget(f"rnnserve:{{{sid}}}:s", "data") == b"first"


def test_a_server_left_on_the_old_list_stops_once_the_resharding_ends(
        repo, shards, tmp_path) -> None:
    """Three shards to two, online, while a server on the old list alone missed the
    rollout. It serves on while the resharding runs (a session handed off meanwhile is
    refused it) and, holding no lease, does not hold up `reshard --online`; once that
    ends, the third shard retired, the server finds its list changed within
    --store-check-s, drains and exits with status 3. The resharding's server runs on
    through the end; one started after the end with both lists starts, and serves the
    new list alone: a shard that lost its marks gets the new list's, and no resharding
    is claimed again. A resharding back to three shards takes the retired one again,
    also when that shard does not answer as its servers start (a check that finds it
    retired meanwhile leaves it to its first use, which takes it)."""
    old, new = (",".join(s.url for s in shards[:n]) for n in (3, 2))
    sid = next(f"miss-{i}" for i in range(100) if shard_of(f"miss-{i}", 3) == 2)
    work = Sessions([sid], seed=83)
    check = ("--store-check-s", "0.3")
    stray = serve(repo, tmp_path, "stray", old, "--lease-s", "1", *check)
    n = None
    try:
        with Client(stray.target, timeout=10) as on_stray:
            on_stray.open_session("feat", session_id=sid)
            work.step(on_stray, sid)
            n = serve(repo, tmp_path, "n", new, "--session-store-from", old, *check)
            time.sleep(1.2)  # the stray's lease lapses
            with Client(n.target, timeout=10) as on_n:
                work.step(on_n, sid)  # handed off from the third shard
            err = refused(on_stray.step, sid, 1, work.chunk(sid))
            assert err.code() == grpc.StatusCode.ABORTED, err.details()
            assert stray.proc.poll() is None  # the resharding is under way: serves on
        done = rnnserve("reshard", "--from", old, "--to", new, "--online")
        assert done.returncode == 0, done.stderr
        assert [s.client().get("rnnserve:shard") for s in shards] == \
            [b"0/2", b"1/2", b"retired"]
        assert stray.proc.wait(20) == 3
        log = stray.log.read_text()
        assert "the list was changed (`rnnserve reshard`) since this server started" in log
        shards[0].client().delete("rnnserve:shard", "rnnserve:resharding")  # as emptied
        late = serve(repo, tmp_path, "late", new, "--session-store-from", old, *check)
        assert late.stop() == 0
        assert shards[0].client().get("rnnserve:shard") == b"0/2"  # the new list's
        assert shards[0].client().get("rnnserve:resharding") is None
        with Client(n.target, timeout=10) as on_n:
            work.step(on_n, sid, end=True)
        assert n.proc.poll() is None
    finally:
        stray.stop()
        if n is not None:
            assert n.stop() == 0
    work.check(repo)
    there = next(f"back-{i}" for i in range(100) if shard_of(f"back-{i}", 3) == 2)
    shards[2].client().execute_command("CLIENT", "PAUSE", "4000")
    paused = time.monotonic()
    back = serve(repo, tmp_path, "back", old, "--session-store-from", new, *check)
    try:
        assert "unreachable at start" in back.log.read_text()
        time.sleep(max(0.0, 4.6 - (time.monotonic() - paused)))
        assert back.proc.poll() is None  # checked it, retired, meanwhile
        assert shards[2].client().get("rnnserve:shard") == b"retired"
        with Client(back.target, timeout=10) as on_back:
            on_back.open_session("feat", session_id=there)  # its first use
            time.sleep(0.7)
        assert back.proc.poll() is None
    finally:
        assert back.stop() == 0
    assert [s.client().get("rnnserve:shard") for s in shards] == [b"0/2", b"1/2", b"2/3"]


def test_a_check_tells_a_later_reshard_from_the_old_place_of_a_shard(shards) -> None:
    """A server that ran an online resharding from two shards to one, and keeps
    running with --session-store-from after it ended, accepts the old list's mark of
    the shard of both lists only while that shard holds the resharding's record: a
    later offline reshard to two shards gives that shard its old place again, and the
    server's check says its list changed (it is not on the new one)."""
    import asyncio

    from rnnserve.server.shared import MovingStore

    r0, r1, r2 = shards
    old, new = [r0.url, r1.url], [r0.url]
    moving = resharding_id(old, new)

    async def main() -> list[str | None]:
        store = MovingStore(new, old, owner="c|0", ttl_s=60, lease_s=5)
        try:
            await store.ping()  # the first server: marks and claims
            said = [await store.recheck()]
            for s, mark in ((r0, "0/1"), (r1, "retired")):  # `reshard --online` ends
                s.client().set("rnnserve:resharding", f"done {moving}")
                s.client().set("rnnserve:shard", mark)
            said.append(await store.recheck())
            r0.client().set("rnnserve:shard", "0/2")  # offline, [r0] to [r0, r2]
            r0.client().delete("rnnserve:resharding")
            r2.client().set("rnnserve:shard", "1/2")
            said.append(await store.recheck())
            return said
        finally:
            await store.close()

    before, ended, later = asyncio.run(main())
    assert before is None and ended is None
    assert later is not None and "is shard 0/2" in later and "lists it as 0/1" in later
