"""gRPC adapter for the native API (rnnserve.v1.Inference): convert, call the core, convert."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from typing import Any, TypeVar

import grpc

from rnnserve.protos.headers import RETRY_PUSHBACK, SESSION_HEADER, WORKER_HEADER
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.protos.tensors import BY_NAME, TensorError, fill_tensor, from_tensor
from rnnserve.server.core import ChunkInput, ChunkOutput, Core, StepRequest, check_id
from rnnserve.server.errors import CoreError, InvalidChunk, ShuttingDown
from rnnserve.server.interceptor import rpc_model
from rnnserve.server.runtime import ModelRegistry, ModelRuntime
from rnnserve.server.sessions import Session

log = logging.getLogger("rnnserve.api")
T = TypeVar("T")
R = TypeVar("R")


def routed_session_id(context: grpc.aio.ServicerContext, body_id: str) -> str:
    """The session id of a call: the request's, checked against the routing header.

    Load balancers hash ``x-rnnserve-session`` to pick a pod; a call whose header
    names another session than its body would be routed by the wrong key, so it is
    refused. A new session opened without an id takes the header's.
    """
    header = next((v for k, v in context.invocation_metadata() or ()
                   if k == SESSION_HEADER), None)
    if header is None or header == body_id:
        return body_id
    if not body_id:
        return str(header)
    check_id(body_id)  # named in the refusal (the core checks the ids it is given)
    check_id(str(header))
    raise InvalidChunk(f"the {SESSION_HEADER} header names session {header!r} but the "
                       f"request names {body_id!r}; send the same id in both")


DRAINING = "the server is shutting down; resume the session on another replica"


async def abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """End a call with the status of ``exc``: a CoreError's code and message (with its
    retry hint as the ``grpc-retry-pushback-ms`` trailer), anything else INTERNAL
    without its text (logged here). A call aborted already (undecodable bytes in its
    request stream) has its status: its AbortError goes on up, as gRPC expects."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, CoreError):
        trailer = () if exc.retry_after_ms is None else (
            (RETRY_PUSHBACK, str(exc.retry_after_ms)),)
        await context.abort(grpc.StatusCode[exc.code], str(exc), trailing_metadata=trailer)
    log.exception("unexpected error")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as a perf_counter time (None without one): a step still
    queued then is dropped, and one cancelled then counts DEADLINE_EXCEEDED."""
    remaining = context.time_remaining()
    return None if remaining is None else time.perf_counter() + remaining


def chunk_input(chunk: pb.Chunk) -> ChunkInput:
    # a chunk's own timeout counts from now, when the server has read it
    expires = time.perf_counter() + chunk.timeout_ms / 1000 if chunk.timeout_ms else None
    which = chunk.WhichOneof("data")
    if which == "tensor":
        try:
            return ChunkInput(array=from_tensor(chunk.tensor), expires=expires)
        except TensorError as exc:
            return ChunkInput(invalid=str(exc))  # rejected by the core, counted per model
    if which == "text":
        return ChunkInput(text=chunk.text.encode("utf-8"), expires=expires)
    if which == "pcm16":
        return ChunkInput(pcm16=chunk.pcm16, expires=expires)
    return ChunkInput(expires=expires)


def fill_result(target: pb.ChunkResult, out: ChunkOutput) -> None:
    """Write a step's answer into the empty result of a message being built (in place:
    a finished ChunkResult would be copied once more into its parent)."""
    target.seq = out.seq
    target.end = out.end
    for name, a in out.outputs:
        fill_tensor(target.outputs.add(name=name).tensor, a)


def fill_failure(target: pb.ManyResult | pb.PackedFailure, exc: BaseException) -> None:
    """An item's failure as its status: a CoreError's code, message and retry hint,
    anything else INTERNAL without its text (logged here)."""
    if isinstance(exc, CoreError):
        target.code = grpc.StatusCode[exc.code].value[0]
        target.message = str(exc)
        target.retry_after_ms = exc.retry_after_ms or 0
        return
    log.error("unexpected error", exc_info=exc)
    target.code = grpc.StatusCode.INTERNAL.value[0]
    target.message = "internal error; see the server log"


def session_info(session: Session, runtime: ModelRuntime) -> pb.SessionInfo:
    return pb.SessionInfo(session_id=session.id, model=runtime.name, version=runtime.version,
                          next_seq=session.next_seq)


def model_metadata(runtime: ModelRuntime, registry: ModelRegistry) -> pb.ModelMetadata:
    """``runtime``'s metadata, with its model's versions in ``registry``: all of them,
    the default one and those withdrawn."""
    meta = runtime.meta
    versions = [r.version for r in registry if r.name == runtime.name]
    dyn = [-1 if isinstance(d, str) else int(d) for d in meta.input.shape[1:]]
    return pb.ModelMetadata(
        name=runtime.name, version=runtime.version, versions=versions,
        default_version=registry.get(runtime.name).version,
        withdrawn_versions=[v for v in versions if (runtime.name, v) in registry.withdrawn],
        arch=meta.arch,
        task=meta.task, input_kind=meta.input.kind,
        input=pb.TensorInfo(name=meta.input.name, dtype=BY_NAME[meta.input.dtype], shape=dyn),
        outputs=[pb.TensorInfo(name=o.name, dtype=BY_NAME[o.dtype],
                               shape=[-1 if isinstance(d, str) else int(d) for d in o.shape[1:]])
                 for o in meta.outputs],
        labels=list(meta.outputs[0].labels or ()),
        sample_rate=meta.input.sample_rate or 0, hop_samples=meta.input.hop_samples or 0,
        state_bytes_per_session=meta.state_bytes_per_session(),
        execution_provider=runtime.provider,
        properties=meta.to_props(),
    )


class StreamGate:
    """Ends the streams of every API on drain: those waiting for their next request at
    once, the others as soon as their chunk in flight is answered (UNAVAILABLE, so
    clients resume elsewhere)."""

    def __init__(self) -> None:
        self.draining = False
        self._idle: set[asyncio.Task[object]] = set()  # streams waiting for a request
        self._ended: set[asyncio.Task[object]] = set()  # ...that the drain cancelled

    def drain(self) -> None:
        self.draining = True
        for task in self._idle:
            self._ended.add(task)
            task.cancel()

    async def requests(self, request_iterator: AsyncIterator[T]) -> AsyncIterator[T]:
        """A stream's requests, until the client half-closes or the server drains
        (then ``ShuttingDown``). No future per message: the drain cancels the task
        while it waits for a request."""
        it = request_iterator.__aiter__()
        task = asyncio.current_task()
        assert task is not None
        while True:
            if self.draining:
                raise ShuttingDown(DRAINING)
            self._idle.add(task)
            try:
                req = await it.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if task not in self._ended:
                    raise  # the client went away
                self._ended.discard(task)
                task.uncancel()
                raise ShuttingDown(DRAINING) from None
            finally:
                self._idle.discard(task)
            yield req


STREAM_WINDOW = 256  # requests of one stream in flight at once; reading pauses beyond
# a ManyResult's bytes beside its outputs and its session id (twice, with SessionInfo):
# status, SessionInfo's other fields, the outputs' names, dtypes and shapes
MANY_ITEM_OVERHEAD = 320
TOO_MANY_ITEMS = ("the answers to this message's items up to this one would not fit in one "
                  "message (--max-message-bytes); send fewer items per message")


async def pipelined(gate: StreamGate, request_iterator: AsyncIterator[T],
                    answer: Callable[[T], Coroutine[Any, Any, R]],
                    context: grpc.aio.ServicerContext) -> AsyncGenerator[R, None]:
    """A stream's requests answered concurrently, each answer yielded as it completes;
    at most ``STREAM_WINDOW`` requests are in flight or answered but not yet written,
    then reading pauses. ``answer`` must not raise: it answers failures itself. When
    the requests end, the stream ends once every answer is written: OK when the client
    half-closed, UNAVAILABLE on drain or when reading broke (a read that aborted the
    call, on undecodable bytes, ends it at once with that status)."""
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[R | None] = asyncio.Queue()
    window = asyncio.Semaphore(STREAM_WINDOW)
    pending: set[asyncio.Task[R]] = set()
    ended: list[Exception] = []
    broken: list[BaseException] = []  # an answer that raised (it must not)

    def finished(task: asyncio.Task[R]) -> None:
        pending.discard(task)
        if task.cancelled():
            window.release()
        elif (failed := task.exception()) is not None:  # a bug: end the stream rather
            broken.append(failed)  # than leave the request unanswered
            answers.put_nowait(None)
        else:  # its slot frees once the answer is written, so a client that does
            answers.put_nowait(task.result())  # not read holds at most the window

    async def read() -> None:
        try:
            async for req in gate.requests(request_iterator):
                await window.acquire()
                task = loop.create_task(answer(req))
                pending.add(task)
                task.add_done_callback(finished)
        except ShuttingDown as exc:
            ended.append(exc)
        except Exception as exc:  # a broken read; the stream ends once answered
            log.debug("stream read ended: %r", exc)
            ended.append(exc)
        finally:
            answers.put_nowait(None)

    reader = loop.create_task(read())
    reading = True
    try:
        while reading or pending or not answers.empty():
            out = await answers.get()
            if ended and isinstance(ended[0], grpc.aio.AbortError):
                raise ended[0]  # the call has its status; nothing more is written
            if broken:
                log.error("a stream's answer failed", exc_info=broken[0])
                await context.abort(grpc.StatusCode.INTERNAL,
                                    "internal error; see the server log")
            if out is None:
                reading = False
                continue
            try:
                yield out
            finally:
                window.release()
        if ended:
            exc = ended[0]
            if isinstance(exc, CoreError):
                await context.abort(grpc.StatusCode[exc.code], str(exc))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the request stream broke")
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, core: Core, gate: StreamGate, worker: tuple[int, int] = (0, 1)
                 ) -> None:
        self.core = core
        self.gate = gate
        # the kernel's SO_REUSEPORT hash alone gave the busiest of 8 workers 1.5 to 2.3
        # times the mean of 48 connections: clients that balance need to know (headers.py)
        self._worker = ((WORKER_HEADER, f"{worker[0]}/{worker[1]}"),)
        # what one message may carry of a StreamMany request's answers (0: no limit)
        self.max_answer_bytes = max((r.options.max_answer_bytes for r in core.registry),
                                    default=0)
        # the largest answer any model gives a chunk of so many steps (forgotten when a
        # version is added while serving; lengths other than the few a client sends age
        # out)
        self._largest_answer = functools.lru_cache(maxsize=256)(
            lambda steps: max((r.answer_bytes(steps) for r in core.registry), default=0))
        core.on_model_added.append(lambda _: self._largest_answer.cache_clear())

    async def _fail(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        await abort(context, exc)

    async def Stream(self, request_iterator: AsyncIterator[pb.StreamRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        session_id = None
        expires = deadline(context)
        try:
            async for req in self.gate.requests(request_iterator):
                kind = req.WhichOneof("kind")
                if session_id is None:
                    if kind != "open":
                        raise InvalidChunk("the first message of a stream must open a session")
                    o = req.open
                    sid = routed_session_id(context, o.session_id)
                    session, runtime = await self.core.open(o.model, o.version, sid, o.resume)
                    session_id = session.id
                    rpc_model(runtime.name, runtime.version)
                    yield pb.StreamResponse(opened=session_info(session, runtime))
                elif kind == "chunk":
                    out = await self.core.step(session_id, req.chunk.seq,
                                               chunk_input(req.chunk), req.chunk.end,
                                               expires=expires)
                    resp = pb.StreamResponse()
                    fill_result(resp.result, out)
                    yield resp
                else:
                    raise InvalidChunk("a session is open on this stream; send chunks")
        except Exception as exc:
            await self._fail(context, exc)

    async def StreamMany(self, request_iterator: AsyncIterator[pb.ManyRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ManyResponse]:
        expires = deadline(context)
        answers = pipelined(self.gate, request_iterator,
                            lambda req: self._many(req, expires), context)
        async with aclosing(answers):
            async for answer in answers:
                yield answer

    async def _many(self, req: pb.ManyRequest, expires: float | None) -> pb.ManyResponse:
        """A request's items at once (they batch together), answered in their order.
        Plain chunks go to the core together (no task per item); items that open or
        resume a session run as tasks beside them. The answer is one message: the items
        from the first whose answer would not fit in it any more are refused before
        anything runs (gRPC could not send it, with every step in it applied)."""
        resp = pb.ManyResponse(id=req.id)
        steps: list[StepRequest] = []
        targets: list[pb.ManyResult] = []
        opening = []
        room = self.max_answer_bytes or None
        taken: list[tuple[pb.ManyItem, str, ChunkInput | None, pb.ManyResult]] = []
        bound = 0  # the answer's size if each item got the largest answer of any model
        for item in req.items:
            sid = item.session_id  # each read of a string field makes a new str
            target = resp.results.add(session_id=sid)
            try:  # whatever an item's decoding raises fails that item alone
                chunk = chunk_input(item.chunk) if item.HasField("chunk") else None
            except Exception as exc:
                fill_failure(target, exc)
                continue
            if room is not None:
                bound += MANY_ITEM_OVERHEAD + 2 * len(sid) + (
                    0 if chunk is None else self._largest_answer(chunk.steps))
            taken.append((item, sid, chunk, target))
        if room is not None and bound > room:  # it may not fit: each item's own answer
            fits = []  # counted, in order (what almost every request is spared)
            for item, sid, chunk, target in taken:
                try:
                    room -= self._answer_bytes(item, chunk, room)
                except Exception as exc:
                    fill_failure(target, exc)
                    continue
                fits.append((item, sid, chunk, target))
            taken = fits
        for item, sid, chunk, target in taken:
            if item.HasField("open") or chunk is None:
                opening.append(self._item(item, chunk, target, expires))
                continue
            c = item.chunk
            steps.append((sid, c.seq, chunk, c.end))
            targets.append(target)
        if opening:
            outcomes, *_ = await asyncio.gather(self.core.step_many(steps, expires=expires),
                                                *opening)
        else:
            outcomes = await self.core.step_many(steps, expires=expires)
        for target, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, ChunkOutput):
                fill_result(target.result, outcome)
            else:
                fill_failure(target, outcome)
        return resp

    async def StreamPacked(self, request_iterator: AsyncIterator[pb.PackedRequest],
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.PackedResponse]:
        expires = deadline(context)
        answers = pipelined(self.gate, request_iterator,
                            lambda req: self._packed(req, expires), context)
        async with aclosing(answers):
            async for answer in answers:
                yield answer

    async def _packed(self, req: pb.PackedRequest, expires: float | None
                      ) -> pb.PackedResponse:
        """A packed request: its sessions stepped as one block where they can be
        (``Core.step_packed``); a request refused whole gets its status in the answer,
        and the stream goes on."""
        resp = pb.PackedResponse(id=req.id)
        try:
            sids = list(req.session_ids)
            for sid in sids:
                check_id(sid)
            try:
                x = from_tensor(req.chunks)
            except TensorError as exc:
                raise InvalidChunk(str(exc)) from None
            runtime = await self.core.runtime(req.model, req.version)
            rpc_model(runtime.name, runtime.version)  # the stream's: its last request's
            if self.max_answer_bytes and x.ndim >= 2:
                size = len(sids) * runtime.answer_bytes(x.shape[1])
                if size > self.max_answer_bytes:
                    raise InvalidChunk(
                        f"the answers to {len(sids)} sessions' chunks of {x.shape[1]} steps "
                        f"take {size} bytes, more than a message may carry "
                        f"({self.max_answer_bytes} bytes of outputs, --max-message-bytes); "
                        "send fewer sessions per message")
            outputs, failures = await self.core.step_packed(
                req.model, req.version, sids, req.seqs, x, req.opens, req.ends,
                timeout_s=req.timeout_ms / 1000, expires=expires)
        except CoreError as exc:
            resp.code = grpc.StatusCode[exc.code].value[0]
            resp.message = str(exc)
            resp.retry_after_ms = exc.retry_after_ms or 0
            return resp
        for i in sorted(failures):
            fill_failure(resp.failures.add(index=i), failures[i])
        for name, a in outputs:
            fill_tensor(resp.outputs.add(name=name).tensor, a)
        return resp

    def _answer_bytes(self, item: pb.ManyItem, chunk: ChunkInput | None, room: int) -> int:
        """The bytes of an item's result; InvalidChunk when more than ``room``. A chunk
        for a session not held here (in the shared store) counts as the largest answer
        any model would give it."""
        o = item.open
        runtime = self.core.runtime_for(item.session_id, "" if o.resume else o.model,
                                        o.version)
        size = MANY_ITEM_OVERHEAD + 2 * len(item.session_id)
        if chunk is not None:
            size += max(r.answer_bytes(chunk.steps)
                        for r in ([runtime] if runtime is not None else self.core.registry))
        if size > room:
            refused = InvalidChunk(TOO_MANY_ITEMS)
            if runtime is not None and chunk is not None:
                self.core.rejected(runtime, refused, "native")
            raise refused
        return size

    async def _item(self, item: pb.ManyItem, chunk: ChunkInput | None,
                    out: pb.ManyResult, expires: float | None) -> None:
        """An item that opens (or resumes) its session, then steps it if it has a chunk.
        An item that fails changes nothing: a session it created is closed again (also
        when the stream goes away meanwhile)."""
        created = None
        try:
            if item.HasField("open"):
                o = item.open
                session, runtime = await self.core.open(o.model, o.version, item.session_id,
                                                        o.resume)
                created = None if o.resume else session
                out.session_id = session.id
                out.opened.CopyFrom(session_info(session, runtime))
            elif chunk is None:
                raise InvalidChunk("an item opens a session, carries a chunk, or both; "
                                   "this one does neither")
            if chunk is not None:
                c = item.chunk
                result = await self.core.step(out.session_id, c.seq, chunk, c.end,
                                              expires=expires)
                fill_result(out.result, result)
        except BaseException as exc:
            if created is not None:
                out.session_id = item.session_id
                out.ClearField("opened")
                await self.core.undo_open(created)
            if not isinstance(exc, Exception):
                raise
            fill_failure(out, exc)

    async def OpenSession(self, request: pb.OpenSessionRequest,
                          context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        try:
            sid = routed_session_id(context, request.session_id)
            session, runtime = await self.core.open(request.model, request.version, sid,
                                              request.resume)
            rpc_model(runtime.name, runtime.version)
            return session_info(session, runtime)
        except Exception as exc:
            await self._fail(context, exc)
            raise

    async def Step(self, request: pb.StepRequest,
                   context: grpc.aio.ServicerContext) -> pb.StepResponse:
        rpc_model(*self.core.model_of(request.session_id))
        try:
            routed_session_id(context, request.session_id)
            out = await self.core.step(request.session_id, request.chunk.seq,
                                       chunk_input(request.chunk), request.chunk.end,
                                       expires=deadline(context))
            resp = pb.StepResponse()
            fill_result(resp.result, out)
            return resp
        except Exception as exc:
            await self._fail(context, exc)
            raise

    async def CloseSession(self, request: pb.CloseSessionRequest,
                           context: grpc.aio.ServicerContext) -> pb.CloseSessionResponse:
        rpc_model(*self.core.model_of(request.session_id))
        try:
            routed_session_id(context, request.session_id)
            await self.core.close(request.session_id)
            return pb.CloseSessionResponse()
        except Exception as exc:
            await self._fail(context, exc)
            raise

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        await context.send_initial_metadata(self._worker)
        registry = self.core.registry
        return pb.ListModelsResponse(models=[model_metadata(r, registry) for r in registry])

    async def GetModelMetadata(self, request: pb.GetModelMetadataRequest,
                               context: grpc.aio.ServicerContext) -> pb.ModelMetadata:
        try:
            runtime = await self.core.runtime(request.model, request.version)
            rpc_model(runtime.name, runtime.version)
            return model_metadata(runtime, self.core.registry)
        except Exception as exc:
            await self._fail(context, exc)
            raise
