"""Python client for the rnnserve native API: ``AsyncClient`` (asyncio) and ``Client`` (sync)."""

from rnnserve.client.client import OWN_CONNECTION, AsyncClient, Client, StreamSession

__all__ = ["OWN_CONNECTION", "AsyncClient", "Client", "StreamSession"]
