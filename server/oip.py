"""gRPC adapter for the Open Inference Protocol (KServe v2) with Triton's extensions.

Requests become calls on the same ``Core`` as the native API, so both protocols
share the session store and the batchers (their steps batch together).

Sequences (Triton's sequence extension): request parameters ``sequence_id`` (a
non-zero integer or a non-empty string), ``sequence_start`` and ``sequence_end``.
As in Triton, sequence ids are scoped per model: sequence 7 of model ``speech`` is
the session ``speech/7`` (the native API sees it under that id; the string id "7" is
another sequence, ``speech/~7``: ``sequence_key``); with authentication they are
scoped per principal too (``speech/7@alice``). A start creates the
session, or restarts it when the id is still live, here or in the shared store (the
old state is dropped, as Triton ends a sequence that did not end before its id
started again); a start whose step fails closes it again; an end closes it after
answering; a continuation runs on its sequence's version; a request without an id
runs from a zero state and keeps nothing. Requests of one sequence run in arrival
order, from any number of streams and calls; different sequences on one stream run
concurrently and batch together.
With a shared session store, a sequence this server does not hold, or holds an
outdated copy of, is taken from the store on its next request, so sequences survive
their server.

Errors: ``ModelInfer`` ends with the status code of the core's error (see
``server/errors.py``); ``ModelStreamInfer`` answers a failed request with
``error_message`` (and the request's id in ``infer_response``) and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import grpc
import numpy as np

import rnnserve
from rnnserve.protos.headers import SESSION_HEADER
from rnnserve.protos.inference import grpc_service_pb2 as pb
from rnnserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from rnnserve.protos.oip import (
    BYTES,
    DATATYPES,
    datatype_of,
    decode_input,
    encode_output,
    parameter_value,
)
from rnnserve.protos.tensors import TensorError
from rnnserve.server.api import StreamGate, abort, pipelined
from rnnserve.server.core import GONE, ChunkInput, Core, check_id, check_owner
from rnnserve.server.errors import (
    CoreError,
    InvalidChunk,
    SessionExists,
)
from rnnserve.server.identity import principal, scoped
from rnnserve.server.interceptor import rpc_model
from rnnserve.server.runtime import ANSWER_OVERHEAD, ModelRuntime
from rnnserve.server.sessions import Session

log = logging.getLogger("rnnserve.oip")

API = "kserve_v2"  # the api label of metrics
PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX models
EXTENSIONS = ["sequence", "classification"]


@dataclass(frozen=True)
class SequenceParams:
    label: str  # the id as the client sent it ("" when none)
    start: bool
    end: bool
    key: str = ""  # the id within the model's session ids (sequence_key)
    shown: str = ""  # the id in messages: 42, or '42' for the string

def sequence_key(value: int | str) -> str:
    """A sequence id as part of a session id, one for each id: an integer as its
    digits, a string as itself, except that a string of ASCII digits, or one that
    starts with "~", gets a "~" in front, so that the string "42" is not sequence 42
    (Triton tells the two kinds of id apart too)."""
    if isinstance(value, int):
        return str(value)
    if value.startswith("~") or (value.isascii() and value.isdigit()):
        return "~" + value
    return value


def sequence_params(req: pb.ModelInferRequest) -> SequenceParams:
    params = req.parameters
    label = key = shown = ""
    if "sequence_id" in params:
        value = parameter_value(params["sequence_id"])
        if isinstance(value, bool) or isinstance(value, float):
            raise InvalidChunk("parameter sequence_id must be an integer or a string")
        if isinstance(value, int) and value < 0:
            # an unsigned id sent as int64_param (Triton's clients keep the id as a
            # uint64 and send it so; Triton reads it back as one): the same sequence
            value += 1 << 64
        if value not in (None, 0, ""):
            label, key = str(value), sequence_key(value)
            shown = repr(value) if isinstance(value, str) else label
    flags = []
    for name in ("sequence_start", "sequence_end"):
        value = parameter_value(params[name]) if name in params else False
        if not isinstance(value, bool):
            raise InvalidChunk(f"parameter {name} must be a bool, got {value!r}")
        flags.append(value)
    if not label and any(flags):
        raise InvalidChunk("sequence_start and sequence_end need a non-zero sequence_id")
    return SequenceParams(label, flags[0], flags[1], key, shown)


def version_number(version: str) -> int:
    """A request's model version: "" for the highest, else a positive integer in ASCII
    digits (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    if not version:
        return 0
    if not (version.isascii() and version.isdigit()) or len(version) > 18 or \
            int(version) < 1:
        raise InvalidChunk(f"model version {version!r} is not a positive integer (of at "
                           "most 18 digits)")
    return int(version)


def _bool_param(params: Mapping[str, pb.InferParameter], key: str) -> bool | None:
    if key not in params:
        return None
    value = parameter_value(params[key])
    if not isinstance(value, bool):
        raise InvalidChunk(f"parameter {key} must be a bool, got {value!r}")
    return value


@dataclass(frozen=True)
class OutputRequest:
    name: str
    typed: bool
    classes: int  # > 0: Triton's classification extension, the top-k classes


def requested_outputs(req: pb.ModelInferRequest, runtime: ModelRuntime) -> list[OutputRequest]:
    """Which outputs to answer, in which encoding.

    Raw (``raw_output_contents``) unless the request asks for typed contents: the
    output's ``binary_data`` parameter, else the request's ``binary_data_output``
    (the names of Triton's binary data extension), else the form of the request's
    own inputs (typed in, typed out).
    """
    names = runtime.data_output_names
    default = _bool_param(req.parameters, "binary_data_output")
    typed_default = (not default) if default is not None else not req.raw_input_contents
    if not req.outputs:
        return [OutputRequest(n, typed_default, 0) for n in names]
    wanted = []
    for o in req.outputs:
        if o.name not in names:
            raise InvalidChunk(f"model {runtime.name!r} has no output {o.name!r}; "
                               f"its outputs are {names}")
        binary = _bool_param(o.parameters, "binary_data")
        classes = 0
        if "classification" in o.parameters:
            value = parameter_value(o.parameters["classification"])
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidChunk(f"output {o.name!r}: parameter classification must be a "
                                   f"positive integer, got {value!r}")
            classes = value
        wanted.append(OutputRequest(o.name, typed_default if binary is None else not binary,
                                    classes))
    if len({w.name for w in wanted}) != len(wanted):
        raise InvalidChunk("an output is requested more than once")
    return wanted


def classify(a: np.ndarray, k: int, labels: tuple[str, ...] | None) -> np.ndarray:
    """Triton's classification extension: the k highest scores along the last axis,
    each as b"score:index" or b"score:index:label", highest first."""
    k = min(k, a.shape[-1])
    top = np.argsort(-a, axis=-1, kind="stable")[..., :k]
    scores = np.take_along_axis(a, top, axis=-1)
    out = np.empty(top.shape, dtype=object)
    for pos in np.ndindex(top.shape):
        i = int(top[pos])
        text = f"{float(scores[pos]):f}:{i}" + (f":{labels[i]}" if labels else "")
        out[pos] = text.encode()
    return out


def input_rows(req: pb.ModelInferRequest, runtime: ModelRuntime, max_rows: int | None,
               outputs: list[OutputRequest]) -> list[ChunkInput]:
    """The request's one input, split into one chunk per batch row.

    Shapes are [batch, time, *frame]; a byte-level text model also takes BYTES of
    shape [batch] or [batch, 1], one byte string per row. ``max_rows`` is the most rows
    a stateless request may have (None: a request of a sequence, one row). The rows
    are counted and refused before any is split off: a request without data ([N, 0,
    20]) would else cost N chunks' work; so are rows whose ``outputs``, encoded as
    requested, would not fit one answer (``_check_answer``).
    """
    meta = runtime.meta.input
    frame = [int(d) for d in meta.shape[2:]]
    want_type = datatype_of(np.dtype(meta.dtype))
    want = f"[batch, time{''.join(f', {d}' for d in frame)}] of {want_type}"
    if meta.kind == "utf8_bytes":
        want += " (or BYTES of shape [batch], one string per row)"
    if len(req.inputs) != 1 or req.inputs[0].name != meta.name:
        got = [i.name for i in req.inputs]
        raise InvalidChunk(f"model {runtime.name!r} takes one input {meta.name!r} shaped "
                           f"{want}; the request has inputs {got}")
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidChunk(f"raw_input_contents has {len(req.raw_input_contents)} entries for "
                           f"{len(req.inputs)} inputs; send one per input or none")
    t = req.inputs[0]
    raw = req.raw_input_contents[0] if req.raw_input_contents else None
    try:
        x = decode_input(t, raw)
    except TensorError as exc:
        raise InvalidChunk(str(exc)) from None
    if t.datatype == BYTES and meta.kind == "utf8_bytes":
        if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[1] != 1):
            raise InvalidChunk(f"model {runtime.name!r}: BYTES input must be shaped [batch] "
                               f"or [batch, 1], got {list(x.shape)}")
        _check_rows(runtime, x.shape[0], max_rows)
        lengths = {len(b) for b in x.reshape(-1)}
        if 0 in lengths:
            raise InvalidChunk("a BYTES string of the input is empty; send at least one byte "
                               "per row")
        if len(lengths) > 1:
            raise InvalidChunk("the strings of one request must have the same length in "
                               "bytes (their outputs form one tensor); send them apart")
        _check_answer(runtime, outputs, x.shape[0], lengths.pop())
        return [ChunkInput(array=np.frombuffer(b, dtype=np.uint8)) for b in x.reshape(-1)]
    if t.datatype != want_type or x.ndim != 2 + len(frame) or list(x.shape[2:]) != frame:
        raise InvalidChunk(f"model {runtime.name!r} input {meta.name!r} takes {want}; got "
                           f"{t.datatype} {list(x.shape)}")
    _check_rows(runtime, x.shape[0], max_rows)
    if x.shape[1] < 1:
        raise InvalidChunk("the input's time dimension is 0; send at least one time step")
    _check_answer(runtime, outputs, x.shape[0], x.shape[1])
    return [ChunkInput(array=row) for row in x]


