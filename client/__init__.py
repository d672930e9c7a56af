"""Python client for the rnnserve native API: ``AsyncClient`` (asyncio) and ``Client`` (sync)."""

from rnnserve.client.client import AsyncClient, Client, StreamSession

__all__ = ["AsyncClient", "Client", "StreamSession"]
