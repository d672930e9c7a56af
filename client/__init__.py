"""Python client for the rnnserve native API: ``AsyncClient`` (asyncio) and ``Client`` (sync)."""

from rnnserve.client.client import (
    OWN_CONNECTION,
    AsyncClient,
    Client,
    ManyStream,
    PackedAnswer,
    PackedStream,
    StreamSession,
    add_many_item,
    item_status,
    many_item,
    outputs,
    packed_request,
    status_of,
)

__all__ = ["OWN_CONNECTION", "AsyncClient", "Client", "ManyStream", "PackedAnswer",
           "PackedStream", "StreamSession", "add_many_item", "item_status", "many_item",
           "outputs", "packed_request", "status_of"]
