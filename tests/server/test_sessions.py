from __future__ import annotations

import numpy as np
import pytest

from rnnserve.server.errors import (
    SessionClosed,
    SessionError,
    SessionEvicted,
    SessionExists,
    SessionExpired,
    SessionNotFound,
)
from rnnserve.server.sessions import HostState, MemorySessionStore, Session


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(n_floats: int = 8) -> HostState:
    return HostState([np.zeros(n_floats, dtype=np.float32)])


def store(**kw):
    clock = Clock()
    events: list[tuple[str, str]] = []
    s = MemorySessionStore(clock=clock, on_event=lambda r, sess: events.append((r, sess.id)),
                           **kw)
    return s, clock, events


def test_idle_sessions_expire_with_a_distinct_status() -> None:
    s, clock, events = store(idle_timeout_s=10)
    a = s.create("m", 1, state())
    clock.now += 9
    s.touch(s.get(a.id))  # used: the timer restarts
    clock.now += 9
    assert s.get(a.id) is a  # only looked up: the timer runs on
    clock.now += 2
    with pytest.raises(SessionExpired, match="expired after 10s"):
        s.get(a.id)
    assert ("expired", a.id) in events and len(s) == 0 and s.state_bytes == 0


def test_live_many_gives_what_get_would_and_within_a_window_only_recent_ones() -> None:
    """The packed path's look-up: per id the live session or None, no side effect; with
    ``within_s`` (a shared store's lease) only sessions used less than that long ago."""
    s, clock, events = store(idle_timeout_s=10)
    a, b = s.create("m", 1, state()), s.create("m", 1, state())
    s.close(b.id)
    clock.now += 4
    c = s.create("m", 1, state())
    ids = [a.id, b.id, c.id, "nobody"]
    assert s.live_many(ids) == [a, None, c, None]
    assert s.live_many(ids, within_s=4) == [None, None, c, None]  # a: used 4 s ago
    assert s.live_many(ids, within_s=4.5) == [a, None, c, None]
    assert s.live_many(ids, within_s=60) == [a, None, c, None]  # the idle timeout first
    clock.now += 6.5  # a idle 10.5 s: past the timeout, not yet reaped
    assert s.live_many(ids) == [None, None, c, None]
    assert s.live_many(ids, within_s=7) == [None, None, c, None]
    assert s.peek(a.id) is a and ("expired", a.id) not in events  # nothing changed


def test_reaper_expires_oldest_first_and_reports_next_deadline() -> None:
    s, clock, _ = store(idle_timeout_s=10)
    a = s.create("m", 1, state())
    clock.now += 5
    b = s.create("m", 1, state())
    assert s.next_expiry_in() == pytest.approx(5)
    clock.now += 6
    assert [x.id for x in s.expire_idle()] == [a.id]
    assert s.get(b.id) is b
    with pytest.raises(SessionExpired):
        s.get(a.id)


def test_least_recently_used_is_evicted_at_the_session_cap() -> None:
    s, clock, events = store(max_sessions=2)
    a = s.create("m", 1, state())
    clock.now += 1
    b = s.create("m", 1, state())
    clock.now += 1
    s.touch(s.get(a.id))  # a is now more recent than b
    s.get(b.id)  # a look-up is no use: b stays the least recently used
    c = s.create("m", 1, state())
    with pytest.raises(SessionEvicted, match="evicted"):
        s.get(b.id)
    assert s.get(a.id) is a and s.get(c.id) is c
    assert ("evicted", b.id) in events


def test_state_memory_cap_evicts_until_the_new_session_fits() -> None:
    s, _, _ = store(max_state_bytes=100)
    a = s.create("m", 1, state(10))  # 40 bytes
    b = s.create("m", 1, state(10))  # 80
    c = s.create("m", 1, state(15))  # 60 more: a must go, then 100 fits
    assert s.state_bytes == 100
    with pytest.raises(SessionEvicted):
        s.get(a.id)
    assert s.get(b.id) is b and s.get(c.id) is c
    with pytest.raises(SessionEvicted, match="more than the server's cap"):
        s.create("m", 1, state(26))


def test_closed_unknown_and_duplicate_ids_have_their_own_errors() -> None:
    s, _, _ = store()
    a = s.create("m", 1, state(), session_id="mine")
    with pytest.raises(SessionExists):
        s.create("m", 1, state(), session_id="mine")
    s.close(a.id)
    with pytest.raises(SessionClosed, match="has ended"):
        s.get("mine")
    with pytest.raises(SessionNotFound, match="unknown"):
        s.get("never-seen")


def test_a_step_of_an_ended_session_hears_why_after_its_id_is_opened_again() -> None:
    s, _, _ = store()
    old = s.create("m", 1, state(), session_id="mine")
    s.close("mine")
    new = s.create("m", 1, state(), session_id="mine")
    with pytest.raises(SessionClosed, match="has ended"):
        s.update(old, state(), 1)
    assert s.get("mine") is new and new.next_seq == 0