def _check_rows(runtime: ModelRuntime, rows: int, max_rows: int | None) -> None:
    if rows < 1:
        raise InvalidChunk("the input's batch dimension is 0; send at least one row")
    if max_rows is None:
        if rows != 1:
            raise InvalidChunk(f"model {runtime.name!r}: a request of a sequence must have "
                               f"batch size 1 (one sequence per request), got {rows}")
    elif rows > max_rows:
        raise InvalidChunk(f"model {runtime.name!r}: a request of {rows} rows can never run: "
                           f"its rows queue as steps, and the model queues at most "
                           f"{max_rows} (--max-queue); send at most {max_rows} rows per "
                           "request")


# The bytes one element of an answer may take, past its raw size: typed integers are
# varints (a negative one takes 10 bytes, whatever its width), and a classification
# entry (Triton's "score:index[:label]") is counted at the widest its score may print
# (``%f`` of the dtype's lowest value) plus its 4-byte length.
def _typed_bytes(dtype: np.dtype) -> int:
    return 10 if dtype.kind in "iu" else dtype.itemsize


def _score_chars(dtype: np.dtype) -> int:
    info = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype) if dtype.kind in "iu" \
        else None
    ends = (0, 1) if info is None else (info.min, info.max)  # uint8's widest is its max
    return max(len(f"{float(v):f}") for v in ends)


