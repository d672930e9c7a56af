"""Client library for ``rnnserve.v1.Inference``.

Streaming (asyncio)::

    async with AsyncClient("127.0.0.1:8001") as client:
        async with client.stream("text") as s:
            out = await s.send("Hello, ")           # {"logits": array (time, 256)}
            out = await s.send("world", end=True)

Unary (sync, for clients that cannot stream)::

    with Client("127.0.0.1:8001") as client:
        sid = client.open_session("text").session_id
        out = client.step(sid, 0, "Hello")
        client.close_session(sid)

Data for a chunk may be ``str`` (text models), ``bytes`` (PCM16 audio for pcm16
models, raw byte values for text models) or a numpy array shaped (time, *frame).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from rnnserve.protos.headers import (
    MAX_MS_SECONDS,
    RETRY_PUSHBACK,
    SESSION_HEADER,
    WORKER_HEADER,
    grpc_ms,
)
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.protos.tensors import fill_tensor, from_tensor

Data = str | bytes | np.ndarray


def make_chunk(seq: int, data: Data, end: bool = False, *, pcm16: bool = False,
               timeout_ms: int = 0) -> pb.Chunk:
    """``timeout_ms``: the server drops the chunk (DEADLINE_EXCEEDED, the session as it
    was) if it has not started to run that long after the server read it; 0: no limit."""
    c = pb.Chunk()
    _fill_chunk(c, seq, data, end, pcm16, timeout_ms)
    return c


def _fill_chunk(c: pb.Chunk, seq: int, data: Data, end: bool, pcm16: bool,
                timeout_ms: int) -> None:
    """Write a chunk into the empty ``c`` (in place: a finished Chunk would be copied
    once more into the message that carries it)."""
    c.seq = seq
    if isinstance(data, str):
        c.text = data
    elif isinstance(data, bytes | bytearray | memoryview):
        if pcm16:
            c.pcm16 = data if isinstance(data, bytes) else bytes(data)
        else:
            fill_tensor(c.tensor, np.frombuffer(data, dtype=np.uint8))
    else:
        fill_tensor(c.tensor, np.asarray(data))
    if end:
        c.end = True
    if timeout_ms:
        c.timeout_ms = timeout_ms


def new_session_id() -> str:
    """Sessions are named by the client, so that the first call already carries the
    routing header a load balancer hashes (the server takes the id as given)."""
    return uuid.uuid4().hex


def _routing(session_id: str) -> tuple[tuple[str, str], ...]:
    return ((SESSION_HEADER, session_id),)


def _credentials(root_certificates: bytes | None, private_key: bytes | None,
                 certificate_chain: bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS material is given (a client certificate for mutual
    TLS with ``private_key`` and ``certificate_chain``), else None (plaintext)."""
    if root_certificates is None and private_key is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


# Channel option: this client's own connection. gRPC otherwise shares one connection
# between all channels of a process to the same target, so that every client of the
# process reaches the same worker of a server running several (`serve --workers`).
OWN_CONNECTION: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]


def _channel_options(options: list[tuple[str, Any]] | None, keepalive_s: float,
                    keepalive_timeout_s: float) -> list[tuple[str, Any]]:
    """``options`` with the keepalive channel arguments for ``keepalive_s`` > 0 added
    (an option given in ``options`` wins): a ping after ``keepalive_s`` without
    activity, also on an idle stream or a connection without calls, and the connection
    closed (its calls fail with UNAVAILABLE) when the ping is not answered within
    ``keepalive_timeout_s``."""
    if not (0 <= keepalive_s <= MAX_MS_SECONDS and 0 < keepalive_timeout_s <= MAX_MS_SECONDS):
        raise ValueError(f"keepalive_s must be >= 0 and keepalive_timeout_s > 0, both at "
                         f"most {MAX_MS_SECONDS} s, got {keepalive_s} and "
                         f"{keepalive_timeout_s}")
    given = list(options or [])
    if not keepalive_s:
        return given
    names = dict(given)
    # a keepalive timeout given in ``options`` bounds the ping's answer below too
    timeout_ms = names.get("grpc.keepalive_timeout_ms", grpc_ms(keepalive_timeout_s))
    keepalive = [
        ("grpc.keepalive_time_ms", grpc_ms(keepalive_s)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # what gRPC 1.85 really bounds the answer to a ping by (default a minute): a
        # keepalive ping rides on one in flight (a BDP probe) and, alone too, is not
        # always given the keepalive timeout
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC otherwise sends 2 pings, then 1 a minute, until it sends data or headers
        ("grpc.http2.max_pings_without_data", 0),
    ]
    return given + [(name, value) for name, value in keepalive if name not in names]


def outputs(result: pb.ChunkResult) -> dict[str, np.ndarray]:
    return {o.name: from_tensor(o.tensor) for o in result.outputs}


# Statuses after which a session may be resumed elsewhere: the server went away or is
# draining (UNAVAILABLE), the connection broke (INTERNAL, UNKNOWN), another server
# holds or advanced the session (ABORTED).
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


# Statuses of a resume refused because the session is gone (ended, or unknown there).
ENDED = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})