def test_update_replaces_state_and_accounts_bytes() -> None:
    s, _, _ = store()
    a = s.create("m", 1, state(4))
    s.update(a, HostState([np.ones(6, dtype=np.float32)]), next_seq=3)
    assert s.state_bytes == 24 and a.next_seq == 3 and a.state.arrays[0][0] == 1
    b = s.create("other", 2, state(2))
    assert s.usage_by_model() == {("m", 1): (1, 24), ("other", 2): (1, 8)}
    s.close(b.id)
    assert s.usage_by_model()[("other", 2)] == (0, 0)
    assert s.peek(a.id) is a and s.peek(b.id) is None
    s.close(a.id)
    with pytest.raises(SessionClosed):
        s.update(a, state(), 4)


def test_the_last_answer_counts_as_state_memory_and_outlives_an_ending_chunk() -> None:
    from rnnserve.server.sessions import Answer

    s, _, _ = store(max_state_bytes=1000)
    a = s.create("m", 1, state(8))
    answer = Answer(0, b"d" * 16, [("logits", np.zeros(10, dtype=np.float32))], end=True)
    s.update(a, state(8), 1, answer)
    assert a.nbytes == 32 + 40 and s.state_bytes == 72
    s.close(a.id)
    assert s.state_bytes == 0
    kept = s.final_answer(a.id)
    assert kept is not None and kept.answer is answer and kept.model == "m"
    b = s.create("m", 1, state(8))
    s.update(b, state(8), 1, Answer(0, b"e" * 16, [], end=False))
    s.close(b.id)
    assert s.final_answer(b.id) is None  # only a chunk that ended the session is kept


def test_owners_are_counted_and_a_restored_owner_is_what_the_record_says() -> None:
    from rnnserve.server import records

    s, _, _ = store()
    a = s.create("m", 1, state(), "a", owner="alice")
    s.create("m", 1, state(), "b", owner="alice")
    s.create("m", 1, state(), "c", owner="bob")
    assert (s.count_of("alice"), s.count_of("bob"), s.count_of("")) == (2, 1, 0)
    records.encode(a)  # caches the header's start, owner included
    s.restore(Session("a", "m", 1, state(), 3, owner="carol"))
    assert (s.count_of("alice"), s.count_of("carol")) == (1, 1)
    assert records.decode(records.encode(s.get("a")), "a").owner == "carol"
    s.close("a")
    assert s.count_of("carol") == 0


def test_a_full_store_refuses_instead_of_evicting_when_told() -> None:
    from rnnserve.server.errors import Overloaded

    s, _, _ = store(max_sessions=2, when_full="refuse")
    s.create("m", 1, state(), "a")
    s.create("m", 1, state(), "b")
    assert s.refusal(32) is not None
    with pytest.raises(Overloaded, match="most sessions") as info:
        s.create("m", 1, state(), "c")
    assert info.value.retry_after_ms == 1000
    assert sorted(s.live_ids()) == ["a", "b"]  # nobody was evicted for it


class Tracked(HostState):
    """A state that counts its releases (a pool row given back)."""

    released: list[str] = []

    def __init__(self, name: str) -> None:
        super().__init__([np.zeros(2, dtype=np.float32)])
        self.name = name

    def release(self) -> None:
        Tracked.released.append(self.name)


def test_the_store_releases_a_state_once_when_it_is_no_longer_used() -> None:
    Tracked.released = []
    s, clock, _ = store(idle_timeout_s=10, max_sessions=2)
    a = s.create("m", 1, Tracked("a0"))
    s.update(a, Tracked("a1"), 1)  # replaced: the old one goes back
    assert Tracked.released == ["a0"]
    s.update(a, a.state, 2)  # the same state again: nothing released
    b = s.create("m", 1, Tracked("b0"))
    s.create("m", 1, Tracked("c0"))  # evicts a (least recently used)
    assert Tracked.released == ["a0", "a1"]
    with pytest.raises(SessionError):
        s.update(a, Tracked("late"), 3)  # a step landing after the eviction: not taken
    assert "late" not in Tracked.released  # the caller still owns it
    s.close(b.id)
    clock.now += 11
    assert s.expire_idle() and Tracked.released == ["a0", "a1", "b0", "c0"]
    restored = Session("r", "m", 1, Tracked("r1"), 5)
    s.create("m", 1, Tracked("r0"), "r")
    s.restore(restored)  # the outdated live copy's state goes back
    assert Tracked.released[-1] == "r0" and s.get("r").state is restored.state


