"""Session state between requests: an in-memory store behind a small interface.

A session belongs to one model version and holds its state (a row of the model's
state pool on the model's device, ``server.pool.PoolState``; or host arrays, one per
state pair, for a record read from the shared store), the sequence number its next
chunk must carry, and when it was last used. The store releases a session's state
when the session ends or its state is replaced.

Sessions end in four ways, each remembered for a while (a tombstone) so that a
client asking for it afterwards learns what happened instead of "unknown":
closed by the client or by its last chunk; expired after ``idle_timeout_s``
without a request; evicted, least recently used first, when a new session would
exceed ``max_sessions`` or ``max_state_bytes``.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rnnserve.server.errors import (
    Overloaded,
    SessionClosed,
    SessionError,
    SessionEvicted,
    SessionExists,
    SessionExpired,
    SessionNotFound,
)

ENDED_REASONS = ("closed", "expired", "evicted")


class State(Protocol):
    """A session's state wherever it lives: its size, its host copy, and a release
    that gives its storage back (called once the session no longer uses it)."""

    @property
    def nbytes(self) -> int: ...

    @property
    def arrays(self) -> list[np.ndarray]: ...

    def release(self) -> None: ...


class HostState:
    """A state held on the host: one array per state pair, without the batch axis."""

    __slots__ = ("arrays",)

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = list(arrays)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def release(self) -> None:
        pass


def digest(x: np.ndarray) -> bytes:
    """A chunk's identity for retries: its dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(np.ascontiguousarray(x).data)
    return h.digest()


def digest_rows(xs: np.ndarray) -> list[bytes]:
    """``digest`` of each row of ``xs`` (a block's chunks), the part they share hashed
    once."""
    first = hashlib.blake2b(digest_size=16)
    first.update(f"{xs.dtype.str}{xs.shape[1:]}".encode())
    out = []
    for x in np.ascontiguousarray(xs):
        h = first.copy()
        h.update(x.data)
        out.append(h.digest())
    return out


class Answer:
    """The answer to a session's last chunk, kept so that a retry of that chunk (same
    sequence number, same data) gets it again without advancing the state.

    The chunk's digest tells a retry from a different chunk. Given the ``chunk``
    instead, the answer keeps it and hashes it only when asked (a retry, a record
    written): most answers are replaced by the next chunk's unasked."""

    __slots__ = ("_chunk", "_digest", "end", "outputs", "seq")

    def __init__(self, seq: int, digest: bytes | None, outputs: list[tuple[str, np.ndarray]],
                 end: bool = False, *, chunk: np.ndarray | None = None) -> None:
        if (digest is None) == (chunk is None):
            raise ValueError("an answer takes its chunk's digest or the chunk")
        self.seq, self.outputs, self.end = seq, outputs, end
        self._digest, self._chunk = digest, chunk

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            assert self._chunk is not None
            self._digest = digest(self._chunk)
        return self._digest

    def kept(self) -> Answer:
        """This answer as one kept a while, most likely an idle session's (store
        ``compact_answers``): the chunk's digest instead of the chunk (hashed now), and
        the outputs packed (``KeptAnswer``)."""
        return KeptAnswer(self)

    @property
    def nbytes(self) -> int:
        held = self._chunk.nbytes if self._chunk is not None else 0
        for _, a in self.outputs:  # a loop: a generator costs more for one or two
            held += a.nbytes
        return held

    def __repr__(self) -> str:
        return f"Answer(seq={self.seq}, end={self.end}, outputs={[n for n, _ in self.outputs]})"


class RowAnswer(Answer):
    """An ``Answer`` made per session of a packed block in one step: its chunk and
    output rows are its own copies (a view would keep the whole request's chunks and
    the block's outputs alive as long as this answer is kept, which for an idle session
    is its idle timeout), its outputs listed only when asked (a retry, a record
    written), as most answers never are."""

    __slots__ = ("_names", "_rows")

    def __init__(self, seq: int, names: list[str], rows: tuple[np.ndarray, ...],
                 chunk: np.ndarray | None, end: bool = False, digest: bytes | None = None
                 ) -> None:
        if (digest is None) == (chunk is None):
            raise ValueError("an answer takes its chunk's digest or the chunk")
        self.seq, self.end, self._digest = seq, end, digest
        self._names, self._rows, self._chunk = names, rows, chunk

    @property
    def outputs(self) -> list[tuple[str, np.ndarray]]:  # type: ignore[override]
        return list(zip(self._names, self._rows, strict=True))