def deadline_exceeded(details: str) -> grpc.aio.AioRpcError:
    """The error of an answer that did not come in time, as grpc raises for a deadline."""
    return grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                grpc.aio.Metadata(), details)


def retry_after_s(exc: BaseException) -> float | None:
    """When the server said to try the call that raised ``exc`` again, in seconds (its
    ``grpc-retry-pushback-ms`` trailer); None when it did not say."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return None
    value = (exc.trailing_metadata() or grpc.aio.Metadata()).get(RETRY_PUSHBACK)
    if not isinstance(value, str) or not value.isascii() or not value.isdigit():
        return None
    return int(value) / 1000


def _resumable(exc: BaseException) -> bool:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in RESUMABLE
    return isinstance(exc, ConnectionError)


class StreamSession:
    """One session on one bidirectional stream; chunks are numbered for you.

    Requests flow through a queue that grpc consumes on its own: when the server
    ends the stream (say, while draining), the next ``send`` raises the server's
    status, not a local write error.

    ``timeout`` (the client's) bounds the wait for each answer (the open's, each
    chunk's), not the stream: a chunk not answered in time raises DEADLINE_EXCEEDED
    and ends the stream.

    With ``reconnect_s`` > 0 (see ``AsyncClient``) a stream that fails with a
    resumable status is reopened on the next target (any replica sharing the session
    store), the session resumed, and the unanswered chunk sent again: the server
    answers a chunk it already applied from its stored answer, so every chunk is
    applied exactly once and answered once. Each attempt is bounded by what is left of
    ``reconnect_s``. When the unanswered chunk was the last one (``end=True``) and the
    server had applied it, the session has ended and cannot be resumed: its answer is
    then fetched with a unary ``Step`` of the same chunk (the server keeps it).
    """

    def __init__(self, client: AsyncClient, open_req: pb.OpenSessionRequest,
                 timeout: float | None) -> None:
        self._client, self._open, self._timeout = client, open_req, timeout
        self._call: Any = None
        self._stub: pb_grpc.InferenceStub = client.stub
        self._target = 0  # the index of the target this stream is on (the first, then
        # each reconnect moves on from where it failed, not from a turn all streams share)
        self._outbox: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self.session_id = ""
        self.model = ""
        self.version = 0
        self.next_seq = 0
        self.pcm16 = False
        self.resumes = 0  # how many times the session moved to a new stream
        self._failed = False
        self._late = False  # the answer awaited did not come in time

    async def _requests(self, outbox: asyncio.Queue[pb.StreamRequest | None]
                        ) -> AsyncIterator[pb.StreamRequest]:
        while (req := await outbox.get()) is not None:
            yield req

    async def _read(self, what: str, wait: float | None) -> pb.StreamResponse:
        """The next response, within ``wait`` seconds (None: no limit). A timer that
        cancels the call bounds the wait: ``asyncio.wait_for`` would cost a task per
        chunk."""
        self._late = False
        timer = None if wait is None else \
            asyncio.get_running_loop().call_later(wait, self._expire)
        try:
            resp = await self._call.read()  # raises AioRpcError with the server's status
        except BaseException:
            # the stream is over (its status was raised once), it was late, or the
            # caller gave up on it (a cancelled send: grpc cancels the call with the read)
            self._give_up()
            if self._late:
                raise deadline_exceeded(f"no answer {what} within {wait:.3g} s") from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if resp is grpc.aio.EOF:
            self._give_up()
            if self._late:
                raise deadline_exceeded(f"no answer {what} within {wait:.3g} s")
            raise ConnectionError(f"the server ended the stream without {what}")
        if self._late:  # the timer fired as the answer came: the answer stands, but the
            self._give_up()  # call is cancelled (the next send resumes, or says so)
        return resp

    def _expire(self) -> None:
        """An answer did not come in time: the call is cancelled (``_read`` says why)."""
        self._late = True
        self._call.cancel()

    def _give_up(self) -> None:
        """The stream failed: end its request iterator (grpc's task that consumes it
        would wait on the queue forever) and its call."""
        self._failed = True
        self._outbox.put_nowait(None)
        self._call.cancel()

    async def _start(self, stub: pb_grpc.InferenceStub, req: pb.OpenSessionRequest,
                     wait: float | None) -> None:
        if self._call is not None:
            self._give_up()
        self._outbox = asyncio.Queue()
        self._failed = False
        self._stub = stub
        self._call = stub.Stream(self._requests(self._outbox),
                                 metadata=self._client.metadata(req.session_id))
        self._outbox.put_nowait(pb.StreamRequest(open=req))
        info = (await self._read("opening the session", wait)).opened
        self.session_id, self.model, self.version = info.session_id, info.model, info.version
        self.next_seq = info.next_seq

    async def __aenter__(self) -> StreamSession:
        try:
            await self._start(self._client.stub, self._open, self._timeout)
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            if not (self._client.reconnect_s and _resumable(exc)):
                raise
            await self._reconnect(exc, None, self._deadline())
        return self

    def _pick(self, not_before: dict[int, float], now: float, deadline: float
              ) -> tuple[int, float] | None:
        """The target to try next, and how long to wait for it: the first after this
        one, round the list, that did not say to wait (a retry hint: a version it is
        loading, say), else the one that said the soonest; None when every one said a
        time past ``deadline``."""
        n = len(self._client.targets)
        order = [(self._target + k) % n for k in range(1, n + 1)]
        for t in order:
            if not_before.get(t, 0.0) <= now:
                return t, 0.0
        soonest = min(order, key=lambda t: not_before[t])
        if not_before[soonest] >= deadline:
            return None
        return soonest, not_before[soonest] - now

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self._client.reconnect_s

    async def _reconnect(self, cause: BaseException, seq: int | None, deadline: float) -> None:
        """Reopen on the next targets until the session is back or ``deadline`` (loop
        time) passes; each attempt is bounded by what is left of it. ``seq`` is the
        unanswered chunk's number (None while opening)."""
        loop = asyncio.get_running_loop()
        pause, last = 0.05, cause
        not_before: dict[int, float] = {}  # target -> loop time it said to retry after
        if (hint := retry_after_s(cause)) is not None:
            not_before[self._target] = loop.time() + hint
        req = pb.OpenSessionRequest()
        req.CopyFrom(self._open)
        req.resume = req.resume or seq is not None
        while True:
            picked = self._pick(not_before, loop.time(), deadline)
            if picked is None:  # every target said to come back past the deadline
                raise last
            target, wait = picked
            if wait > 0:
                await asyncio.sleep(wait)
            if (left := deadline - loop.time()) <= 0:
                break
            try:
                self._target = target
                await self._start(self._client.stub_at(self._target), req,
                                  left if self._timeout is None else min(left, self._timeout))
            except grpc.aio.AioRpcError as exc:
                last = exc
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS and not req.resume:
                    req.resume = True  # opened before the answer was lost: resume it
                    continue
                if not (_resumable(exc) or exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise  # a target that did not answer in time: try the next one
            except ConnectionError as exc:
                last = exc
            else:
                if seq is not None and self.next_seq not in (seq, seq + 1):
                    raise ConnectionError(
                        f"session {self.session_id!r} resumed at chunk {self.next_seq}, but "
                        f"chunk {seq} was unanswered: steps were lost (the store lost data, "
                        "or a server answered them from memory while the store failed and "
                        "another server's steps stood)") from cause
                self.resumes += 1
                return
            if (hint := retry_after_s(last)) is not None:
                not_before[self._target] = loop.time() + hint
            await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))  # backing off
            pause = min(pause * 2, 0.5)
        raise last

    async def _final_answer(self, chunk: pb.Chunk, refused: grpc.aio.AioRpcError,
                            deadline: float) -> pb.ChunkResult:
        """The stored answer to the chunk that ended the session, by a unary ``Step``
        retry of it on the server that refused the resume; if there is none (the
        session ended otherwise), the refusal."""
        left = deadline - asyncio.get_running_loop().time()
        try:
            resp = await self._stub.Step(
                pb.StepRequest(session_id=self.session_id, chunk=chunk),
                timeout=self._timeout if self._timeout is not None else max(left, 1.0),
                metadata=self._client.metadata(self.session_id))
        except grpc.aio.AioRpcError as exc:
            raise refused from exc
        return resp.result

    async def send(self, data: Data, end: bool = False, timeout_ms: int = 0
                   ) -> dict[str, np.ndarray]:
        """Send one chunk and wait for its outputs (name -> array shaped (time, ...)).
        A chunk past its ``timeout_ms`` ends the stream with DEADLINE_EXCEEDED; the
        session stays as before it (resume it and send the chunk again). So does one
        not answered within the client's ``timeout``, except that the server may still
        apply it. A send on a stream that failed so resumes the session where
        ``reconnect_s`` allows, else raises ConnectionError."""
        seq = self.next_seq
        try:
            result = await self._send(seq, make_chunk(seq, data, end, pcm16=self.pcm16,
                                                      timeout_ms=timeout_ms), end)
        except BaseException:
            # a resume on the way may have said the server is past this chunk (it ran,
            # its answer was lost): the chunk is still the one to send again, under its
            # own number, and the server answers it from its stored answer; sent as the
            # next one, its data would be applied twice
            self.next_seq = seq
            raise
        self.next_seq = seq + 1
        return outputs(result)

    async def _send(self, seq: int, chunk: pb.Chunk, end: bool) -> pb.ChunkResult:
        deadline: float | None = None  # of the reconnects, from the first failure
        while True:
            try:
                if self._failed:  # its call is cancelled: a read would raise CancelledError
                    raise ConnectionError(f"session {self.session_id!r}: the stream ended "
                                          "(an earlier failure, or a timeout)")
                self._outbox.put_nowait(pb.StreamRequest(chunk=chunk))
                resp = await self._read(f"to chunk {seq}", self._timeout)
                return resp.result
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                if not (self._client.reconnect_s and _resumable(exc)):
                    raise
                if deadline is None:
                    deadline = self._deadline()
                try:
                    await self._reconnect(exc, seq, deadline)
                except grpc.aio.AioRpcError as refused:
                    if not (end and refused.code() in ENDED):
                        raise
                    return await self._final_answer(chunk, refused, deadline)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._call is None:
            return
        self._outbox.put_nowait(None)  # half-close
        if self._failed:
            return
        if et is not None:
            self._call.cancel()
            return
        try:
            while await asyncio.wait_for(self._call.read(), self._timeout) is not grpc.aio.EOF:
                pass
        except TimeoutError:
            self._call.cancel()  # every chunk sent was answered: nothing is lost
        except grpc.aio.AioRpcError as exc:
            # every chunk sent was answered (send waits for it): a server that drains or
            # a connection that breaks as the stream closes loses nothing (the session,
            # if it did not end, resumes elsewhere); anything else is still raised
            if not _resumable(exc):
                raise


