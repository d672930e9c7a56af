"""Per-RPC metrics through a ``grpc.aio`` server interceptor.

Every RPC of every service (native API, health, reflection, and later the Open
Inference Protocol) is counted once when it completes, by api, method, model,
version and final status code; streams in progress are a gauge; unary RPCs get a
duration. A client that cancels a stream while the server waits for its next
message is sometimes seen by the server as a half-close (the read returns end of
stream, nothing is cancelled): that stream then counts with the status the server
answered (OK), as the server cannot tell the two apart. A handler that raises counts
UNKNOWN (what gRPC answers), and a call cut off because its deadline passed counts
DEADLINE_EXCEEDED (what its client saw), not CANCELLED.

A call is cut off wherever it is when gRPC ends it, and often that is not inside the
handler: a streaming handler is suspended at a ``yield`` while gRPC writes its
message, and a write that fails there (or a cancel that lands there) ends the call
without the handler seeing any error. So the code is not taken from what the handler
saw: a call counts OK only when its handler ran to its end before the deadline; one
that did not is cut off, DEADLINE_EXCEEDED when its deadline had passed (within
:data:`DEADLINE_SLACK_S`: the client's own timer fires first and its cancel can reach
the server a moment before the server's copy of the deadline), else CANCELLED.

The handlers name the model they served with :func:`rpc_model`, through a context
variable that the interceptor sets for each call, so no handler needs to know about
metrics.

It also guards every handler against requests whose bytes do not decode as the
method's message: gRPC would answer UNKNOWN with the decoder's exception text; here
they get INVALID_ARGUMENT naming the message type, and the handler never sees them.
"""

from __future__ import annotations

import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from rnnserve.server.metrics import Metrics

# service name -> api label; other services count as api="other"
APIS = {
    "rnnserve.v1.Inference": "native",
    "inference.GRPCInferenceService": "kserve_v2",
    "grpc.health.v1.Health": "health",
    "grpc.reflection.v1alpha.ServerReflection": "reflection",
    "grpc.reflection.v1.ServerReflection": "reflection",
}

INFERENCE_APIS = frozenset({"native", "kserve_v2"})


@dataclass(frozen=True)
class _Undecodable:
    """What the guarded deserializer returns for bytes that are not the message."""

    message: str


def _guard(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "the request message")

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # the protobuf decoder's error: corrupt wire format
            return _Undecodable(f"the request does not decode as {name} (corrupt or "
                                "foreign bytes)")
    return decode


async def _refuse(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        yield request


# A call cut off this close to its deadline was cut off by it: the client's timer
# starts before the server reads the call's timeout, so the client cancels first (by
# the time the request took to arrive) and its cancel can beat the server's timer.
DEADLINE_SLACK_S = 0.05


@dataclass
class _Call:
    model: str = ""
    version: int = 0
    ended: bool = False  # the handler ran to its end (returned; a generator ran out)
    # before the deadline: gRPC sends the status it set, OK by default. False when the
    # call was cut off: cancelled in the handler or while gRPC wrote a message, or
    # ended after its deadline, when gRPC can no longer answer in time
    failed: bool = False  # the handler raised: gRPC answers UNKNOWN


_current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("rnnserve_rpc",
                                                                       default=None)


def rpc_model(model: str, version: int) -> None:
    """Name the model a handler is serving, for the labels of this RPC's metrics."""
    call = _current.get()
    if call is not None:
        call.model, call.version = model, version


def _deadline_passed(context: grpc.aio.ServicerContext, slack: float = 0.0) -> bool:
    remaining = context.time_remaining()  # None without a deadline; never below 0
    return remaining is not None and remaining <= slack


def _code_name(context: grpc.aio.ServicerContext, call: _Call) -> str:
    """The status the call ended with. A status the handler set is that; otherwise a
    handler that raised ended UNKNOWN (what gRPC answers), one that ran to its end in
    time OK, and a call cut off DEADLINE_EXCEEDED when its deadline had passed (what
    the client saw: the server was too slow, not the client gone), else CANCELLED."""
    code = context.code()
    if code is None:
        if call.failed:
            return "UNKNOWN"
        if call.ended:
            return "OK"
        return ("DEADLINE_EXCEEDED" if _deadline_passed(context, DEADLINE_SLACK_S)
                else "CANCELLED")
    if isinstance(code, grpc.StatusCode):
        return code.name
    for c in grpc.StatusCode:  # some grpc versions report the integer value
        if c.value[0] == code:
            return c.name
    return "UNKNOWN"


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # inference RPCs begun and not yet completed (what a drain waits for; a health
        # Watch or a reflection stream does not end when the server drains)
        self.in_flight = 0

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").rpartition("/")
        api = APIS.get(service, "other")
        metrics = self._metrics

        def begin(context: grpc.aio.ServicerContext, streaming: bool) -> _Call:
            call = _Call()
            _current.set(call)  # this RPC's task has its own context
            started = time.perf_counter()
            inference = api in INFERENCE_APIS
            self.in_flight += inference
            if streaming:
                gauge = metrics.streams.labels(api, method)
                gauge.inc()

            def done(_: Any) -> None:
                self.in_flight -= inference
                code = _code_name(context, call)
                if streaming:
                    gauge.dec()
                metrics.observe_rpc(api, method, call.model, call.version, code,
                                    None if streaming else time.perf_counter() - started)

            context.add_done_callback(done)
            return call

        def wrap(inner: Any, streaming: bool, request_stream: bool) -> Any:
            if inspect.isasyncgenfunction(inner):
                async def gen(request: Any, context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[Any]:
                    call = begin(context, streaming)
                    if request_stream:
                        request = _checked(request, context)
                    elif isinstance(request, _Undecodable):
                        await _refuse(context, request)
                    try:
                        # gRPC stops iterating, with no error in here, when writing
                        # a message fails or is cancelled: ``ended`` stays False
                        async for resp in inner(request, context):
                            yield resp
                    except Exception:  # an abort sets its code first, which wins
                        call.failed = True
                        raise
                    call.ended = not _deadline_passed(context)
                return gen

            async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = begin(context, streaming)  # a streaming coroutine writes via context
                if request_stream:
                    request = _checked(request, context)
                elif isinstance(request, _Undecodable):
                    await _refuse(context, request)
                try:
                    result = await inner(request, context)
                except Exception:  # an abort sets its code first, which wins
                    call.failed = True
                    raise
                call.ended = not _deadline_passed(context)
                return result
            return coro

        ser, des = handler.response_serializer, _guard(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                wrap(handler.unary_unary, False, False), des, ser)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                wrap(handler.unary_stream, True, False), des, ser)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                wrap(handler.stream_unary, True, True), des, ser)
        return grpc.stream_stream_rpc_method_handler(
            wrap(handler.stream_stream, True, True), des, ser)