# layouts of kept answers, shared by the answers of the same outputs (a few per model:
# one per chunk length), and the sizes of idle sessions; at the cap a table starts again
_LAYOUTS: dict[tuple[Any, ...], tuple[Any, ...]] = {}
_SIZES: dict[int, int] = {}
_MAX_SHARED = 1024


def _shared_int(n: int) -> int:
    """``n`` as the one int object of its value that idle sessions share (a model's
    idle sessions have the same size: 32 bytes each less than an int apiece)."""
    got = _SIZES.get(n)
    if got is None:
        if len(_SIZES) >= _MAX_SHARED:
            _SIZES.clear()
        _SIZES[n] = got = n
    return got


class KeptAnswer(Answer):
    """An answer kept a while (an idle session's, ``Answer.kept``): the chunk's digest
    and the outputs' bytes in one ``bytes``; the outputs' names, dtypes and shapes in a
    layout that the answers of the same outputs share. An idle speech-small session's
    answer takes some 400 bytes so, against some 615 as arrays (an array object, a
    tuple and a list besides its 224 bytes of data, and the digest's own bytes). Its
    outputs are read-only views of those bytes, made when asked (a retry, a record)."""

    __slots__ = ("_blob", "_layout")

    def __init__(self, answer: Answer) -> None:
        outputs = answer.outputs
        self.seq, self.end = answer.seq, answer.end
        self._digest = self._chunk = None
        d = answer.digest
        key = (len(d), *((n, a.dtype, a.shape) for n, a in outputs))
        layout = _LAYOUTS.get(key)
        if layout is None:
            at, parts = len(d), []
            for n, a in outputs:
                parts.append((n, a.dtype, a.shape, at, a.size))
                at += a.nbytes
            layout = (len(d), at - len(d), *parts)
            if len(_LAYOUTS) >= _MAX_SHARED:
                _LAYOUTS.clear()  # shared again from here on (kept answers keep theirs)
            _LAYOUTS[key] = layout
        self._layout = layout
        self._blob = b"".join([d, *(np.ascontiguousarray(a).data for _, a in outputs)])

    @property
    def digest(self) -> bytes:  # type: ignore[override]
        return self._blob[:self._layout[0]]

    @property
    def outputs(self) -> list[tuple[str, np.ndarray]]:  # type: ignore[override]
        blob = self._blob
        return [(n, np.frombuffer(blob, dtype, size, at).reshape(shape))
                for n, dtype, shape, at, size in self._layout[2:]]

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        return int(self._layout[1])

    def kept(self) -> Answer:
        return self


@dataclass(slots=True)  # no __dict__: ~50 bytes less per session
class Session:
    id: str
    model: str
    version: int
    state: State
    next_seq: int = 0
    last_used: float = 0.0
    nbytes: int = field(default=0)
    opened_at: float = 0.0  # perf_counter when opened here; 0 once it has answered a chunk
    answer: Answer | None = None
    owner: str = ""  # the principal that opened it ("" without authentication)
    # a step of it was given up (its caller went away) while its commit to the shared
    # store may have landed: the next step takes the store's record first
    unsure: bool = False
    # served from memory while the shared store failed (degrade): its stored record may
    # be behind, and the next write may start from any older seq
    unsynced: bool = False
    # the start of its shared-store record's header, cached by records.encode
    record_prefix: str = field(default="", repr=False, compare=False)
    # a step of it is queued or running here (the core's mark: a session of the same id
    # opened after this one ended is not held back by this one's step)
    busy: bool = field(default=False, repr=False, compare=False)
    ended: str = ""  # why it ended here (one of ENDED_REASONS), "" while live
    # the store's period of its last answer, and whether it is listed for a look at
    # its answer's chunk (MemorySessionStore.compact_answers)
    answered_in: int = field(default=0, repr=False, compare=False)
    listed: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.nbytes = self.state.nbytes + (self.answer.nbytes if self.answer else 0)


