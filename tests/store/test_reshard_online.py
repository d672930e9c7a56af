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
from rnnserve.server.shared import HANDOFF, shard_of

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
        self.x = {s: rng.standard_normal((4 * STEPS, 20)).astype(np.float32) for s in sids}
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
    cannot be opened anew on N, and sessions that stay are shared as ever. `reshard
    --online` refuses to finish while O holds sessions, then, O stopped, hands off the
    rest (a session O opened meanwhile too), drops the tombstones and marks the shards;
    a server on the new list alone goes on with every session exactly."""
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
            n = serve(repo, tmp_path, "n", new, "--session-store-from", old, "--lease-s", "3")
            with Client(n.target, timeout=10) as on_n:
                # O's lease is live: not handed off, nothing changes
                err = refused(on_n.step, m0, 1, work.chunk(m0))
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
                assert keys_of(src, m0) == {"s", "l"}
                assert src.client().get(f"rnnserve:{{{m0}}}:l") == b"moved"
                # O's copy is behind and O may no longer write the old one
                for call in (lambda: on_o.step(m0, 1, work.chunk(m0)),
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
                err = refused(on_n.open_session, "feat", session_id=m1)
                assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
                assert "previous list" in err.details()
                on_o.open_session("feat", session_id=late)  # on the old list, meanwhile
                work.step(on_o, late)
        assert o.stop() == 0  # drains: its leases are released

        done = rnnserve("reshard", "--from", old, "--to", new, "--online")
        assert done.returncode == 0, done.stderr
        handed = len(movers) - 1 + 1  # every mover but m0, and late
        assert f"handed off {handed} session(s)" in done.stdout, done.stdout
        assert [s.client().get("rnnserve:shard") for s in shards] == [b"0/3", b"1/3", b"2/3"]
        for sid in [*movers, late]:
            assert keys_of(shards[shard_of(sid, 2)], sid) == set(), sid  # no tombstone left
            assert "s" in keys_of(shards[2], sid), sid
        for sid in stay:
            assert "s" in keys_of(shards[shard_of(sid, 3)], sid)
        again = rnnserve("reshard", "--from", old, "--to", new, "--online")
        assert again.returncode == 0 and "handed off 0 session(s)" in again.stdout, again.stdout
    finally:
        o.stop()
        if n is not None:
            assert n.stop() == 0

    p = serve(repo, tmp_path, "p", new)
    try:
        with Client(p.target, timeout=10) as on_p:
            for sid in [*sids, late]:
                work.step(on_p, sid, end=True)
    finally:
        assert p.stop() == 0
    work.check(repo)


def test_a_hand_off_cut_short_is_finished_by_the_next_and_an_ended_session_stays_ended(
        repo, shards, tmp_path) -> None:
    """A mover that died between its two halves (the old copy tombstoned, nothing on the
    new shard) leaves the session to the next one: N's first load finishes the hand-off
    and goes on exactly. Once the session ended on the new shard, a retry of its last
    chunk gets the stored final answer, its id may be opened anew, and its old copy
    (which N leaves to the sweep) never brings it back: `reshard --online` drops it."""
    old, new = (",".join(s.url for s in shards[:n]) for n in (2, 3))
    sid = next(f"cut-{i}" for i in range(100) if shard_of(f"cut-{i}", 3) == 2)
    work = Sessions([sid], seed=82)
    o = serve(repo, tmp_path, "o", old)
    try:
        with Client(o.target, timeout=10) as on_o:
            on_o.open_session("feat", session_id=sid)
            work.step(on_o, sid)
    finally:
        assert o.stop() == 0
    src = shards[shard_of(sid, 2)].client()
    rec, lease = f"rnnserve:{{{sid}}}:s", f"rnnserve:{{{sid}}}:l"
    status = src.register_script(HANDOFF)(keys=[rec, lease], args=["died|0", 300000])
    assert status[0] == b"ok" and src.get(lease) == b"moved"
    assert keys_of(shards[2], sid) == set()

    n = serve(repo, tmp_path, "n", new, "--session-store-from", old)
    try:
        with Client(n.target, timeout=10) as on_n:
            work.step(on_n, sid)
            work.step(on_n, sid, end=True)
            assert "s" not in keys_of(shards[2], sid)  # ended: only its final answer
            assert src.exists(rec)  # the old copy, left to the sweep
            last = work.got[sid][-1]
            retried = on_n.step(sid, 2, work.x[sid][2 * STEPS:3 * STEPS], end=True)["logits"]
            assert np.array_equal(retried, last)  # the stored answer, not a rerun
            err = refused(on_n.step, sid, 3, work.chunk(sid))
            assert err.code() in (grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.FAILED_PRECONDITION), err.details()
            # the id may be opened anew (as OIP clients reuse sequence ids): a handed-off
            # old copy does not hold it
            on_n.open_session("feat", session_id=sid)
            on_n.close_session(sid)
        done = rnnserve("reshard", "--from", old, "--to", new, "--online")
        assert done.returncode == 0, done.stderr
        assert "handed off 0 session(s)" in done.stdout, done.stdout
        assert keys_of(shards[shard_of(sid, 2)], sid) == set()
        assert "s" not in keys_of(shards[2], sid)
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
