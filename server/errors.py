"""Errors of the serving core, each with the status code an API adapter answers with.

Hierarchy::

    CoreError                      code: INTERNAL
    ├── ModelNotFound              NOT_FOUND (names the models that exist)
    ├── DeviceUnavailable          FAILED_PRECONDITION (cuda demanded, not obtained)
    ├── InvalidChunk               INVALID_ARGUMENT (says what was expected)
    ├── SessionError
    │   ├── SessionNotFound        NOT_FOUND
    │   ├── SessionExpired         NOT_FOUND, reason "expired": idle too long
    │   ├── SessionEvicted         RESOURCE_EXHAUSTED, reason "evicted": caps reached
    │   ├── SessionClosed          FAILED_PRECONDITION: ended or closed
    │   ├── SessionExists          ALREADY_EXISTS
    │   ├── SessionBusy            FAILED_PRECONDITION: another chunk is in flight
    │   ├── OutOfOrder             FAILED_PRECONDITION: names the expected sequence number
    │   ├── SessionForbidden       PERMISSION_DENIED: another principal's session
    │   ├── SessionHeld            ABORTED: another server holds its lease (retry later)
    │   ├── SessionMoved           ABORTED: another server advanced it; resume it
    │   │   └── SessionTaken       another server took it while this one served it
    │   │                          from memory (degrade); resume it
    │   ├── RecordCorrupt          DATA_LOSS: its stored record is damaged
    │   └── RecordForeign          FAILED_PRECONDITION: its record is another model's
    ├── StoreUnavailable           UNAVAILABLE: the shared session store cannot be reached
    ├── VersionLoading             UNAVAILABLE: a version named (or a stored session's) is
    │                              in the model repository, not loaded here yet
    │                              (--repo-poll-s); retry
    ├── Overloaded                 RESOURCE_EXHAUSTED (queue full, at capacity, a
    │   │                          principal's limit; with a retry hint)
    │   └── PoolFull               a fixed state pool has no free row (server.pool)
    ├── DeadlineExpired            DEADLINE_EXCEEDED (not run in time; nothing advanced)
    ├── ShuttingDown               UNAVAILABLE (draining; go to another replica)
    └── BatchFailed                INTERNAL (the run failed; message is generic)

The code is a name from grpc.StatusCode, so the core never imports grpc.
"""

from __future__ import annotations


class CoreError(Exception):
    code = "INTERNAL"
    reason = "internal"
    # a hint for the client: retry after this long (the gRPC adapters send it as the
    # grpc-retry-pushback-ms trailer, which gRPC's own retry policy honours)
    retry_after_ms: int | None = None

    def __init__(self, message: str = "", *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        if retry_after_ms is not None:
            self.retry_after_ms = retry_after_ms


class ModelNotFound(CoreError):
    code = "NOT_FOUND"
    reason = "model_not_found"


class DeviceUnavailable(CoreError):
    code = "FAILED_PRECONDITION"
    reason = "device_unavailable"


class InvalidChunk(CoreError):
    code = "INVALID_ARGUMENT"
    reason = "invalid_chunk"


class SessionError(CoreError):
    pass


class SessionNotFound(SessionError):
    code = "NOT_FOUND"
    reason = "session_unknown"


class SessionExpired(SessionError):
    code = "NOT_FOUND"
    reason = "session_expired"


class SessionEvicted(SessionError):
    code = "RESOURCE_EXHAUSTED"
    reason = "session_evicted"


class SessionClosed(SessionError):
    code = "FAILED_PRECONDITION"
    reason = "session_closed"


class SessionExists(SessionError):
    code = "ALREADY_EXISTS"
    reason = "session_exists"


class Overloaded(CoreError):
    code = "RESOURCE_EXHAUSTED"
    reason = "overloaded"


class BatchFailed(CoreError):
    code = "INTERNAL"
    reason = "batch_failed"


class SessionBusy(SessionError):
    code = "FAILED_PRECONDITION"
    reason = "session_busy"


class OutOfOrder(SessionError):
    code = "FAILED_PRECONDITION"
    reason = "out_of_order"


class ShuttingDown(CoreError):
    code = "UNAVAILABLE"
    reason = "shutting_down"


class SessionHeld(SessionError):
    code = "ABORTED"
    reason = "session_held"


class SessionRelocated(SessionHeld):
    """The session was handed to another shard by an online resharding: a server on the
    previous list of shards must not read or write it (``shared.py``)."""
    reason = "session_relocated"


class SessionMoved(SessionError):
    code = "ABORTED"
    reason = "session_moved"


class SessionTaken(SessionMoved):
    reason = "session_taken"


class RecordCorrupt(SessionError):
    code = "DATA_LOSS"
    reason = "record_corrupt"


class RecordForeign(SessionError):
    code = "FAILED_PRECONDITION"
    reason = "record_foreign"


class StoreUnavailable(CoreError):
    code = "UNAVAILABLE"
    reason = "store_unavailable"


class VersionLoading(CoreError):
    code = "UNAVAILABLE"
    reason = "version_loading"


class StoreUnsure(CoreError):
    """The store did not answer where a session is while it moves between shards
    (resharding online): unlike ``StoreUnavailable``, never served from memory instead
    (``--store-failure degrade``), which could run the session on two shards."""

    code = "UNAVAILABLE"
    reason = "store_unavailable"


class SessionForbidden(SessionError):
    code = "PERMISSION_DENIED"
    reason = "session_forbidden"


class DeadlineExpired(CoreError):
    code = "DEADLINE_EXCEEDED"
    reason = "deadline"