def many_item(session_id: str, seq: int, data: Data, end: bool = False, *,
              pcm16: bool = False, open_model: str = "", version: int = 0,
              resume: bool = False, timeout_ms: int = 0) -> pb.ManyItem:
    """One session's chunk for ``ManyStream.send``; with ``open_model`` the item opens
    the session (``resume``: resumes it) before its chunk. ``timeout_ms``: this item alone
    fails with DEADLINE_EXCEEDED if its chunk has not run by then (session unchanged)."""
    item = pb.ManyItem()
    _fill_item(item, session_id, seq, data, end, pcm16, open_model, version, resume,
               timeout_ms)
    return item


def add_many_item(request: pb.ManyRequest, session_id: str, seq: int, data: Data,
                  end: bool = False, *, pcm16: bool = False, open_model: str = "",
                  version: int = 0, resume: bool = False, timeout_ms: int = 0
                  ) -> pb.ManyItem:
    """``many_item`` written straight into ``request`` (for ``ManyStream.send``): a
    gateway's per-chunk path, without the two copies a finished item costs on its way
    into the request (a quarter of the client's time per item, measured)."""
    item = request.items.add()
    _fill_item(item, session_id, seq, data, end, pcm16, open_model, version, resume,
               timeout_ms)
    return item


def _fill_item(item: pb.ManyItem, session_id: str, seq: int, data: Data, end: bool,
               pcm16: bool, open_model: str, version: int, resume: bool,
               timeout_ms: int) -> None:
    item.session_id = session_id
    _fill_chunk(item.chunk, seq, data, end, pcm16, timeout_ms)
    if open_model:
        o = item.open
        o.model, o.version, o.resume = open_model, version, resume


