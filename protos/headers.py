"""gRPC metadata keys and limits shared by the server and the clients."""

# The session a call belongs to, for load balancers that keep a session on one pod
# (consistent hash on this header: deploy/k8s/routing). Clients send it on every
# session-bound call; the server refuses a call whose header and body disagree.
SESSION_HEADER = "x-rnnserve-session"

# Sent by the server with ListModels' answer: which of its worker processes (serve
# --workers) the call's connection reached, as "index/count" ("0/1" for one process),
# so that a client can spread its connections evenly over them (AsyncClient.open_spread).
WORKER_HEADER = "x-rnnserve-worker"

# Sent by the server as a trailer of a call refused for a while (UNAVAILABLE,
# RESOURCE_EXHAUSTED): when to try again, in milliseconds (gRFC A6, which gRPC's own
# retry policy honours). The client's resumes wait that long before their next try.
RETRY_PUSHBACK = "grpc-retry-pushback-ms"

# The longest duration gRPC's channel arguments take (in milliseconds, a C int), in
# seconds: keepalive times and timeouts, a connection's maximum age.
MAX_MS_SECONDS = (2**31 - 1) // 1000


def grpc_ms(seconds: float) -> int:
    """A duration as gRPC's channel arguments take it: whole milliseconds, at least 1."""
    return max(1, round(seconds * 1000))