def answer_bytes(runtime: ModelRuntime, outputs: list[OutputRequest], steps: int) -> int:
    """The most bytes one row's requested outputs take in an answer to a chunk of
    ``steps`` input steps, in the encoding they will be sent in (``_response``).
    Asked for every request: worked out once per model, outputs asked and length."""
    return _answer_bytes(runtime, tuple(outputs), steps)


@functools.lru_cache(maxsize=4096)
def _answer_bytes(runtime: ModelRuntime, outputs: tuple[OutputRequest, ...], steps: int
                  ) -> int:
    meta = {o.name: o for o in runtime.meta.outputs}
    shapes = dict(zip(runtime.data_output_names, runtime.output_row_shapes(steps),
                      strict=True))
    typed = all(o.typed for o in outputs) and all(
        o.classes or DATATYPES[datatype_of(shapes[o.name][1])][1] is not None
        for o in outputs)
    total = 0
    for o in outputs:
        shape, dtype = shapes[o.name]
        n = int(np.prod(shape, dtype=np.int64))
        if o.classes:
            classes = shape[-1] if shape else 1
            labels = meta[o.name].labels
            entry = 4 + _score_chars(dtype) + 1 + len(str(max(classes - 1, 0))) + (
                1 + max(len(x.encode()) for x in labels) if labels else 0)
            total += (n // max(classes, 1)) * min(o.classes, classes) * entry
        else:
            total += n * (_typed_bytes(dtype) if typed else dtype.itemsize)
    return total


def _check_answer(runtime: ModelRuntime, outputs: list[OutputRequest], rows: int,
                  steps: int) -> None:
    """A request is answered in one message holding every row's outputs, as requested
    (classified, typed or raw): one that could not be sent is refused before any row
    runs, and before a sequence moves on."""
    limit = runtime.options.max_answer_bytes
    if not limit:
        return
    one = answer_bytes(runtime, outputs, steps)
    carry = f"more than a message may carry ({limit + ANSWER_OVERHEAD} bytes, " \
        "--max-message-bytes)"
    if one > limit:
        hop = runtime.meta.input.hop_samples or 1
        fixed, per = answer_bytes(runtime, outputs, 0), answer_bytes(runtime, outputs, hop)
        fit = max(0, (limit - fixed) // max(per - fixed, 1)) * hop
        raise InvalidChunk(f"model {runtime.name!r}: a chunk of {steps} steps would be "
                           f"answered with up to {one} bytes of the outputs requested, "
                           f"{carry}; send chunks of at most {fit} steps, or ask for fewer "
                           "outputs or classes")
    if rows * one > limit:
        raise InvalidChunk(f"model {runtime.name!r}: {rows} rows of {steps} steps would be "
                           f"answered with up to {rows * one} bytes of outputs in one "
                           f"message, {carry}; send at most {limit // one} such rows per "
                           "request")


def expiry(req: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> float | None:
    """When the request must have run by (a perf_counter time): the call's gRPC deadline
    or Triton's ``timeout`` parameter (microseconds), whichever comes first."""
    limits = []
    remaining = context.time_remaining()
    if remaining is not None:
        limits.append(remaining)
    if "timeout" in req.parameters:
        value = parameter_value(req.parameters["timeout"])
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidChunk(f"parameter timeout must be a non-negative integer of "
                               f"microseconds, got {value!r}")
        if value:
            limits.append(value / 1e6)
    return time.perf_counter() + min(limits) if limits else None


def sequence_session(model: str, key: str) -> str:
    """The session id of the sequence of ``model`` whose id is ``key``
    (``sequence_key``) for the calling principal: ``model/key`` without
    authentication, ``model/key@principal`` with it (the
    principal's ``%`` and ``@`` escaped as ``%25`` and ``%40``, so that no two
    principals' ids meet). Each principal has ids of its own: two tenants may both run
    sequence 1, as Triton clients that number their sequences from 1 do."""
    who = principal()
    return scoped(f"{model}/{key}", who) if who else f"{model}/{key}"


def routing_check(context: grpc.aio.ServicerContext, seq: SequenceParams) -> None:
    """A call routed by ``x-rnnserve-session`` must carry that sequence id (the header
    holds it as text: 42 and "42" route alike)."""
    header = next((v for k, v in context.invocation_metadata() or ()
                   if k == SESSION_HEADER), None)
    if header is not None and seq.label and header != seq.label:
        check_id(str(header))  # named in the refusal
        check_id(seq.label)
        raise InvalidChunk(f"the {SESSION_HEADER} header names sequence {header!r} but the "
                           f"request names {seq.shown}; send the same id in both")


class _Turn:
    """Arrival order for the requests of one sequence (asyncio locks are FIFO)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: Core, gate: StreamGate,
                 ready: Callable[[], bool] | None = None) -> None:
        """``ready``: what ServerReady and ModelReady say of a loaded model (default:
        while the core accepts work; a held worker of ``serve --workers`` is not ready
        until all its siblings serve, as its gRPC health says)."""
        self.core = core
        self.gate = gate
        self._ready = ready or (lambda: core.accepting)
        self._turns: dict[str, _Turn] = {}

    @contextlib.asynccontextmanager
    async def _in_turn(self, session_id: str) -> AsyncIterator[None]:
        turn = self._turns.get(session_id)
        if turn is None:
            turn = self._turns[session_id] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[session_id]

    # -- health and metadata --------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            runtime = self.core.registry.get(request.name, version_number(request.version))
        except CoreError as exc:
            if isinstance(exc, InvalidChunk):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return pb.ModelReadyResponse(ready=False)  # an unknown model is not ready
        rpc_model(runtime.name, runtime.version)
        return pb.ModelReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="rnnserve", version=rnnserve.__version__,
                                         extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        try:
            runtime = await self.core.runtime(request.name, version_number(request.version))
        except CoreError as exc:
            await abort(context, exc)
        rpc_model(runtime.name, runtime.version)
        versions = [str(r.version) for r in self.core.registry if r.name == runtime.name]
        meta = runtime.meta

        def dims(shape: tuple[int | str, ...]) -> list[int]:
            return [-1 if isinstance(d, str) else int(d) for d in shape]

        Tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=runtime.name, versions=versions, platform=PLATFORM,
            inputs=[Tensor(name=meta.input.name, datatype=datatype_of(np.dtype(meta.input.dtype)),
                           shape=dims(meta.input.shape))],
            outputs=[Tensor(name=o.name, datatype=datatype_of(np.dtype(o.dtype)),
                            shape=dims(o.shape)) for o in meta.outputs])

    # -- inference ------------------------------------------------------------------

    async def _infer(self, req: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                     ) -> pb.ModelInferResponse:
        runtime = await self.core.runtime(req.model_name, version_number(req.model_version))
        rpc_model(runtime.name, runtime.version)
        try:
            seq = sequence_params(req)
            routing_check(context, seq)
            expires = expiry(req, context)
            if not seq.label:
                outputs = requested_outputs(req, runtime)
                rows = input_rows(req, runtime, self._max_rows(runtime), outputs)
        except CoreError as exc:
            self.core.rejected(runtime, exc, API)
            raise
        if seq.label:
            return await self._sequence_step(req, runtime, seq, expires)
        results = await self.core.infer(runtime, rows, api=API, expires=expires)
        named = {name: np.stack([r[j] for r in results])
                 for j, name in enumerate(runtime.data_output_names)}
        return self._response(req, runtime, outputs, named)

    def _max_rows(self, runtime: ModelRuntime) -> int:
        """The most steps the model's batcher queues (--max-queue): a stateless request
        of more rows could never run."""
        return self.core.batchers[runtime.key].max_queue

    def _parse(self, req: pb.ModelInferRequest, runtime: ModelRuntime
               ) -> tuple[list[OutputRequest], ChunkInput]:
        """A sequence request's outputs and chunk, checked against the version its
        sequence runs on."""
        try:
            outputs = requested_outputs(req, runtime)
            (chunk,) = input_rows(req, runtime, None, outputs)
        except CoreError as exc:
            self.core.rejected(runtime, exc, API)
            raise
        return outputs, chunk

    async def _sequence_step(self, req: pb.ModelInferRequest, runtime: ModelRuntime,
                             seq: SequenceParams, expires: float | None
                             ) -> pb.ModelInferResponse:
        sid = sequence_session(runtime.name, seq.key)
        async with self._in_turn(sid):
            if seq.start:
                outputs, chunk = self._parse(req, runtime)
                self.core.check(runtime, chunk, API)  # bad input never ends a live sequence
                session = await self._open(runtime, seq, sid)
                try:
                    out = await self.core.step(sid, session.next_seq, chunk, seq.end, api=API,
                                               expires=expires)
                except BaseException as exc:
                    await self.core.undo_open(session)
                    if isinstance(exc, CoreError):
                        exc.args = (f"{exc}; sequence {seq.shown} was not started: send its "
                                    "first request again with the START flag",)
                    raise
            else:
                session, runtime = await self._live(runtime, seq, sid, req.model_version)
                rpc_model(runtime.name, runtime.version)
                outputs, chunk = self._parse(req, runtime)
                # the next chunk, wherever the last ran (a copy here may be behind the store)
                out = await self.core.step(sid, None, chunk, seq.end, api=API, expires=expires)
        named = {name: a[None] for name, a in out.outputs}
        return self._response(req, runtime, outputs, named)

    async def _open(self, runtime: ModelRuntime, seq: SequenceParams, sid: str) -> Session:
        """A start: the sequence opened from a zero state, after the live one of that id
        (here, or with a shared store anywhere) is closed. A drain refuses before
        anything is closed."""
        try:
            session, _ = await self.core.open(runtime.name, runtime.version, sid)
        except SessionExists:
            log.warning("sequence %s of model %r started again before it ended; the "
                        "previous one is dropped", seq.shown, runtime.name)
            await self.core.close(sid)
            try:
                session, _ = await self.core.open(runtime.name, runtime.version, sid)
            except CoreError as exc:
                exc.args = (f"{exc}; the previous sequence {seq.shown} has ended and this one "
                            "was not started: send its first request again with the START "
                            "flag",)
                raise
        return session

    async def _live(self, runtime: ModelRuntime, seq: SequenceParams, sid: str,
                    version: str) -> tuple[Session, ModelRuntime]:
        """A continued sequence and the version it runs on (taken from the shared store
        when this server does not hold it)."""
        asked = runtime
        try:
            if self.core.shared is not None and self.core.store.peek(sid) is None:
                # started on another replica: continue from the shared store
                session, runtime = await self.core.open(asked.name, 0, sid, resume=True)
            else:
                session = self.core.store.get(sid)
                check_owner(session)  # before anything of it is told (its version)
                runtime = self.core.registry.get(session.model, session.version)
            if session.model != asked.name or (version and session.version != asked.version):
                raise InvalidChunk(f"sequence {seq.shown} runs on version {session.version} "
                                   f"of model {session.model!r}, not {asked.version} of "
                                   f"{asked.name!r}")
        except GONE as exc:
            refused = InvalidChunk(
                f"inference request for sequence {seq.shown} to model "
                f"'{asked.name}' must specify the START flag on the first request "
                f"of the sequence ({exc})")
            self.core.rejected(asked, refused, API)
            raise refused from None
        except InvalidChunk as exc:
            self.core.rejected(asked, exc, API)
            raise
        return session, runtime

    def _response(self, req: pb.ModelInferRequest, runtime: ModelRuntime,
                  outputs: list[OutputRequest], named: dict[str, np.ndarray]
                  ) -> pb.ModelInferResponse:
        """Outputs all typed or all raw: the protocol pairs raw entries with outputs by
        position, so one output asking for raw (or an FP16 output, which has no typed
        field) makes every output raw."""
        labels = {o.name: o.labels for o in runtime.meta.outputs}
        arrays = [classify(named[o.name], o.classes, labels[o.name]) if o.classes
                  else named[o.name] for o in outputs]
        typed = all(o.typed for o in outputs) and all(
            a.dtype == object or DATATYPES[datatype_of(a.dtype)][1] is not None for a in arrays)
        resp = pb.ModelInferResponse(model_name=runtime.name, model_version=str(runtime.version),
                                     id=req.id)
        for o, a in zip(outputs, arrays, strict=True):
            tensor, raw = encode_output(o.name, a, typed)
            resp.outputs.append(tensor)
            if raw is not None:
                resp.raw_output_contents.append(raw)
        return resp

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, context)
        except Exception as exc:
            await abort(context, exc)
        raise AssertionError("unreachable")

    async def _answer(self, req: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                      ) -> pb.ModelStreamInferResponse:
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(req, context))
        except CoreError as exc:
            message = str(exc)
        except Exception:
            log.exception("unexpected error")
            message = "internal error; see the server log"
        return pb.ModelStreamInferResponse(
            error_message=message,
            infer_response=pb.ModelInferResponse(model_name=req.model_name,
                                                 model_version=req.model_version, id=req.id))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests are answered as they complete (different sequences concurrently,
        one sequence in order), up to ``STREAM_WINDOW`` per stream at once."""
        answers = pipelined(self.gate, request_iterator,
                            lambda req: self._answer(req, context), context)
        async with contextlib.aclosing(answers):
            async for answer in answers:
                yield answer
