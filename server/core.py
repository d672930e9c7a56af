"""The serving core: sessions opened, stepped in order and closed, over the batchers.

API adapters (the native gRPC API and the Open Inference Protocol) convert their
messages into calls on ``Core`` and its errors into status codes; both share one
session store and one batcher per model version, so their steps batch together. A
rejected chunk never touches the session, not even its last use (which decides its
expiry and eviction): validation happens before the step is queued, and the state is
replaced only when the step's result is delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rnnserve.export.repository import MODEL_FILE, is_model_name
from rnnserve.server import records
from rnnserve.server.batcher import Batcher, Group, Slot, StepFuture, retry_after_ms
from rnnserve.server.errors import (
    CoreError,
    InvalidChunk,
    ModelNotFound,
    OutOfOrder,
    Overloaded,
    RecordForeign,
    SessionBusy,
    SessionClosed,
    SessionError,
    SessionEvicted,
    SessionExists,
    SessionExpired,
    SessionForbidden,
    SessionMoved,
    SessionNotFound,
    SessionTaken,
    ShuttingDown,
    StoreUnavailable,
    VersionLoading,
)
from rnnserve.server.identity import escaped, principal
from rnnserve.server.pool import ZERO, PoolState
from rnnserve.server.runtime import ModelRegistry, ModelRuntime
from rnnserve.server.sessions import (
    Answer,
    HostState,
    RowAnswer,
    Session,
    SessionStore,
    digest,
    digest_rows,
)
from rnnserve.server.shared import SharedStore

log = logging.getLogger("rnnserve.core")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ takes three times
class ChunkInput:      # as long (1.4 us more per chunk on the VM); none is changed once made
    """One chunk as the client sent it: exactly one of the three is set, or ``invalid``
    says why the adapter could not convert it (rejected in ``step`` once the session is
    known, so that the rejection is counted against its model)."""

    array: np.ndarray | None = None
    text: bytes | None = None  # UTF-8, encoded once by the adapter
    pcm16: bytes | None = None
    invalid: str | None = None
    expires: float | None = None  # the chunk's own deadline (a perf_counter time)

    @property
    def steps(self) -> int:
        """Its length on the input's time axis (samples for PCM16), before it is checked."""
        if self.text is not None:
            return len(self.text)
        if self.pcm16 is not None:
            return len(self.pcm16) // 2
        return self.array.shape[0] if self.array is not None and self.array.ndim else 0


@dataclass(slots=True)
class _Pending:
    """A step on its way to the shared store: the batcher's commit tag."""

    session: Session
    runtime: ModelRuntime
    seq: int
    x: np.ndarray
    end: bool
    answer: Answer | None = None  # set by the commit, with the record it wrote


@dataclass(slots=True)
class _PendingBlock:
    """A packed block on its way to the shared store: the batcher's commit tag. The
    commit makes its sessions' answers and writes their records in one call; a session
    the store refuses is set in ``refused`` by its place in the block."""

    sessions: list[Session]
    runtime: ModelRuntime
    next_seqs: list[int]  # each session's next chunk once this one is applied
    x: np.ndarray  # (sessions, T, *frame)
    places: list[int]  # the sessions' positions in the request
    ending: set[int]  # the positions whose sessions end with this chunk
    answers: list[Answer] = field(default_factory=list)  # set by the commit
    refused: dict[int, BaseException] = field(default_factory=dict)


# A packed request's block in flight: its model, positions, sessions, chunks, slot, and
# with a shared store its commit tag
_Block = tuple[ModelRuntime, list[int], list[Session], np.ndarray, Slot, "_PendingBlock | None"]


def _row_answers(names: list[str], next_seqs: list[int], xb: np.ndarray,
                 outs: list[np.ndarray], places: list[int], ending: set[int],
                 digests: list[bytes] | None = None) -> list[Answer]:
    """The answers of a block's sessions: each its own copies of its chunk and output
    rows (iterating an array's rows is the quickest way to them; 0.2 to 0.4 us per
    session more than views, which would keep the whole block alive as long as any
    of its answers). Given the chunks' ``digests`` (a record needs them at once), an
    answer keeps its digest instead of its chunk."""
    if digests is not None:
        if len(outs) == 1:
            return [RowAnswer(seq - 1, names, (o.copy(),), None, i in ending, d)
                    for seq, i, d, o in zip(next_seqs, places, digests, outs[0], strict=True)]
        return [RowAnswer(seq - 1, names, tuple(a.copy() for a in row), None, i in ending, d)
                for seq, i, d, *row in zip(next_seqs, places, digests, *outs, strict=True)]
    if len(outs) == 1:
        return [RowAnswer(seq - 1, names, (o.copy(),), c.copy(), i in ending)
                for seq, i, c, o in zip(next_seqs, places, xb, outs[0], strict=True)]
    return [RowAnswer(seq - 1, names, tuple(a.copy() for a in row), c.copy(), i in ending)
            for seq, i, c, *row in zip(next_seqs, places, xb, *outs, strict=True)]


@dataclass(slots=True)  # not frozen, as ChunkInput: made once per chunk
class ChunkOutput:
    seq: int
    outputs: list[tuple[str, np.ndarray]]
    end: bool


@dataclass(slots=True)
class _Flight:
    """A step queued in its batcher; its session is busy until the step lands."""

    session: Session
    runtime: ModelRuntime
    seq: int
    x: np.ndarray
    end: bool
    future: StepFuture  # a future of its own, or its slot in a StreamMany request's group
    pending: _Pending | None  # with a shared store: the commit's tag


# dtypes made once: np.frombuffer(b, dtype="<i2") parses the string on every chunk
_BYTES = np.dtype(np.uint8)
_PCM16 = np.dtype("<i2")  # PCM16 on the wire
_PCM16_NATIVE = _PCM16 == np.dtype(np.int16)  # a little-endian host: no conversion

# One step of ``Core.step_many``: (session id, seq, chunk, end).
StepRequest = tuple[str, int, "ChunkInput", bool]


MAX_ID_CHARS = 256  # a session id (an OIP sequence: "model/id"); a UUID's hex is 32


def check_id(session_id: str) -> None:
    """Session ids are bounded: every id a client opens and closes is remembered for a
    while (to say why it is gone), and errors name it."""
    if len(session_id) > MAX_ID_CHARS:
        raise InvalidChunk(f"a session id has at most {MAX_ID_CHARS} characters; this one "
                           f"has {len(session_id)}")


def check_owner(session: Session) -> None:
    """A session serves only the principal that opened it (with authentication on)."""
    if session.owner != principal():
        raise SessionForbidden(f"session {session.id!r} belongs to another principal")


def _code(exc: Exception) -> str:
    """The status code name a step's failure is counted under."""
    return exc.code if isinstance(exc, CoreError) else "UNKNOWN"


def _row(session: Session) -> int:
    """The pool row of a live session's state (live sessions keep theirs in the pool)."""
    state = session.state
    if not isinstance(state, PoolState):
        raise TypeError(f"session {session.id!r} holds its state outside the model's pool")
    return state.row


# Called once per chunk, answered or rejected: (api, model, version, status code name,
# seconds from receipt to answer, seconds from open to this first answer or None[,
# how many chunks, 1 unless given]). model is "" and version 0 when the session was
# not found.
ChunkHook = Callable[..., None]