class SessionStore(Protocol):
    """What the core needs from a store; a shared (e.g. Redis) store implements it too."""


    def create(self, model: str, version: int, state: State,
               session_id: str | None = None, owner: str = "") -> Session: ...

    def refusal(self, nbytes: int) -> Overloaded | None: ...

    def count_of(self, owner: str) -> int: ...

    def get(self, session_id: str) -> Session: ...

    def touch(self, session: Session) -> None: ...

    def live_many(self, session_ids: Sequence[str], within_s: float | None = None
                  ) -> list[Session | None]: ...

    def touch_many(self, sessions: list[Session]) -> None: ...

    def update_many(self, sessions: list[Session], states: list[State], seqs: list[int],
                    answers: list[Answer], nbytes: int) -> list[int]: ...

    def idle_s(self, session: Session) -> float: ...

    def live_ids(self) -> list[str]: ...

    def peek(self, session_id: str) -> Session | None: ...

    def gone(self, session_id: str, reason: str = "") -> SessionError: ...

    def update(self, session: Session, state: State, next_seq: int,
               answer: Answer | None = None) -> None: ...

    def compact_answers(self, limit: int = 512, hash_bytes: int = 8 << 20) -> bool: ...

    def final_answer(self, session_id: str) -> Session | None: ...

    def restore(self, stored: Session) -> Session: ...

    def close(self, session_id: str) -> Session: ...

    def drop(self, session: Session) -> None: ...

    def expire_idle(self) -> list[Session]: ...


EventHook = Callable[[str, Session], None]  # (reason, session): created/closed/expired/evicted