def item_status(result: pb.ManyResult) -> grpc.StatusCode:
    """The status of one item of a ``ManyStream`` answer."""
    return status_of(result.code)


class _Pipelined:
    """A stream whose requests carry ids and whose answers come back by id, as they
    complete (``StreamMany``, ``StreamPacked``): several tasks may ``_send`` at once."""

    _method = ""

    def __init__(self, client: AsyncClient, timeout: float | None) -> None:
        self._client, self._timeout = client, timeout
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._ids = 0
        self._error: BaseException | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def _requests(self) -> AsyncIterator[Any]:
        while (req := await self._outbox.get()) is not None:
            yield req

    async def _read(self) -> None:
        try:
            async for resp in self._call:
                fut = self._waiting.pop(resp.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
            self._error = ConnectionError("the server ended the stream")
        except grpc.aio.AioRpcError as exc:
            self._error = exc
        except asyncio.CancelledError:
            # the call was cancelled (the block was left by an error or a cancellation):
            # the sends waiting on it, and any later one, fail instead of waiting forever
            self._error = grpc.aio.AioRpcError(
                grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                "the stream was cancelled")
            raise
        finally:
            if self._error is None:
                self._error = ConnectionError("the stream failed")
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(self._error)
            self._waiting.clear()

    async def _open(self) -> None:
        self._call = getattr(self._client.stub, self._method)(
            self._requests(), metadata=self._client.metadata())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _send(self, request: Any) -> Any:
        """Send ``request`` (its id set here) and wait for its answer."""
        if self._error is not None:
            raise self._error
        self._ids += 1
        rid = request.id = self._ids
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self._outbox.put_nowait(request)
        try:
            return await asyncio.wait_for(fut, self._timeout)
        except TimeoutError:  # said as every other call of the client says it
            raise deadline_exceeded(f"{self._method} request {rid} not answered within "
                                    f"{self._timeout:g} s") from None
        finally:  # a late answer finds no one waiting and is dropped
            self._waiting.pop(rid, None)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Half-close, and wait for the answers still due (the server's status with
        them) for up to ``timeout``; past it, or when the block was left by an error,
        the stream is cancelled. A cancellation of the caller's own task while it waits
        is the caller's: it cancels the stream and goes on up."""
        self._outbox.put_nowait(None)  # half-close
        if et is not None:
            self._call.cancel()
        if self._reader is None:
            return
        try:
            # asyncio.wait neither raises the reader's end nor cancels it on a timeout
            done, _ = await asyncio.wait({self._reader}, timeout=self._timeout)
        except asyncio.CancelledError:
            self._call.cancel()
            raise
        if not done:  # answers still due (a send gave up on one): nothing waits on them
            self._call.cancel()
            await asyncio.wait({self._reader})


class ManyStream(_Pipelined):
    """Many sessions on one stream (``StreamMany``), as a gateway carrying many live
    streams sends them::

        async with client.many() as m:
            results = await m.send([many_item(a, 0, pcm, open_model="speech"),
                                    many_item(b, 7, pcm)])
            outputs(results[0].result) if results[0].code == 0 else item_status(results[1])

    ``send`` may be called by several tasks at once (requests in flight together are
    answered as they complete); a session's next chunk goes out after its last one's
    answer. Items fail one by one (``code``, ``message``); a failed stream (drain,
    lost connection) raises its status from every waiting and later ``send``.
    ``timeout`` bounds each ``send``, not the stream: a request not answered in time
    raises DEADLINE_EXCEEDED (its items may have run: a session's chunk sent again with
    the same seq gets the answer it had).
    """

    _method = "StreamMany"

    async def __aenter__(self) -> ManyStream:
        await self._open()
        return self

    async def send(self, items: Sequence[pb.ManyItem] | pb.ManyRequest
                   ) -> list[pb.ManyResult]:
        """Send one request and wait for its answer: one result per item, in order.
        ``items``: the items, or a request filled by ``add_many_item`` (its id is set
        here; the request is the stream's from then on)."""
        request = items if isinstance(items, pb.ManyRequest) else pb.ManyRequest(items=items)
        resp: pb.ManyResponse = await self._send(request)
        return list(resp.results)


@dataclass
class PackedAnswer:
    """The answer to a ``PackedStream.send``: each output (sessions, time, ...), row i
    session i's (zeros for a failed session), and the failed sessions' status by
    position: (code, message, retry-after milliseconds or 0)."""

    outputs: dict[str, np.ndarray]
    failures: dict[int, tuple[grpc.StatusCode, str, int]]


def packed_request(model: str, session_ids: Sequence[str], seqs: Sequence[int],
                   chunks: np.ndarray | bytes, *, version: int = 0,
                   opens: Sequence[int] = (), ends: Sequence[int] = (),
                   timeout_ms: int = 0) -> pb.PackedRequest:
    """A ``StreamPacked`` request: session ``session_ids[i]`` stepped by ``chunks[i]``
    numbered ``seqs[i]``. ``chunks``: (sessions, time, *frame) in the model's input
    dtype (int16 samples for PCM16 models, uint8 for text models), or PCM16 bytes of
    every session's chunk in turn (equal lengths). ``opens``: the positions whose
    session this request opens (with the id given, on ``model`` and ``version``);
    ``ends``: those whose chunk is their session's last; ``timeout_ms`` as for a chunk,
    for each of them."""
    req = pb.PackedRequest(model=model, version=version, timeout_ms=timeout_ms)
    req.session_ids.extend(session_ids)
    req.seqs.extend(seqs)
    if isinstance(chunks, bytes | bytearray | memoryview):
        n = len(session_ids)
        samples = np.frombuffer(chunks, dtype="<i2")
        if not n or len(samples) % n:
            raise ValueError(f"{len(samples)} PCM16 samples do not split into {n} chunks")
        chunks = samples.reshape(n, -1)
    fill_tensor(req.chunks, np.asarray(chunks))
    if opens:
        req.opens.extend(opens)
    if ends:
        req.ends.extend(ends)
    return req


def status_of(code: int) -> grpc.StatusCode:
    """The status of a numeric google.rpc code."""
    return next(c for c in grpc.StatusCode if c.value[0] == code)


class PackedStream(_Pipelined):
    """Many sessions of one model stepped together on one stream (``StreamPacked``),
    their chunks in one array, as a gateway whose streams' chunks share one length sends
    them; the server steps them as one block::

        async with client.packed() as p:
            a = await p.send(packed_request("speech", [s1, s2], [0, 0], pcm, opens=[0, 1]))
            a.outputs["logits"][1], a.failures.get(0)

    As ``ManyStream``: ``send`` may be called by several tasks at once; a session's
    next chunk goes out after its last one's answer; sessions fail one by one
    (``failures``); a request refused as a whole (malformed, too large an answer)
    raises its status, with nothing run; ``timeout`` bounds each ``send``.
    """

    _method = "StreamPacked"

    async def __aenter__(self) -> PackedStream:
        await self._open()
        return self

    async def send(self, request: pb.PackedRequest) -> PackedAnswer:
        """Send a request made by ``packed_request`` (its id is set here)."""
        resp: pb.PackedResponse = await self._send(request)
        if resp.code:
            hint = grpc.aio.Metadata(*[(RETRY_PUSHBACK, str(resp.retry_after_ms))]
                                     if resp.retry_after_ms else [])
            raise grpc.aio.AioRpcError(status_of(resp.code), grpc.aio.Metadata(), hint,
                                       resp.message)
        return PackedAnswer({o.name: from_tensor(o.tensor) for o in resp.outputs},
                            {f.index: (status_of(f.code), f.message, f.retry_after_ms)
                             for f in resp.failures})


class AsyncClient:
    """``target``: one address, or several replicas (tried in turn on reconnects).
    ``timeout``: seconds for each call, and on a stream for each answer (not for the
    whole stream). ``reconnect_s`` > 0 makes streams survive their server: they resume
    the session on a replica (sharing the session store) for up to that many seconds.
    ``keepalive_s`` > 0: HTTP/2 keepalive, a ping after that long without activity
    (also while a stream is idle), and the connection closed when no answer comes
    within ``keepalive_timeout_s``: a stream on a server that vanished fails with
    UNAVAILABLE instead of waiting, and an idle connection stays open through NATs and
    L4 balancers that drop idle flows. Keep it at or above the server's
    min_client_ping_s (rnnserve's default: 10 s), or the server closes the connection
    (GOAWAY too_many_pings). ``options`` (gRPC channel arguments) win over these."""

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = None,
                 options: list[tuple[str, Any]] | None = None,
                 reconnect_s: float = 0.0, token: str | None = None,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, keepalive_s: float = 0.0,
                 keepalive_timeout_s: float = 20.0) -> None:
        self.targets = [target] if isinstance(target, str) else list(target)
        options = _channel_options(options, keepalive_s, keepalive_timeout_s)
        creds = _credentials(root_certificates, private_key, certificate_chain)
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self._channels = [grpc.aio.secure_channel(t, creds, options=options) if creds
                          else grpc.aio.insecure_channel(t, options=options)
                          for t in self.targets]
        self._stubs = [pb_grpc.InferenceStub(c) for c in self._channels]
        self.stub = self._stubs[0]
        self.timeout = timeout
        self.reconnect_s = reconnect_s

    def metadata(self, session_id: str = "") -> tuple[tuple[str, str], ...]:
        """What every call carries: the bearer token, and the routing header."""
        return self._auth + (_routing(session_id) if session_id else ())

    @property
    def channel(self) -> grpc.aio.Channel:
        """The first target's channel (for other services on the same server)."""
        return self._channels[0]

    def stub_at(self, i: int) -> pb_grpc.InferenceStub:
        """The stub of target ``i`` (in the order given)."""
        return self._stubs[i]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    def stream(self, model: str, version: int = 0, session_id: str = "",
               resume: bool = False, *, pcm16: bool = False) -> StreamSession:
        """A streaming session; ``pcm16``: ``bytes`` chunks are PCM16 audio, not tensors."""
        req = pb.OpenSessionRequest(model=model, version=version,
                                    session_id=session_id or new_session_id(),
                                    resume=resume)
        session = StreamSession(self, req, self.timeout)
        session.pcm16 = pcm16
        return session

    def many(self) -> ManyStream:
        """A stream of many sessions' chunks (see ``ManyStream``)."""
        return ManyStream(self, self.timeout)

    def packed(self) -> PackedStream:
        """A stream of many sessions' chunks packed in one array (see ``PackedStream``)."""
        return PackedStream(self, self.timeout)

    async def _unary(self, method: str, request: Any, session_id: str = "") -> Any:
        """A unary call on the first target that is there: with several replicas, one
        that is gone or draining (UNAVAILABLE, as a stream moving off it just saw) is
        passed over for the next."""
        for i, stub in enumerate(self._stubs):
            try:
                return await getattr(stub, method)(request, timeout=self.timeout,
                                                   metadata=self.metadata(session_id))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or i == len(self._stubs) - 1:
                    raise
        raise AssertionError("unreachable")

    async def close_session(self, session_id: str) -> None:
        """End a session that will not be sent its last chunk (unary ``CloseSession``;
        with several targets, on the first that is there: a replica sharing the session
        store closes it wherever it lives)."""
        await self._unary("CloseSession", pb.CloseSessionRequest(session_id=session_id),
                          session_id)

    async def list_models(self) -> list[pb.ModelMetadata]:
        resp = await self._unary("ListModels", pb.ListModelsRequest())
        return list(resp.models)

    async def worker(self) -> tuple[int, int] | None:
        """Which of the server's worker processes (``serve --workers``) this client's
        connection reached, as (index, count), from ListModels' answer (it connects if
        not connected yet); None from a server that does not say. A client keeps its
        worker while its connection lasts."""
        call = self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                    metadata=self.metadata())
        sent = await call.initial_metadata()
        await call
        value = sent.get(WORKER_HEADER) if sent is not None else None
        if not isinstance(value, str):
            return None
        index, _, count = value.partition("/")
        try:
            return int(index), int(count)
        except ValueError:
            return None

    @classmethod
    async def open_spread(cls, target: str, connections: int, *, tries: int = 0,
                          options: list[tuple[str, Any]] | None = None, **kwargs: Any
                          ) -> list[tuple[AsyncClient, int]]:
        """``connections`` clients on connections of their own, spread evenly over the
        server's worker processes: with ``serve --workers`` the kernel hands each new
        connection to a worker by a hash of its addresses, which alone gave the busiest
        of 8 workers 1.5 to 2.3 times the mean of 48 connections. A connection that
        reached a worker already holding its share is closed and opened again, up to
        ``tries`` connections in all (default 16 per connection wanted); past that, or
        from a server that does not name its workers, connections are kept as they
        come. Returns each client with its worker's index (0 when unknown), ordered so
        that the workers take turns: client j is on worker j mod workers as far as the
        spread came out even (against one server: through an address balancing over
        several replicas their workers' indices coincide). ``kwargs``: AsyncClient's
        (timeout, token, TLS, keepalive_s, keepalive_timeout_s)."""
        tries = tries or 16 * connections
        own = [*OWN_CONNECTION, *(options or [])]
        kept: dict[int, list[AsyncClient]] = {}
        extra = 0  # workers given one more than connections // workers
        opened = 0
        try:
            while sum(map(len, kept.values())) < connections:
                client = cls(target, options=own, **kwargs)
                opened += 1
                try:
                    where = await client.worker()
                except BaseException:
                    await client.close()
                    raise
                index, count = where if where is not None else (0, 1)
                share, rest = divmod(connections, max(1, count))
                mine = len(kept.get(index, ()))
                if count <= 1 or opened > tries or mine < share or \
                        (mine == share and extra < rest):
                    extra += mine == share
                    kept.setdefault(index, []).append(client)
                else:
                    await client.close()
        except BaseException:
            for clients in kept.values():
                for c in clients:
                    await c.close()
            raise
        turns: list[tuple[AsyncClient, int]] = []
        queues = {i: list(cs) for i, cs in sorted(kept.items())}
        while queues:  # worker 0's first, worker 1's first, ..., worker 0's second, ...
            for i in list(queues):
                turns.append((queues[i].pop(0), i))
                if not queues[i]:
                    del queues[i]
        return turns

    async def model_metadata(self, model: str, version: int = 0) -> pb.ModelMetadata:
        return await self._unary("GetModelMetadata",
                                 pb.GetModelMetadataRequest(model=model, version=version))