# A session this server does not hold (any more), by the reason it gives.
GONE = (SessionNotFound, SessionClosed, SessionEvicted, SessionExpired)

# Called when a session is resumed: (model, version, where its state came from:
# "memory" when this server held it, "store" when loaded from the shared store).
ResumeHook = Callable[[str, int, str], None]

DEADLINE_SLACK_S = 0.005


def _cancelled(expires: float | None) -> str:
    """The code of a chunk whose call was cancelled: DEADLINE_EXCEEDED when gRPC ended
    it at its deadline (the client got that; the alerts count it, they leave CANCELLED
    out), else CANCELLED. ``expires`` was taken from the deadline a moment after gRPC
    did: the slack covers that."""
    if expires is not None and time.perf_counter() >= expires - DEADLINE_SLACK_S:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"


def _positions(places: Sequence[int], n: int, what: str) -> set[int]:
    """The positions ``places`` of a packed request of ``n`` sessions, checked."""
    got = set(places)
    if len(got) != len(places) or any(not 0 <= p < n for p in got):
        raise InvalidChunk(f"{what} must name distinct positions below {n}")
    return got


def _session_of(pending: _Pending | _PendingBlock, place: int) -> Session:
    """The session of a commit's write: a step's, or the one at ``place`` in a block."""
    return pending.sessions[place] if isinstance(pending, _PendingBlock) else pending.session