class MemorySessionStore:
    """Sessions in this process's memory, in least-recently-used order."""

    def __init__(self, *, idle_timeout_s: float = 300.0, max_sessions: int = 10_000,
                 max_state_bytes: int = 1 << 30, tombstones: int = 100_000,
                 clock: Callable[[], float] = time.monotonic,
                 on_event: EventHook | None = None, when_full: str = "evict",
                 unknown_hint: str = "") -> None:
        """``when_full``: what a new session does at ``max_sessions`` or
        ``max_state_bytes``: evict the least recently used session, or refuse (the core
        answers RESOURCE_EXHAUSTED, and no live stream is cut for a new one).
        ``unknown_hint`` ends the message of a session that is not here (which worker
        process this is, and where its sessions may be)."""
        if idle_timeout_s <= 0 or max_sessions < 1 or max_state_bytes < 1:
            raise ValueError("idle timeout, max sessions and max state bytes must be positive")
        if when_full not in ("evict", "refuse"):
            raise ValueError(f"when_full must be evict or refuse, got {when_full!r}")
        self.when_full = when_full
        self.unknown_hint = unknown_hint
        self.idle_timeout_s = idle_timeout_s
        self.max_sessions = max_sessions
        self.max_state_bytes = max_state_bytes
        self._clock = clock
        self._on_event = on_event
        self._live: OrderedDict[str, Session] = OrderedDict()  # oldest use first
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> reason
        self._max_tombstones = tombstones
        # answers to the last chunk of sessions that ended with it, for retries of it
        self._final: OrderedDict[str, Session] = OrderedDict()
        self._max_final = 4096
        self.state_bytes = 0
        self.bytes_by_model: dict[tuple[str, int], int] = {}  # read by the metrics thread
        self.count_by_model: dict[tuple[str, int], int] = {}
        self._count_by_owner: dict[str, int] = {}
        # an answer keeps its chunk (hashed only when a retry or a record asks); the
        # sessions whose answer may still keep one are listed (once each), and a pass
        # of compact_answers per period hashes those answered a period ago or more
        self._period = 0  # passes begun
        self._answered: list[Session] = []  # listed for the next pass
        self._todo: list[Session] = []  # what is left of the pass under way

    def __len__(self) -> int:
        return len(self._live)

    def _account(self, session: Session, delta: int) -> None:
        self.state_bytes += delta
        key = (session.model, session.version)
        self.bytes_by_model[key] = self.bytes_by_model.get(key, 0) + delta

    def _event(self, reason: str, session: Session) -> None:
        if self._on_event is not None:
            self._on_event(reason, session)

    def usage_by_model(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(live sessions, state bytes) per (model, version); safe from another thread."""
        counts, nbytes = dict(self.count_by_model), dict(self.bytes_by_model)
        return {k: (n, nbytes.get(k, 0)) for k, n in counts.items()}

    def _count(self, session: Session, delta: int) -> None:
        key = (session.model, session.version)
        self.count_by_model[key] = self.count_by_model.get(key, 0) + delta
        left = self._count_by_owner.get(session.owner, 0) + delta
        if left:
            self._count_by_owner[session.owner] = left
        else:
            self._count_by_owner.pop(session.owner, None)

    def count_of(self, owner: str) -> int:
        """Live sessions that ``owner`` opened."""
        return self._count_by_owner.get(owner, 0)

    def refusal(self, nbytes: int) -> Overloaded | None:
        """Why a new session of ``nbytes`` is refused (``when_full="refuse"`` and a cap
        reached once idle sessions expired), or None."""
        if self.when_full != "refuse":
            return None
        self.expire_idle()
        if len(self._live) < self.max_sessions and \
                self.state_bytes + nbytes <= self.max_state_bytes:
            return None
        return Overloaded(f"the server holds its most sessions ({self.max_sessions} or "
                          f"{self.max_state_bytes} state bytes); retry later or on another "
                          "replica", retry_after_ms=1000)

    def _end(self, session: Session, reason: str) -> None:
        del self._live[session.id]
        session.ended = reason
        session.state.release()
        self._account(session, -session.nbytes)
        self._count(session, -1)
        self._ended[session.id] = reason
        self._ended.move_to_end(session.id)
        while len(self._ended) > self._max_tombstones:
            self._ended.popitem(last=False)
        self._event(reason, session)

    def create(self, model: str, version: int, state: State,
               session_id: str | None = None, owner: str = "") -> Session:
        """A new live session holding ``state``; a refused one leaves ``state`` to the
        caller (to release)."""
        now = self._clock()
        sid = session_id or uuid.uuid4().hex
        if sid in self._live:
            raise SessionExists(f"session {sid!r} already exists; resume it or pick another id")
        session = Session(sid, model, version, state, last_used=now, owner=owner)
        if session.nbytes > self.max_state_bytes:
            raise SessionEvicted(f"one session of {model!r} needs {session.nbytes} state bytes, "
                                 f"more than the server's cap of {self.max_state_bytes}")
        refused = self.refusal(session.nbytes)
        if refused is not None:
            raise refused
        self.expire_idle()
        while self._live and (len(self._live) >= self.max_sessions
                              or self.state_bytes + session.nbytes > self.max_state_bytes):
            _, oldest = next(iter(self._live.items()))
            self._end(oldest, "evicted")
        self._ended.pop(sid, None)
        self._final.pop(sid, None)
        self._live[sid] = session
        self._account(session, session.nbytes)
        self._count(session, 1)
        self._event("created", session)
        return session

    def restore(self, stored: Session) -> Session:
        """Make ``stored`` (a session loaded from the shared store, its state already
        where the model runs) the live one under its id, replacing an outdated copy
        (whose state is released); returns the live session."""
        session = self._live.get(stored.id)
        if session is None:
            session = self.create(stored.model, stored.version, stored.state, stored.id,
                                  owner=stored.owner)
        elif session.owner != stored.owner:
            self._count(session, -1)
            session.owner, session.record_prefix = stored.owner, ""  # the header names it
            self._count(session, 1)
        self.update(session, stored.state, stored.next_seq, stored.answer)
        return session

    def get(self, session_id: str) -> Session:
        """The live session with this id (one idle too long expires here), or why it is
        gone. A look-up, not a use: a request that is then refused must not keep the
        session alive nor spare it from eviction; ``touch`` it once the request is taken."""
        session = self._live.get(session_id)
        if session is not None and self._clock() - session.last_used > self.idle_timeout_s:
            self._end(session, "expired")
            session = None
        if session is None:
            raise self.gone(session_id)
        return session

    def live_many(self, session_ids: Sequence[str], within_s: float | None = None
                  ) -> list[Session | None]:
        """Per id its live session, or None where ``get`` would not give one (unknown,
        ended, or idle past the timeout: ``get`` then says why), and with ``within_s``
        also where its last use is that long ago or longer; no side effect. One
        look-up each, for the packed path's many sessions."""
        now, live = self._clock(), self._live
        out: list[Session | None] = []
        if within_s is not None and within_s < self.idle_timeout_s:
            since = now - within_s  # idle for less than within_s
            for sid in session_ids:
                session = live.get(sid)
                out.append(session if session is not None and session.last_used > since
                           else None)
            return out
        since = now - self.idle_timeout_s
        for sid in session_ids:
            session = live.get(sid)
            out.append(session if session is not None and session.last_used >= since
                       else None)
        return out

    def touch_many(self, sessions: list[Session]) -> None:
        """``touch`` each of ``sessions``, with one reading of the clock."""
        now, live = self._clock(), self._live
        for session in sessions:
            if live.get(session.id) is session:
                session.last_used = now
                live.move_to_end(session.id)

    def update_many(self, sessions: list[Session], states: list[State], seqs: list[int],
                    answers: list[Answer], nbytes: int) -> list[int]:
        """``update`` each session, whose new state and answer together take ``nbytes``
        (one size for all: a block's sessions), with one reading of the clock. Returns
        the positions of the sessions no longer live, whose states stay the caller's."""
        now, live, gone = self._clock(), self._live, []
        for i, (session, state, seq, answer) in enumerate(
                zip(sessions, states, seqs, answers, strict=True)):
            if live.get(session.id) is not session:
                gone.append(i)
                continue
            if nbytes != session.nbytes:
                self._account(session, nbytes - session.nbytes)
            if state is not session.state:
                session.state.release()
            session.state, session.nbytes, session.next_seq = state, nbytes, seq
            session.answer = answer
            session.last_used = now
            live.move_to_end(session.id)
            session.answered_in = self._period
            if not session.listed:  # _list inline: the packed path's loop
                session.listed = True
                self._answered.append(session)
        return gone

    def touch(self, session: Session) -> None:
        """A request of ``session`` was taken: its idle timer restarts, and it becomes
        the most recently used (the last to be evicted)."""
        if self._live.get(session.id) is session:
            session.last_used = self._clock()
            self._live.move_to_end(session.id)

    def idle_s(self, session: Session) -> float:
        """Seconds since ``session``'s last use (``touch``)."""
        return self._clock() - session.last_used

    def live_ids(self) -> list[str]:
        return list(self._live)

    def peek(self, session_id: str) -> Session | None:
        """The live session with this id, or None; no side effect (no expiry, no LRU move)."""
        return self._live.get(session_id)

    def gone(self, session_id: str, reason: str = "") -> SessionError:
        """Why session ``session_id`` is not live: ``reason`` (how a copy of it ended),
        else its tombstone's."""
        reason = reason or self._ended.get(session_id, "")
        if reason == "expired":
            return SessionExpired(f"session {session_id!r} expired after "
                                  f"{self.idle_timeout_s:g}s without a request; open a new one")
        if reason == "evicted":
            return SessionEvicted(f"session {session_id!r} was evicted: the server reached its "
                                  "session or state memory cap; open a new one")
        if reason == "closed":
            return SessionClosed(f"session {session_id!r} has ended; open a new one")
        return SessionNotFound(f"session {session_id!r} is unknown to this server"
                               + self.unknown_hint)

    def update(self, session: Session, state: State, next_seq: int,
               answer: Answer | None = None) -> None:
        """Give ``session`` its new state (its old one is released). If the session is
        no longer live this raises why, and ``state`` stays the caller's."""
        if self._live.get(session.id) is not session:  # maybe another one of that id now
            raise self.gone(session.id, session.ended)
        nbytes = state.nbytes + (answer.nbytes if answer else 0)
        if nbytes != session.nbytes:  # most steps: the same size as the last one
            self._account(session, nbytes - session.nbytes)
        if state is not session.state:
            session.state.release()
        session.state, session.nbytes, session.next_seq = state, nbytes, next_seq
        session.answer = answer
        session.last_used = self._clock()
        self._live.move_to_end(session.id)
        session.answered_in = self._period
        if not session.listed:
            self._list(session)

    def _list(self, session: Session) -> None:
        """Put ``session`` on the list for the next pass of ``compact_answers``."""
        session.listed = True
        self._answered.append(session)

    def close(self, session_id: str) -> Session:
        session = self._live.get(session_id)
        if session is None:
            raise self.gone(session_id)
        self._end(session, "closed")
        if session.answer is not None and session.answer.end:
            self._final[session_id] = Session(session.id, session.model, session.version,
                                              HostState([]),
                                              session.next_seq, answer=session.answer,
                                              owner=session.owner)
            while len(self._final) > self._max_final:
                self._final.popitem(last=False)
        return session

    def drop(self, session: Session) -> None:
        """End ``session``, an outdated copy that the shared store refused to write (the
        session went on elsewhere), if it is still the live one, without remembering it
        as ended here: it has not ended, and a later request of it takes it from the
        store, as on a server that never held it. Counted as closed."""
        if self._live.get(session.id) is not session:
            return
        self._end(session, "closed")
        del self._ended[session.id]

    def compact_answers(self, limit: int = 512, hash_bytes: int = 8 << 20) -> bool:
        """Let go of the chunks that the last answers of idle sessions keep, keeping
        their digests (hashed now: a retry is still told from a different chunk). Call
        it once a period (and again while it says True): a call with no pass under way
        begins one over the sessions listed since the last; an answer given in the
        period before the pass is left for the next, one given earlier is compacted,
        whatever used the session since (a retry, a resume, a refused step). A session
        that streams on is given a new answer each chunk and never pays the hash; one
        that pauses for one to two periods (and a pass) keeps 16 bytes instead of
        its last chunk.
        At most ``limit`` sessions and ``hash_bytes`` of chunks per call (the event
        loop's); True while the pass has more."""
        if not self._todo:
            self._period += 1
            self._todo, self._answered = self._answered, []
        todo, recent, hashed = self._todo, self._period - 1, 0
        for _ in range(min(limit, len(todo))):
            session = todo.pop()
            session.listed = False
            answer = session.answer
            if session.ended or answer is None:
                continue  # nothing to retry from the live table (a final answer stays)
            if session.answered_in >= recent:  # answered in the last period: later
                self._list(session)
                continue
            try:  # an answer kept by an earlier pass is itself: nothing freed
                kept = answer.kept()
            except BaseException:
                self._list(session)  # looked at again, not forgotten with its chunk
                raise
            session.answer = kept
            freed = answer.nbytes - kept.nbytes  # the chunk's bytes
            if freed:
                session.nbytes = _shared_int(session.nbytes - freed)
                self._account(session, -freed)
                hashed += freed
                if hashed >= hash_bytes:
                    break
        return bool(todo)

    def final_answer(self, session_id: str) -> Session | None:
        """A session that its last chunk ended, without its state but with the answer
        to that chunk, for a while after it ended (so that a retry of it is answered)."""
        return self._final.get(session_id)

    def expire_idle(self) -> list[Session]:
        """End every session idle longer than the timeout (oldest first, so it stops early)."""
        deadline = self._clock() - self.idle_timeout_s
        expired = []
        while self._live:
            _, oldest = next(iter(self._live.items()))
            if oldest.last_used >= deadline:
                break
            self._end(oldest, "expired")
            expired.append(oldest)
        return expired

    def next_expiry_in(self) -> float | None:
        """Seconds until the least recently used session expires; None when there is none."""
        if not self._live:
            return None
        _, oldest = next(iter(self._live.items()))
        return max(0.0, oldest.last_used + self.idle_timeout_s - self._clock())