class Client:
    """Synchronous client: unary calls for clients that cannot stream. ``keepalive_s``,
    ``keepalive_timeout_s``: as AsyncClient's."""

    def __init__(self, target: str, *, timeout: float | None = None, token: str | None = None,
                 options: list[tuple[str, Any]] | None = None,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, keepalive_s: float = 0.0,
                 keepalive_timeout_s: float = 20.0) -> None:
        options = _channel_options(options, keepalive_s, keepalive_timeout_s)
        creds = _credentials(root_certificates, private_key, certificate_chain)
        self._channel = (grpc.secure_channel(target, creds, options=options) if creds
                         else grpc.insecure_channel(target, options=options))
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb_grpc.InferenceStub(self._channel)
        self.timeout = timeout

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def open_session(self, model: str, version: int = 0, session_id: str = "",
                     resume: bool = False) -> pb.SessionInfo:
        session_id = session_id or new_session_id()
        return self.stub.OpenSession(pb.OpenSessionRequest(
            model=model, version=version, session_id=session_id, resume=resume),
            timeout=self.timeout, metadata=self._auth + _routing(session_id))

    def step(self, session_id: str, seq: int, data: Data, end: bool = False,
             pcm16: bool = False, timeout_ms: int = 0) -> dict[str, np.ndarray]:
        chunk = make_chunk(seq, data, end, pcm16=pcm16, timeout_ms=timeout_ms)
        resp = self.stub.Step(pb.StepRequest(session_id=session_id, chunk=chunk),
                              timeout=self.timeout, metadata=self._auth + _routing(session_id))
        return outputs(resp.result)

    def close_session(self, session_id: str) -> None:
        self.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id),
                               timeout=self.timeout, metadata=self._auth + _routing(session_id))

    def list_models(self) -> list[pb.ModelMetadata]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                         metadata=self._auth).models)