class Core:
    """Sessions over the batchers. With a ``shared`` store every step is written there
    before it is answered; ``degrade`` says what happens when the store cannot be
    reached: False refuses (UNAVAILABLE, the session unchanged), True serves from memory
    and counts the failure (the session is then not durable)."""

    def __init__(self, registry: ModelRegistry, store: SessionStore,
                 batchers: dict[tuple[str, int], Batcher],
                 on_chunk: ChunkHook | None = None, *, shared: SharedStore | None = None,
                 degrade: bool = False, on_resume: ResumeHook | None = None,
                 on_degraded: Callable[[str], None] | None = None,
                 on_refused: Callable[[str], None] | None = None,
                 admission_delay_s: float = 0.0, max_sessions_per_principal: int = 0,
                 repo_poll_s: float = 0.0) -> None:
        self.registry = registry
        self.repo_poll_s = repo_poll_s  # the repository looked at while serving (app.py)
        # what the last look at it found (app.py sets them): versions there, not loaded
        # yet, and those whose load failed
        self.loading: set[tuple[str, int]] = set()
        self.load_failed: set[tuple[str, int]] = set()
        self._on_chunk = on_chunk
        self.store = store
        self.batchers = batchers
        self.shared = shared
        self.degrade = degrade
        self._on_resume = on_resume
        self._on_degraded = on_degraded
        self._on_refused = on_refused
        # admission control: new sessions and stateless requests are refused while a
        # model's steps wait longer than this (0: never); a principal's live sessions cap
        self.admission_delay_s = admission_delay_s
        self.max_sessions_per_principal = max_sessions_per_principal
        self.accepting = True
        # called with each version loaded while serving (``add_model``): what the API
        # adapters derived from the set of models
        self.on_model_added: list[Callable[[ModelRuntime], None]] = []
        self._letting_go: set[asyncio.Task[None]] = set()
        if shared is not None:  # every step is written to the store before it is answered
            for batcher in batchers.values():
                batcher.commit = self._commit

    def add_model(self, runtime: ModelRuntime, batcher: Batcher) -> None:
        """Serve a version loaded after the start, on its started batcher: new sessions
        that name no version get it if it is its model's highest."""
        if self.shared is not None:
            batcher.commit = self._commit
        self.batchers[runtime.key] = batcher
        self.registry.add(runtime)
        for hook in self.on_model_added:
            hook(runtime)

    async def let_go(self, sids: list[str]) -> None:
        """Give up this server's leases of sessions no longer live here (drained,
        expired, evicted, or loaded and refused: a record foreign, damaged or another
        principal's, a restore that failed), so that other servers need not wait them
        out. A store that does not answer only costs a warning: the leases lapse."""
        assert self.shared is not None
        try:
            await self.shared.release(sids)
        except StoreUnavailable as exc:
            log.warning("could not release %d session lease(s): %s", len(sids), exc)

    def let_go_later(self, sids: list[str]) -> None:
        """``let_go`` in a task (for callers that cannot wait, or are going away)."""
        self._in_background(self.let_go(sids))

    def _in_background(self, coro: Coroutine[None, None, None]) -> asyncio.Task[None]:
        """A store call in a task of its own, kept until done: it finishes even when the
        caller that started it is cancelled."""
        task = asyncio.get_running_loop().create_task(coro)
        self._letting_go.add(task)
        task.add_done_callback(self._letting_go.discard)
        return task

    def _degraded(self, op: str, exc: StoreUnavailable) -> None:
        if not self.degrade:
            raise exc
        log.warning("session store unavailable (%s); serving from memory: %s", op, exc)
        if self._on_degraded is not None:
            self._on_degraded(op)

    async def open(self, model: str, version: int = 0, session_id: str = "",
                   resume: bool = False) -> tuple[Session, ModelRuntime]:
        check_id(session_id)
        if resume:
            session, runtime = await self._resume(model, version, session_id)
            self.store.touch(session)
            return session, runtime
        if not self.accepting:
            raise ShuttingDown("the server is shutting down and opens no new sessions; "
                               "open the session on another replica")
        runtime = await self.runtime(model, version)
        sid = session_id or uuid.uuid4().hex
        self._check_scope(sid)
        if self.store.peek(sid) is not None:
            raise SessionExists(f"session {sid!r} already exists; resume it or pick another id")
        self.admit(runtime, new_session=True)
        stored = False
        if self.shared is not None:
            try:
                fresh = Session(sid, runtime.name, runtime.version,
                                HostState(runtime.zero_state()), owner=principal())
                await self.shared.create(sid, records.encode(fresh))
                stored = True
            except StoreUnavailable as exc:
                self._degraded("create", exc)
        try:
            self._check_principal_cap()  # again: opens may have come while it was stored
            session = self.store.create(runtime.name, runtime.version,
                                        PoolState(runtime.pool), sid,
                                        owner=principal())  # the pool's zero row
        except BaseException:
            # refused here after its record was stored (the cap reached by opens admitted
            # meanwhile): the record goes too, or the same open sent again would be
            # refused as existing
            if stored and self.store.peek(sid) is None:
                await asyncio.shield(self._in_background(self._forget(sid)))
            raise
        session.opened_at = time.perf_counter()
        return session, runtime

    def _check_scope(self, sid: str) -> None:
        """With authentication, an id of the form ``MODEL/LABEL@PRINCIPAL`` (a served
        model's name) is an Open Inference Protocol sequence of that principal
        (``oip.sequence_session``): no other principal may open it, or it could hold
        the ids another tenant's sequences take (they are numbered, not random). Any
        model's name counts, served or not: a model may be added while serving."""
        who = principal()
        head, at, tail = sid.rpartition("@")
        if not who or not at or tail == escaped(who):
            return
        model, slash, _ = head.partition("/")
        if slash and is_model_name(model):
            raise SessionForbidden(f"session id {sid!r} is of the form MODEL/LABEL@PRINCIPAL, "
                                   "which names another principal's Open Inference Protocol "
                                   "sequence; pick another id")

    async def undo_open(self, session: Session) -> None:
        """End a session whose own request opened it and then failed (a StreamMany item
        whose chunk was refused), as if it had never been opened: the request can be
        sent again, and a failed try holds no session. Ended at once, so that a caller
        being cancelled ends it too; the shared store's record is deleted in a task of
        its own that the caller waits for."""
        if self.store.peek(session.id) is not session:
            return  # ended meanwhile
        self.store.close(session.id)
        if self.shared is not None:
            await asyncio.shield(self._in_background(self._forget(session.id)))

    async def _forget(self, sid: str) -> None:
        assert self.shared is not None
        try:
            await self.shared.delete(sid)
        except (StoreUnavailable, SessionError) as exc:
            log.warning("could not delete the record of session %r: %s", sid, exc)

    def admit(self, runtime: ModelRuntime, new_session: bool = False) -> None:
        """Admission control for new work (a session, a stateless request); steps of
        admitted sessions are never refused here, so they keep their latency when the
        server is past its capacity. Raises Overloaded with a retry hint."""
        if self.admission_delay_s:
            delay = self.batchers[runtime.key].delay_s()
            if delay > self.admission_delay_s:
                raise Overloaded(
                    f"model {runtime.name!r} is at capacity: its steps wait "
                    f"{delay * 1000:.0f} ms, over the admission limit of "
                    f"{self.admission_delay_s * 1000:g} ms; retry later or on another replica",
                    retry_after_ms=retry_after_ms(delay))
        if not new_session:
            return
        self._check_principal_cap()
        refused = self.store.refusal(runtime.meta.state_bytes_per_session())
        if refused is not None:  # before the shared store has a record of it
            raise refused

    def _check_principal_cap(self) -> None:
        """--max-sessions-per-principal: asked at admission, and again once the open's
        record is in the shared store (opens of one principal admitted together while
        it was written would else all become live)."""
        who = principal()
        if self.max_sessions_per_principal and \
                self.store.count_of(who) >= self.max_sessions_per_principal:
            raise Overloaded(f"{'principal ' + repr(who) if who else 'this client'} holds "
                             f"its most live sessions ({self.max_sessions_per_principal}); "
                             "close one first", retry_after_ms=1000)

    async def _check_stored_owner(self, sid: str) -> None:
        """With tokens: another principal's session is refused before its lease is taken
        (and its writer changed): a refused caller must not hold the owner's replica
        back while the refusal is under way."""
        assert self.shared is not None
        data = await self.shared.peek(sid)
        if data is not None:
            check_owner(records.decode(data, sid))

    async def _resume(self, model: str, version: int, sid: str, refresh: bool = False
                      ) -> tuple[Session, ModelRuntime]:
        """The session ``sid`` live here: taken from the shared store when it has a newer
        record (or this server none), else the copy held here. Counted as a resume,
        except a ``refresh`` that found the copy here current."""
        local = self.store.peek(sid)
        source = "memory"
        data, asked, taken = None, False, False
        if self.shared is not None:
            if local is None and principal():
                await self._check_stored_owner(sid)
            try:
                got = await self.shared.acquire(sid)
                asked = True
                if got is not None:
                    data, taken = got
            except StoreUnavailable as exc:
                if local is None:
                    raise
                self._degraded("load", exc)
            if data is not None:
                try:
                    stored = records.decode(data, sid)
                    expected = (local.model, local.version) if local is not None else (
                        model, version or stored.version)
                    if expected[0] and (stored.model, stored.version) != expected:
                        raise RecordForeign(
                            f"the stored record of session {sid!r} is for model {stored.model!r} "
                            f"version {stored.version}, not {expected[0]!r} version "
                            f"{expected[1]}; it was not loaded")
                    try:
                        runtime = self.registry.get(stored.model, stored.version)
                    except ModelNotFound:
                        await self._check_loading(
                            stored.model, stored.version, f"session {sid!r} is on model "
                            f"{stored.model!r} version {stored.version}, which", look=True)
                        raise RecordForeign(f"the stored record of session {sid!r} is for model "
                                            f"{stored.model!r} version {stored.version}, which "
                                            "this server does not serve") from None
                    records.check(stored, runtime)
                    if local is None:  # before it moves in: another's caller takes nothing
                        check_owner(stored)
                    # a copy here as new as the record stays (no copy of the state); one
                    # newer than it (steps served while the store was down) is not undone,
                    # unless another server took the session since: its line stands
                    # (or the copy was evicted or expired here while the store was asked:
                    # its row is freed, and the record is the session; not one closed
                    # meanwhile, which ends it, nor one opened anew under its id)
                    if local is None or stored.next_seq > local.next_seq or taken or (
                            local.ended in ("evicted", "expired")
                            and self.store.peek(sid) is None):
                        source = "store"
                        await self._restore(stored, runtime, over=taken)
                except BaseException as exc:
                    if local is None and self.store.peek(sid) is None:
                        # not live here: its lease must not hold it back; given up before
                        # the caller hears of the refusal (a task if it is going away)
                        if isinstance(exc, asyncio.CancelledError):
                            self.let_go_later([sid])
                        else:
                            await self.let_go([sid])
                    raise
        session = self.store.get(sid)
        if asked:
            session.unsure = False  # the store's say is known now
        check_owner(session)
        runtime = self.registry.get(session.model, session.version)
        if model and (model != session.model or (version and version != session.version)):
            raise InvalidChunk(f"session {sid!r} belongs to model {session.model!r} "
                               f"version {session.version}, not {model!r}")
        if self._on_resume is not None and not (refresh and source == "memory"):
            self._on_resume(session.model, session.version, source)
        return session, runtime

    async def runtime(self, model: str, version: int = 0) -> ModelRuntime:
        """``model``'s ``version`` (0: the one a request that names no version gets), as
        ``ModelRegistry.get``; but a version, or a model, that this server's last look
        found in its repository and has not loaded yet is ``VersionLoading``
        (UNAVAILABLE, retry), not NOT_FOUND. Its files are not looked at for a request:
        a client would choose what a thread of the server stats, and how often."""
        try:
            return self.registry.get(model, version or None)
        except ModelNotFound:
            await self._check_loading(model, version, f"model {model!r}" + (
                f" version {version}" if version else ""))
            raise

    async def _check_loading(self, model: str, version: int, subject: str,
                             look: bool = False) -> None:
        """``VersionLoading`` (UNAVAILABLE: clients retry) when ``model``'s ``version``
        (0: any of its versions) is not loaded here but is in the repository, which this
        server looks at while serving (``repo_poll_s``): a version published a moment
        ago, which another server may have loaded and opened sessions on already. As the
        last look found it; with ``look`` (a stored session's version, not a client's
        word) the file is looked for too, for a version published since. Not one whose
        load failed here (refused as not served: the log says why)."""
        key = (model, version)
        if not self.repo_poll_s or not is_model_name(model) or version < 0 \
                or key in self.load_failed:
            return
        if version:
            loading = key in self.loading
            if not loading and look:  # off the loop: a volume may hang
                path = self.registry.repo / model / str(version) / MODEL_FILE
                loading = await asyncio.get_running_loop().run_in_executor(
                    None, path.is_file)
        else:
            loading = any(name == model for name, _ in self.loading)
        if loading:
            raise VersionLoading(
                f"{subject} is in this server's model repository but not loaded yet (it "
                f"looks every {self.repo_poll_s:g}s); retry",
                retry_after_ms=int(1000 * min(self.repo_poll_s, 5.0)))

    async def _restore(self, stored: Session, runtime: ModelRuntime, over: bool = False
                       ) -> None:
        """Make a session read from the shared store live here, its state put into a
        row of the model's pool (the one host-to-device copy of a moved session). The
        write runs in a thread: a row beyond the pool's buffers grows them, which waits
        for the runs in flight, and the event loop must not. A copy that became as new
        as the record meanwhile (another step's load of it) stays, unless ``over``: the
        record's line replaces a copy here that another server's took over from."""
        pool = runtime.pool
        row = pool.alloc()
        state = PoolState(pool, row)
        write = asyncio.get_running_loop().run_in_executor(
            None, pool.write, row, stored.state.arrays)
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:  # the thread may still write the row: freed after
            write.add_done_callback(lambda _: state.release())
            raise
        except BaseException:
            state.release()
            raise
        held = self.store.peek(stored.id)
        if held is not None and held.next_seq >= stored.next_seq and not over:
            state.release()
            return
        stored.state = state
        try:
            live = self.store.restore(stored)
        except BaseException:
            state.release()
            raise
        live.unsynced = False  # it is the record now

    def decode(self, runtime: ModelRuntime, chunk: ChunkInput) -> np.ndarray:
        if chunk.invalid is not None:
            raise InvalidChunk(chunk.invalid)
        kind = runtime.meta.input.kind
        if chunk.text is not None:
            if kind != "utf8_bytes":
                raise InvalidChunk(f"model {runtime.name!r} takes {kind} input, not text")
            return np.frombuffer(chunk.text, _BYTES)
        if chunk.pcm16 is not None:
            if kind != "pcm16":
                raise InvalidChunk(f"model {runtime.name!r} takes {kind} input, not PCM16 audio")
            if len(chunk.pcm16) % 2:
                raise InvalidChunk("PCM16 audio must have an even number of bytes")
            x = np.frombuffer(chunk.pcm16, _PCM16)
            return x if _PCM16_NATIVE else x.astype(np.int16)
        if chunk.array is None:
            raise InvalidChunk("the chunk carries no data: set tensor, text or pcm16")
        return chunk.array

    async def step(self, session_id: str, seq: int | None, chunk: ChunkInput,
                   end: bool = False, api: str = "native",
                   expires: float | None = None, like: ModelRuntime | None = None
                   ) -> ChunkOutput:
        """Advance a session by one chunk; every call is counted by its outcome, once.
        ``seq`` None: the session's next chunk, wherever its last one ran (OIP, whose
        requests carry no number; ``_step_next``). ``like``: the session must be of
        this model, in a version that takes and gives the same tensors (a packed
        request's), else it is refused before anything runs."""
        started = time.perf_counter()
        session: Session | None = None
        code = "UNKNOWN"
        try:
            check_id(session_id)
            try:
                session = self.store.get(session_id)
            except GONE as gone:
                session = await self._recover(session_id, gone)
                if session is None:  # maybe a retry of the chunk that ended it
                    ended = await self._final(session_id)
                    if ended is None or ended.answer is None or seq != ended.answer.seq:
                        raise
                    session = ended
                    check_owner(ended)
                    self._check_like(like, ended)
                    out = self._retry(session_id, ended.answer,
                                      self.registry.get(ended.model, ended.version), chunk)
                    code = "OK"
                    return out
            check_owner(session)
            self._check_like(like, session)
            if seq is None:
                out = await self._step_next(session, chunk, end, expires)
            else:
                if self._stale(session, seq):
                    session = await self._refresh(session)
                out = await self._step(session, seq, chunk, end, expires)
            code = "OK"
            return out
        except CoreError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:  # the caller went away, or its deadline came;
            code = _cancelled(expires)  # the state did not advance
            raise
        finally:
            self._count(api, session, code, started)

    async def _step_next(self, session: Session, chunk: ChunkInput, end: bool,
                         expires: float | None) -> ChunkOutput:
        """A step with no number of its own, with a shared store: the copy here may be
        behind the store when the session went on elsewhere. After its lease may have
        run out (``_lapsed``) another server could have taken it: the store's record is
        taken first. A sibling worker takes it at once, unseen: the store then refuses
        the copy's step (SessionMoved; the copy is dropped), and the chunk runs once
        more from the record. Not after SessionTaken: steps served from memory were lost."""
        if self._lapsed(session):
            session = await self._refresh(session)
        try:
            return await self._step(session, session.next_seq, chunk, end, expires)
        except SessionTaken:
            raise
        except SessionMoved:  # only a shared store refuses a step so
            session, _ = await self._resume(session.model, session.version, session.id)
            return await self._step(session, session.next_seq, chunk, end, expires)

    def _lapsed(self, session: Session) -> bool:
        """With a shared store, a copy idle for the lease's time (its lease may have run
        out: another server may have taken the session since), or whose last step was
        given up. Its last use came before its last write renewed the lease: never late."""
        return self.shared is not None and not session.busy and (
            session.unsure or self.store.idle_s(session) >= self.shared.lease_s)

    def _count(self, api: str, session: Session | None, code: str, started: float) -> None:
        """Count one chunk by its outcome (and a session's first answer)."""
        if self._on_chunk is not None:
            done = time.perf_counter()
            first = None
            if session is not None and code == "OK" and session.opened_at:
                first = done - session.opened_at
                session.opened_at = 0.0
            self._on_chunk(api, session.model if session else "",
                           session.version if session else 0, code, done - started, first)
        elif session is not None and code == "OK":
            session.opened_at = 0.0

    async def step_many(self, steps: Sequence[StepRequest], api: str = "native",
                        expires: float | None = None) -> list[ChunkOutput | Exception]:
        """Advance several sessions by one chunk each, as many ``step`` calls would (each
        checked and counted alike), but queued at once and awaited once: no task per
        step. Returns per step its output or the exception ``step`` would have raised;
        one step's failure changes nothing for the others. The rare steps that need the
        shared store first (a session to load, a copy to refresh) take ``step``'s path.
        ``expires``: the call's deadline, as ``step``'s."""
        started = time.perf_counter()
        outcomes: list[ChunkOutput | Exception | None] = [None] * len(steps)
        flights: list[tuple[int, _Flight, ChunkInput]] = []
        slow: list[tuple[int, asyncio.Task[ChunkOutput]]] = []
        loop = asyncio.get_running_loop()
        group = Group()  # the plain steps' results: one future for all of them
        for i, (sid, seq, chunk, end) in enumerate(steps):
            coro: Coroutine[None, None, ChunkOutput] | None = None
            session = None
            try:
                try:
                    session = self.store.get(sid)
                except GONE:
                    coro = self.step(sid, seq, chunk, end, api, expires)
                else:
                    check_owner(session)
                    if self._stale(session, seq):  # step's path refreshes it first
                        coro = self.step(sid, seq, chunk, end, api, expires)
                    else:
                        flight = self._begin(session, seq, chunk, end, expires, group)
                        if isinstance(flight, ChunkOutput):  # a retry, answered again
                            outcomes[i] = flight
                            self._count(api, session, "OK", started)
                        else:
                            flights.append((i, flight, chunk))
            except Exception as exc:
                outcomes[i] = exc
                self._count(api, session, _code(exc), started)
            if coro is not None:
                slow.append((i, loop.create_task(coro)))
        waiting: list[asyncio.Future[Any]] = [t for _, t in slow]
        if flights:
            waiting.append(group.future)
        try:
            if waiting:
                await asyncio.wait(waiting)
        except asyncio.CancelledError:  # the caller went away, or its deadline came
            code = _cancelled(expires)
            for _, f, _ in flights:
                self._give_up(f)
                self._count(api, f.session, code, started)
            for _, t in slow:
                t.cancel()
            raise
        for k, (i, f, chunk) in enumerate(flights):
            try:
                outcomes[i] = await self._finish(f, chunk)  # suspends only for a moved session
                code = "OK"
            except asyncio.CancelledError:  # while a moved session's answer was looked up
                code = _cancelled(expires)
                for _, g, _ in flights[k:]:  # the later ones ran: their new rows go back
                    self._give_up(g)
                    self._count(api, g.session, code, started)
                raise
            except Exception as exc:
                outcomes[i] = exc
                code = _code(exc)
            self._count(api, f.session, code, started)
        for i, t in slow:  # done; counted by step
            failed = t.exception()
            outcomes[i] = t.result() if failed is None else failed  # type: ignore[assignment]
        return outcomes  # type: ignore[return-value]

    async def step_packed(self, model: str, version: int, sids: Sequence[str],
                          seqs: Sequence[int], x: np.ndarray, opens: Sequence[int] = (),
                          ends: Sequence[int] = (), *, timeout_s: float = 0.0,
                          api: str = "native", expires: float | None = None
                          ) -> tuple[list[tuple[str, np.ndarray]], dict[int, Exception]]:
        """Advance ``sids[i]`` by chunk ``x[i]`` (numbered ``seqs[i]``) for every i, as
        ``step_many`` would, the chunks (sessions, time, *frame) for ``model``; the
        sessions at positions ``opens`` are opened first (on ``version``, with their
        ids), those at ``ends`` end with their chunk. Returns the outputs, each
        (sessions, ...) with zero rows for the sessions that failed, and those sessions'
        failures by position; one failure changes nothing for the others.

        The common case costs a look-up and a check per session: a live session of
        ``model`` with no chunk in flight whose chunk is its next one goes to its
        batcher with the others as one block (split at ``--max-batch-size``), and the
        outputs come back as one array; with a shared store the block's records are
        written there first, in the batch's one call (``_commit``), for a copy used
        within its lease and not left unsure. Any other session (a retry, one to open,
        one not held here, a copy the store may have gone past) takes ``step``'s path.
        Raises (nothing ran) when the request as a whole is malformed: an unknown
        model, chunks it cannot take, positions out of range."""
        started = time.perf_counter()
        runtime = await self.runtime(model, version)
        n = len(sids)
        try:
            if len(seqs) != n or x.ndim < 1 or len(x) != n:
                raise InvalidChunk(f"{n} sessions, {len(seqs)} sequence numbers and "
                                   f"{len(x) if x.ndim else 0} rows of chunks: give one "
                                   "of each per session")
            x = runtime.check_block(x)
            opening = _positions(opens, n, "opens")
            ending = _positions(ends, n, "ends")
        except CoreError as exc:
            if self._on_chunk is not None and n:
                self._on_chunk(api, runtime.name, runtime.version, exc.code, 0.0, None, n)
            raise
        chunk_expires = started + timeout_s if timeout_s else None
        fast_expires = expires if chunk_expires is None or (
            expires is not None and expires < chunk_expires) else chunk_expires
        failures: dict[int, Exception] = {
            i: InvalidChunk("chunk contains NaN or Inf (the server rejects them: "
                            "--nonfinite reject)") for i in runtime.nonfinite_rows(x)}
        for i in failures:
            self._count(api, self.store.peek(sids[i]), "INVALID_ARGUMENT", started)
        # the common case, by model version: positions, sessions
        fast: dict[tuple[str, int], tuple[list[int], list[Session]]] = {}
        slow: list[int] = []
        who = principal()
        # with a shared store, only a copy used within the lease's time, whose last step
        # was not given up, is surely the store's latest (``_lapsed``, ``_stale``)
        held = self.store.live_many(sids) if self.shared is None else \
            self.store.live_many(sids, self.shared.lease_s)
        for i, (session, seq) in enumerate(zip(held, seqs, strict=True)):
            if i in failures:
                continue
            if session is None or session.busy or seq != session.next_seq or \
                    session.model != runtime.name or session.owner != who or \
                    session.unsure or (opening and i in opening):
                slow.append(i)  # (a session twice in the request: busy the second time)
                continue
            session.busy = True  # until its block lands, or is refused
            key = (session.model, session.version)
            got = fast.get(key)
            if got is None:
                got = fast[key] = ([], [])
            got[0].append(i)
            got[1].append(session)
        group = Group()
        blocks: list[_Block] = []
        try:
            for key, (places, sessions) in fast.items():
                self._queue_blocks(runtime, self.registry.get(*key), places, sessions, x,
                                   fast_expires, group, blocks, failures, api, started,
                                   ending)
        except BaseException:  # a bug: no session may stay busy
            for rt, _, _, _, slot, _ in blocks:
                self.batchers[rt.key].abandon(slot)
            for _, sessions in fast.values():
                for m in sessions:
                    m.busy = False
            raise
        loop = asyncio.get_running_loop()
        tasks: list[tuple[int, asyncio.Task[ChunkOutput]]] = []
        for i in slow:
            chunk = ChunkInput(array=x[i], expires=chunk_expires)
            coro = self._open_step(runtime, sids[i], chunk, i in ending, api, expires) \
                if opening and i in opening else \
                self.step(sids[i], seqs[i], chunk, i in ending, api, expires, runtime)
            tasks.append((i, loop.create_task(coro)))
        waiting: list[asyncio.Future[Any]] = [t for _, t in tasks]
        if blocks:
            waiting.append(group.future)
        try:
            if waiting:
                await asyncio.wait(waiting)
        except asyncio.CancelledError:
            code = _cancelled(expires)
            for rt, _, members, _, slot, pending in blocks:
                self.batchers[rt.key].abandon(slot)
                for m in members:
                    m.busy = False
                    if pending is not None:  # its commit may land all the same: the
                        m.unsure = True  # next step takes the store's record first
                    self._count(api, m, code, started)
            for _, t in tasks:
                t.cancel()
            raise
        names = runtime.data_output_names
        outputs: list[np.ndarray] | None = None
        moved: list[tuple[int, Session]] = []
        if len(blocks) == 1 and len(blocks[0][1]) == n:  # everyone, in order, ran as one
            outputs = self._land(blocks[0], ending, failures, api, started, moved)
            blocks = []
        pieces: list[tuple[list[int], list[np.ndarray]]] = []
        for block in blocks:
            landed = self._land(block, ending, failures, api, started, moved)
            if landed is not None:
                pieces.append((block[1], landed))
        late: list[tuple[int, list[np.ndarray]]] = []
        for k, (i, m) in enumerate(moved):  # rare: the store refused a copy here that
            try:  # another server or worker had gone on with
                retried = await self._moved(m.id, seqs[i], runtime, ChunkInput(array=x[i]),
                                            failures[i])
            except asyncio.CancelledError:
                for _, other in moved[k:]:
                    self._count(api, other, _cancelled(expires), started)
                raise
            except Exception as exc:
                failures[i] = exc
                self._count(api, m, _code(exc), started)
                continue
            del failures[i]
            late.append((i, [a for _, a in retried.outputs]))
            self._count(api, m, "OK", started)
        for i, t in tasks:
            failed = t.exception()
            if failed is not None:
                failures[i] = failed  # type: ignore[assignment]
                continue
            # (step refused, before it ran, a session whose outputs differ: ``like``)
            pieces.append(([i], [a[None] for _, a in t.result().outputs]))
        if outputs is None or failures or late:
            outputs = self._assemble(runtime, x.shape[1], n, outputs, pieces, failures)
            for i, arrays in late:
                for target, a in zip(outputs, arrays, strict=True):
                    target[i] = a
        return list(zip(names, outputs, strict=True)), failures

    def _queue_blocks(self, runtime: ModelRuntime, rt: ModelRuntime, places: list[int],
                      sessions: list[Session], x: np.ndarray, expires: float | None,
                      group: Group, blocks: list[_Block], failures: dict[int, Exception],
                      api: str, started: float, ending: set[int]) -> None:
        """Queue the chunks ``x[places]`` of ``sessions`` (busy, of ``rt``) in blocks of at
        most a batch each, added to ``blocks``; those refused fail, no longer busy. With
        a shared store each block is committed there (one call) before it lands."""
        why = self._packable(runtime, rt)
        if why is not None:
            for i, session in zip(places, sessions, strict=True):
                session.busy = False
                failures[i] = why
                self._count(api, session, why.code, started)
            return
        batcher = self.batchers[rt.key]
        step = batcher.max_batch_size
        for lo in range(0, len(places), step):
            part, members = places[lo:lo + step], sessions[lo:lo + step]
            # consecutive positions (the common case) are a view, others a copy
            xb = x[part[0]:part[-1] + 1] if part[-1] - part[0] == len(part) - 1 \
                else x[part]
            pending = None if self.shared is None else _PendingBlock(
                members, rt, [m.next_seq + 1 for m in members], xb, part, ending)
            try:
                slot = batcher.submit_block([_row(m) for m in members], xb, expires, group,
                                            pending)
            except Overloaded as exc:
                for i, m in zip(part, members, strict=True):
                    m.busy = False
                    failures[i] = exc
                    self._count(api, m, exc.code, started)
                continue
            self.store.touch_many(members)
            blocks.append((rt, part, members, xb, slot, pending))

    def _check_like(self, like: ModelRuntime | None, session: Session) -> None:
        """Refuse a session that a packed request for ``like`` cannot step (``step``)."""
        if like is None:
            return
        if session.model != like.name:
            raise InvalidChunk(f"session {session.id!r} belongs to model {session.model!r}, "
                               f"not {like.name!r}")
        why = self._packable(like, self.registry.get(session.model, session.version))
        if why is not None:
            raise why

    def _packable(self, runtime: ModelRuntime, other: ModelRuntime) -> CoreError | None:
        """Why a session of ``other`` cannot step in a packed request for ``runtime``
        (its input or outputs differ), or None."""
        if other is runtime:
            return None
        a, b = runtime.meta, other.meta
        if (a.input.kind, a.input.dtype, a.input.shape, a.input.hop_samples) != \
                (b.input.kind, b.input.dtype, b.input.shape, b.input.hop_samples) or \
                [(o.name, o.dtype, o.shape) for o in a.outputs] != \
                [(o.name, o.dtype, o.shape) for o in b.outputs]:
            return InvalidChunk(f"this session is on version {other.version} of model "
                                f"{other.name!r}, whose input or outputs differ from version "
                                f"{runtime.version}'s; send its chunks in a request for "
                                f"version {other.version}")
        return None

    def _land(self, block: _Block, ending: set[int], failures: dict[int, Exception],
              api: str, started: float, moved: list[tuple[int, Session]]
              ) -> list[np.ndarray] | None:
        """A block's run done: its sessions get their new states and answers (or its
        failure, each); returns its outputs, or None when it failed. A session the
        shared store refused fails with why; one it refused as moved is added to
        ``moved``, not counted yet (``_moved``)."""
        rt, places, members, xb, slot, pending = block
        for m in members:
            m.busy = False
        failed = slot.exception()
        if failed is not None:
            code = _code(failed)  # type: ignore[arg-type]
            for i, m in zip(places, members, strict=True):
                failures[i] = failed  # type: ignore[assignment]
                self._count(api, m, code, started)
            return None
        outs, rows = slot.result()  # type: ignore[misc]
        pool = rt.pool
        states = [PoolState(pool, row) for row in rows]
        if pending is None:
            seqs = [m.next_seq + 1 for m in members]
            answers = _row_answers(rt.data_output_names, seqs, xb, outs, places, ending)
        else:  # committed: the answers its records hold
            seqs, answers = pending.next_seqs, pending.answers
            if pending.refused:
                keep = [j for j in range(len(members)) if j not in pending.refused]
                for j, why in pending.refused.items():
                    states[j].release()  # the session keeps its old row (or was dropped)
                    failures[places[j]] = why  # type: ignore[assignment]
                    if isinstance(why, SessionMoved):
                        moved.append((places[j], members[j]))
                    else:
                        self._count(api, members[j], _code(why), started)  # type: ignore[arg-type]
                places = [places[j] for j in keep]
                members = [members[j] for j in keep]
                states = [states[j] for j in keep]
                seqs = [seqs[j] for j in keep]
                answers = [answers[j] for j in keep]
        nbytes = pool.row_bytes + (answers[0].nbytes if answers else 0)  # one size for all
        gone = self.store.update_many(members, states, seqs, answers, nbytes)
        for j in gone:  # ended while its step ran (closed, evicted): not answered
            states[j].release()
            m = members[j]
            failures[places[j]] = self.store.gone(m.id, m.ended) if m.ended else \
                SessionEvicted(f"session {m.id!r} ended (replaced) while its chunk ran; "
                               "open a new one")
            self._count(api, m, failures[places[j]].code, started)  # type: ignore[attr-defined]
        if ending:
            for i, m in zip(places, members, strict=True):
                if i in ending and i not in failures:
                    self.store.close(m.id)
        answered = [m for j, m in enumerate(members) if j not in gone] if gone else members
        firsts = [m for m in answered if m.opened_at]
        for m in firsts:  # opened by another call, first answered here: one by one
            self._count(api, m, "OK", started)
        if self._on_chunk is not None and len(answered) > len(firsts):
            self._on_chunk(api, rt.name, rt.version, "OK", time.perf_counter() - started,
                           None, len(answered) - len(firsts))
        return outs

    @staticmethod
    def _assemble(runtime: ModelRuntime, steps: int, n: int, whole: list[np.ndarray] | None,
                  pieces: list[tuple[list[int], list[np.ndarray]]],
                  failures: dict[int, Exception]) -> list[np.ndarray]:
        """The outputs of a packed request, each (n, ...), from its pieces (positions and
        their rows); the rows of failed sessions zero."""
        shapes = runtime.output_row_shapes(steps)
        if whole is not None:  # one block ran all; zero the rows that failed after all
            out = [a.copy() for a in whole] if failures else whole
        else:
            out = [np.zeros((n, *shape), dtype) for shape, dtype in shapes]
            for places, arrays in pieces:
                for target, a in zip(out, arrays, strict=True):
                    target[places] = a
        if failures:
            bad = list(failures)
            for a in out:
                a[bad] = 0
        return out

    async def _open_step(self, runtime: ModelRuntime, sid: str, chunk: ChunkInput,
                         end: bool, api: str, expires: float | None) -> ChunkOutput:
        """Open session ``sid`` of ``runtime``'s model and version, then step it by its
        first chunk; a failed step ends the session again, as if never opened."""
        if not sid:
            raise InvalidChunk("a session opened by a packed request needs an id of the "
                               "client's")
        session, _ = await self.open(runtime.name, runtime.version, sid)
        try:
            return await self.step(sid, 0, chunk, end, api, expires)
        except BaseException:
            await self.undo_open(session)
            raise

    async def _step(self, session: Session, seq: int, chunk: ChunkInput,
                    end: bool, expires: float | None = None) -> ChunkOutput:
        flight = self._begin(session, seq, chunk, end, expires)
        if isinstance(flight, ChunkOutput):
            return flight
        assert isinstance(flight.future, asyncio.Future)
        try:
            await flight.future
        except asyncio.CancelledError:
            self._give_up(flight)
            raise
        except Exception:  # _finish raises it
            pass
        return await self._finish(flight, chunk)

    def _begin(self, session: Session, seq: int, chunk: ChunkInput, end: bool,
               expires: float | None = None, group: Group | None = None
               ) -> _Flight | ChunkOutput:
        """A step up to its run, without waiting: checked, queued in its batcher, its
        session marked busy. A retry of the last chunk gets its answer here instead."""
        session_id = session.id
        if self.store.peek(session_id) is not session:
            # it ended (or was replaced) while the request awaited something since it was
            # looked up (a store round trip): its pool row may be another session's now
            raise self.store.gone(session_id, session.ended)
        runtime = self.registry.get(session.model, session.version)
        if session.busy:
            raise SessionBusy(f"session {session_id!r} has a chunk in flight; send the next "
                              "chunk after its answer")
        if seq != session.next_seq:
            answer = session.answer
            if answer is not None and seq == answer.seq:
                out = self._retry(session_id, answer, runtime, chunk)
                self.store.touch(session)
                return out
            raise OutOfOrder(f"session {session_id!r} expects chunk {session.next_seq}, "
                             f"got {seq}")
        x = runtime.check_chunk(self.decode(runtime, chunk))
        if chunk.expires is not None and (expires is None or chunk.expires < expires):
            expires = chunk.expires  # the chunk's own timeout, sooner than the call's
        # with a shared store the batcher commits it (_commit): durable before answered
        pending = None if self.shared is None else _Pending(session, runtime, seq, x, end)
        future = self.batchers[runtime.key].submit(_row(session), x, expires, pending,
                                                   group=group)
        session.busy = True
        self.store.touch(session)  # only now: a refused chunk is no use of its session
        return _Flight(session, runtime, seq, x, end, future, pending)

    def _give_up(self, flight: _Flight) -> None:
        """A step whose caller went away: dropped if it has not run, else its new row
        freed; the session stays as it was here. With a shared store its commit may
        have landed there all the same (the run and the write go on without the
        caller): the session's next step then takes the store's record first
        (``_stale``), so that a retry of this chunk gets the stored answer instead of
        being refused as moved."""
        self.batchers[flight.runtime.key].abandon(flight.future)
        flight.session.busy = False
        if flight.pending is not None:
            flight.session.unsure = True

    async def _finish(self, flight: _Flight, chunk: ChunkInput) -> ChunkOutput:
        """A step whose run is done: its new state and answer become the session's (or
        the run's failure is raised). Suspends only when the store says the session moved."""
        session_id = flight.session.id
        try:
            failure = flight.future.exception()
            if isinstance(failure, SessionMoved):
                return await self._moved(session_id, flight.seq, flight.runtime, chunk,
                                         failure)
            if failure is not None:
                raise failure
            outputs, new_row, _ = flight.future.result()
        finally:
            flight.session.busy = False
        runtime = flight.runtime
        if flight.pending is None:
            answer = Answer(flight.seq, None,
                            list(zip(runtime.data_output_names, outputs, strict=True)),
                            flight.end, chunk=flight.x)
        else:
            assert flight.pending.answer is not None
            answer = flight.pending.answer
        new_state = PoolState(runtime.pool, new_row)
        try:
            self.store.update(flight.session, new_state, flight.seq + 1, answer)
        except BaseException:  # the session ended meanwhile (evicted, restored over)
            new_state.release()
            raise
        if flight.end:
            self.store.close(session_id)
        return ChunkOutput(flight.seq, answer.outputs, flight.end)

    async def _moved(self, session_id: str, seq: int, runtime: ModelRuntime,
                     chunk: ChunkInput, failure: BaseException) -> ChunkOutput:
        """A step the store refused as moved (this copy is stale): maybe another server
        already ended the session with this very chunk, and this is the client's retry
        of it, which gets that answer; else ``failure`` is raised."""
        ended = await self._final(session_id)
        if ended is None or ended.answer is None or ended.answer.seq != seq:
            raise failure
        return self._retry(session_id, ended.answer, runtime, chunk)

    async def _commit(self, steps: list[tuple[_Pending | _PendingBlock, list[np.ndarray],
                                              list[np.ndarray] | None]]
                      ) -> list[BaseException | None]:
        """The batcher's commit hook: write a group's steps to the shared store in one
        call. A step the store refuses fails with why; its session is dropped here (another
        server owns it now: this copy must never answer again). A step whose write could
        not reach the store (all of it, or its session's shard) fails with
        ``StoreUnavailable`` and its session is marked unsure, or with ``degrade`` is
        served from memory. A packed block is one step whose sessions are written each:
        one refused (or closed meanwhile, or on a shard that failed) is set in its
        ``refused``, and the others land."""
        assert self.shared is not None
        results: list[BaseException | None] = [None] * len(steps)
        writes: list[tuple[str, bytes, int, int, bool, bool]] = []
        whose: list[tuple[int, int]] = []  # per write: its step, its place in a block or -1
        for i, (p, outputs, state) in enumerate(steps):
            assert state is not None  # the batcher copies the new states for a commit
            if isinstance(p, _PendingBlock):
                p.answers = _row_answers(p.runtime.data_output_names, p.next_seqs, p.x,
                                         outputs, p.places, p.ending, digest_rows(p.x))
                data = records.encode_rows(p.sessions, state, p.answers, outputs)
                for j, (m, a, d) in enumerate(zip(p.sessions, p.answers, data, strict=True)):
                    if m.ended:
                        p.refused[j] = self.store.gone(m.id, m.ended)
                        continue
                    writes.append((m.id, d, a.seq, a.seq + 1, a.end, m.unsynced))
                    whose.append((i, j))
                continue
            if p.session.ended:  # ended here while its step waited. Closed: its record is
                # deleted, or is already a new session's of the same id, at the same seq;
                # evicted or expired: its lease was given up, and a later request takes
                # the record as it was (the chunk was not answered: it runs again then)
                results[i] = self.store.gone(p.session.id, p.session.ended)
                continue
            p.answer = Answer(p.seq, digest(p.x),
                              list(zip(p.runtime.data_output_names, outputs, strict=True)), p.end)
            writes.append((p.session.id, records.encode(p.session, state, p.seq + 1, p.answer),
                           p.seq, p.seq + 1, p.end, p.session.unsynced))
            whose.append((i, -1))
        try:
            refused = await self.shared.checkpoint_many(writes) if writes else []
        except StoreUnavailable as exc:  # the store (every shard of it) failed
            refused = [exc] * len(writes)
        cut: StoreUnavailable | None = None  # the first write whose shard failed
        for (i, j), why in zip(whose, refused, strict=True):
            p = steps[i][0]
            session = _session_of(p, j)
            if why is None:
                session.unsynced = False
                continue
            if isinstance(why, StoreUnavailable):
                cut = cut or why
                if self.degrade:  # its record may stay behind (or the write may land)
                    session.unsynced = True
                    if self._on_degraded is not None:
                        self._on_degraded("checkpoint")
                    continue
                # a write sent may land all the same: the next step takes the store's
                # record first
                session.unsure = True
                if isinstance(p, _PendingBlock):  # the block's others may have landed
                    p.refused[j] = StoreUnavailable(str(why))
                else:
                    results[i] = StoreUnavailable(str(why))
                continue
            self.store.drop(session)  # not closed: a later request takes it from the store
            if self._on_refused is not None and isinstance(why, SessionError):
                self._on_refused(why.reason.removeprefix("session_"))
            if isinstance(p, _PendingBlock):
                p.refused[j] = why
            else:
                results[i] = why
        if cut is not None and self.degrade:
            log.warning("session store unavailable (checkpoint); serving from memory: %s", cut)
        return results

    async def _recover(self, session_id: str, gone: SessionError) -> Session | None:
        """A step for a session this server does not hold (never did, or evicted it):
        with a shared store, take it from there, so that any replica can go on with it
        and eviction only moves a session out of memory. None if the store has none."""
        if self.shared is None or isinstance(gone, SessionClosed):
            return None
        try:
            session, _ = await self._resume("", 0, session_id)
        except GONE:
            return None
        return session

    def _stale(self, session: Session, seq: int) -> bool:
        """A chunk numbered ahead of this server's idle copy, or a copy whose last step
        was given up (``_give_up``), with a shared store: the session may have gone on
        in the store, and its copy is refreshed before the step."""
        return self.shared is not None and (seq > session.next_seq or session.unsure) \
            and not session.busy

    async def _refresh(self, session: Session) -> Session:
        """A step ahead of this server's copy: the session went on elsewhere (another
        replica or worker took it from the store) and came back. The store's newer
        record replaces the copy; when it has none the copy stays, and the step is
        refused for its seq as before. A store that cannot be reached answers
        UNAVAILABLE at once (with ``degrade`` the copy is served): the step's write
        would only wait out the timeout once more."""
        try:
            fresh, _ = await self._resume("", 0, session.id, refresh=True)
        except GONE:
            return session
        return fresh

    async def _final(self, session_id: str) -> Session | None:
        """The ended session whose last answer a retry may get, here or in the store."""
        ended = self.store.final_answer(session_id)
        if ended is None and self.shared is not None:
            try:
                data = await self.shared.final(session_id)
            except StoreUnavailable:
                return None
            if data is not None:
                ended = records.decode(data, session_id)
        return ended

    def _retry(self, session_id: str, answer: Answer, runtime: ModelRuntime,
               chunk: ChunkInput) -> ChunkOutput:
        """A chunk sent again (a client retry after a lost answer): the stored answer
        if it carries the same data, and the state stays as it is."""
        x = runtime.check_chunk(self.decode(runtime, chunk))
        if digest(x) != answer.digest:
            raise OutOfOrder(f"session {session_id!r} already applied chunk {answer.seq} "
                             f"with other data; its next chunk is {answer.seq + 1}")
        return ChunkOutput(answer.seq, answer.outputs, answer.end)

    def check(self, runtime: ModelRuntime, chunk: ChunkInput, api: str) -> np.ndarray:
        """Decode and validate a chunk for ``runtime`` without touching any session,
        for adapters that must refuse bad input before they open one; a rejection is
        counted like a rejected step."""
        try:
            return runtime.check_chunk(self.decode(runtime, chunk))
        except CoreError as exc:
            self.rejected(runtime, exc, api)
            raise

    def rejected(self, runtime: ModelRuntime, exc: CoreError, api: str) -> None:
        """Count a chunk for ``runtime`` that an adapter refused before the core saw it
        (a malformed request, a sequence that was never started)."""
        if self._on_chunk is not None:
            self._on_chunk(api, runtime.name, runtime.version, exc.code, 0.0, None)

    async def infer(self, runtime: ModelRuntime, chunks: list[ChunkInput],
                    api: str = "native", expires: float | None = None
                    ) -> list[list[np.ndarray]]:
        """Run chunks of no session, each from a zero state that is then discarded
        (stateless requests); they queue and batch like steps. Counted as one chunk."""
        started = time.perf_counter()
        code = "UNKNOWN"
        try:
            self.admit(runtime)
            xs = [runtime.check_chunk(self.decode(runtime, c)) for c in chunks]
            batcher = self.batchers[runtime.key]
            results = await asyncio.gather(*(batcher.step(ZERO, x, expires, keep=False)
                                             for x in xs))
            code = "OK"
            return [outputs for outputs, _, _ in results]
        except CoreError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = _cancelled(expires)
            raise
        finally:
            if self._on_chunk is not None:
                self._on_chunk(api, runtime.name, runtime.version, code,
                               time.perf_counter() - started, None)

    def runtime_for(self, session_id: str, model: str = "", version: int = 0
                    ) -> ModelRuntime | None:
        """The model a chunk for ``session_id`` would run on: the live session's, else
        ``model``'s (a request that opens the session); None when neither is known here."""
        session = self.store.peek(session_id)
        if session is not None:
            return self.registry.get(session.model, session.version)
        if not model:
            return None
        try:
            return self.registry.get(model, version or None)
        except ModelNotFound:
            return None

    def model_of(self, session_id: str) -> tuple[str, int]:
        """(model, version) of a live session, ("", 0) when there is none; for labels."""
        session = self.store.peek(session_id)
        return (session.model, session.version) if session is not None else ("", 0)

    async def close(self, session_id: str) -> None:
        check_id(session_id)
        held = self.store.peek(session_id)
        if held is None and self.shared is not None:
            try:  # held elsewhere: load it, so that its owner is checked here too
                held, _ = await self._resume("", 0, session_id)
            except GONE:
                held = None
        if held is not None:
            check_owner(held)
        try:
            self.store.close(session_id)
        except SessionError:
            if self.shared is None:
                raise
        if self.shared is not None:
            await self.shared.delete(session_id)