def test_answers_of_sessions_idle_a_period_keep_a_digest_instead_of_their_chunk() -> None:
    """compact_answers (a pass per period, on the server): an answer given before the
    last period lets its chunk go and keeps the chunk's digest, whatever used its
    session since (a retry touches it); the bytes leave the accounts. A session
    answered in the last period keeps its chunk (it streams: its answer is replaced
    before anyone asks); each session is looked at once per pass, and an ended one is
    not hashed for nothing."""
    from rnnserve.server.sessions import Answer, digest

    s, _, _ = store()
    chunk = np.arange(50, dtype=np.float32)
    idle, busy = s.create("m", 1, state(8)), s.create("m", 1, state(8))
    s.update(idle, state(8), 1, Answer(0, None, [], chunk=chunk))
    for seq in range(1, 4):  # streams: one look per pass all the same
        s.update(busy, state(8), seq, Answer(seq - 1, None, [], chunk=chunk + seq))
    assert idle.nbytes == 32 + 200 and s.state_bytes == 2 * 232
    assert not s.compact_answers()  # both answered in the period before this pass
    assert idle.answer is not None and idle.answer.nbytes == 200
    s.touch(idle)  # a retry, say: no new answer
    s.update(busy, state(8), 4, Answer(3, None, [], chunk=chunk + 4))
    calls = 1
    while s.compact_answers(limit=1):  # one session per call: one call per session
        calls += 1
    assert calls == 2
    assert idle.nbytes == 32 and s.state_bytes == 32 + 232
    assert idle.answer.digest == digest(chunk) and idle.answer.nbytes == 0
    assert busy.answer is not None and busy.answer.nbytes == 200  # answered since
    s.close(busy.id)
    assert not s.compact_answers() and not s.compact_answers()
    assert busy.answer.nbytes == 200  # ended, not in the table: left alone
    assert s.state_bytes == 32
    # a pass stops after its bytes to hash, the rest left for the next call
    many = [s.create("m", 1, state(8)) for _ in range(3)]
    for m in many:
        s.update(m, state(8), 1, Answer(0, None, [], chunk=chunk.copy()))
    assert not s.compact_answers()
    assert s.compact_answers(hash_bytes=200) and s.compact_answers(hash_bytes=200)
    assert not s.compact_answers(hash_bytes=200)
    assert all(m.answer is not None and m.answer.nbytes == 0 for m in many)


def test_a_kept_answer_holds_the_same_answer_in_less_memory() -> None:
    """``Answer.kept``: the digest and outputs of an answer, whatever its outputs'
    dtypes and shapes (several, a scalar, an empty one, big-endian), packed into one
    object; answers of the same outputs share one layout. Measured with tracemalloc,
    2,000 kept answers like an idle speech-small session's (4 x 14 float32 posteriors)
    hold under 70% of what the same answers held as arrays (some 400 bytes each against
    some 620)."""
    import tracemalloc

    from rnnserve.server.sessions import Answer, KeptAnswer, RowAnswer, digest

    rng = np.random.default_rng(5)
    chunk = rng.standard_normal((3, 20)).astype(np.float32)
    outs = [("logits", rng.standard_normal((3, 4)).astype(np.float32)),
            ("half", rng.standard_normal((2, 2)).astype(np.float16)),
            ("count", np.array(7, dtype=np.int64)),
            ("none", np.zeros((0, 5), dtype=np.float32)),
            ("be", np.arange(6, dtype=">i4").reshape(3, 2))]
    for answer in (Answer(4, None, outs, end=True, chunk=chunk),
                   RowAnswer(4, [n for n, _ in outs], tuple(a for _, a in outs), chunk,
                             end=True)):
        kept = answer.kept()
        assert isinstance(kept, KeptAnswer) and kept.kept() is kept
        assert (kept.seq, kept.end, kept.digest) == (4, True, digest(chunk))
        assert kept.nbytes == sum(a.nbytes for _, a in outs) == answer.nbytes - chunk.nbytes
        got = kept.outputs
        assert [n for n, _ in got] == [n for n, _ in outs]
        for (_, a), (_, b) in zip(got, outs, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            assert not a.flags.writeable  # views of the kept bytes
    other = Answer(9, b"x" * 16, [(n, a.copy()) for n, a in outs]).kept()
    assert other._layout is kept._layout and other.digest == b"x" * 16

    def held(make) -> int:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            kept_alive = [make(i) for i in range(2000)]
            used = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert len(kept_alive) == 2000
        return used

    posteriors = rng.standard_normal((2000, 4, 14)).astype(np.float32)
    pcm = np.zeros(640, dtype="<i2")
    as_arrays = held(lambda i: Answer(i, digest(pcm), [("post", posteriors[i].copy())]))
    as_kept = held(lambda i: Answer(i, digest(pcm), [("post", posteriors[i].copy())]).kept())
    assert as_kept < 0.7 * as_arrays, (as_kept / 2000, as_arrays / 2000)  # 0.65 measured
