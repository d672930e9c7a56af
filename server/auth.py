"""Bearer-token authentication for every RPC but health checks.

The tokens file holds one token per line, optionally followed by the principal it
stands for (``TOKEN [PRINCIPAL]``; ``#`` at the start of a line or after whitespace starts
a comment). A token without a principal stands for ``token-`` and the first 12 hex digits
of its SHA-256; a token listed twice is refused. A call must carry
``authorization: Bearer TOKEN``; one without a listed token ends UNAUTHENTICATED
before any handler runs. The token is compared with every listed token in constant
time (``hmac.compare_digest``), so the answer's timing says nothing about how much of
a token matched. Health checks stay open: load balancers and Kubernetes probes send
no token. The call's principal is set for the core (``server/identity.py``), which keeps
each session to the principal that opened it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from rnnserve.errors import UsageError
from rnnserve.server.identity import set_principal

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
MIN_TOKEN_CHARS = 16
DENIED = "missing or invalid bearer token (send 'authorization: Bearer <token>')"

def default_principal(token: str) -> str:
    """The principal of a token listed without one: derived from the token, so it stays
    the same when lines are added or moved (the shared store keeps owners by name)."""
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _fields(line: str) -> list[str]:
    """The line's fields before its comment: ``#`` starts one at the start of the line
    or after whitespace, not inside a token or a principal."""
    fields = []
    for field in line.split():
        if field.startswith("#"):
            break
        fields.append(field)
    return fields


def load_tokens(path: Path) -> list[tuple[bytes, str]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read the tokens file {str(path)!r}: {exc.strerror}") from None
    tokens = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        fields = _fields(line)
        if not fields:
            continue
        if len(fields) > 2:
            raise UsageError(f"{path}:{n}: expected 'TOKEN [PRINCIPAL]'")
        if len(fields[0]) < MIN_TOKEN_CHARS:
            raise UsageError(f"{path}:{n}: a token needs at least {MIN_TOKEN_CHARS} characters")
        if fields[0] in seen:  # which principal would it be? (the token itself is not said)
            raise UsageError(f"{path}: a token is listed twice (lines {seen[fields[0]]} "
                             f"and {n})")
        seen[fields[0]] = n
        tokens.append((fields[0].encode(),
                       fields[1] if len(fields) == 2 else default_principal(fields[0])))
    if not tokens:
        raise UsageError(f"the tokens file {str(path)!r} lists no token")
    return tokens


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[tuple[bytes, str]]) -> None:
        self._tokens = tokens

    def _match(self, presented: bytes) -> str | None:
        found = None
        for token, who in self._tokens:  # no early exit: every token is compared
            if hmac.compare_digest(token, presented):
                found = who
        return found

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        header = next((v for k, v in details.invocation_metadata or ()
                       if k == "authorization"), "")
        scheme, _, token = str(header).partition(" ")
        who = self._match(token.strip().encode()) if scheme.lower() == "bearer" else None
        if who is None:
            return _denying(handler)
        set_principal(who)  # the interceptor runs in the call's context
        return handler


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
