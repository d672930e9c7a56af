"""Open-loop real-time streams: the load a fleet of live microphones puts on a server.

Each stream opens a session and sends one chunk per ``chunk_s`` on a fixed schedule
(chunk k is due at start + k * chunk_s), whatever the answers do; after
``session_chunks`` chunks it ends the session (last chunk ``end=True``) and opens a
new one on the next tick. A session holds one chunk in flight (the server's rule),
so a chunk whose predecessor is answered late goes out late; its latency is
measured from when it was due, not from when it went out, so a slow server cannot
hide its queue from the figures (no coordinated omission).

    result = asyncio.run(realtime_streams("127.0.0.1:8001", "speech", chunk_fn,
                                          streams=32, chunk_s=0.04, duration_s=30))
    result.percentile(99)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from rnnserve.client.client import AsyncClient, Data


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, answered chunks
    times: list[float] = field(default_factory=list)  # when each was due, from the start
    errors: Counter[str] = field(default_factory=Counter)  # status code name -> chunks
    sessions: int = 0
    late: int = 0  # chunks sent more than one chunk duration after they were due
    started: float = 0.0  # wall clock (time.time()) of the first chunk's due time
    ended: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


async def _one_stream(client: AsyncClient, model: str, chunk: Callable[[int], Data],
                      chunk_s: float, t0: float, until: float, session_chunks: int,
                      pcm16: bool, result: LoadResult, origin: float) -> None:
    k = 0
    loop = asyncio.get_running_loop()
    while t0 + k * chunk_s < until:
        try:
            async with client.stream(model, pcm16=pcm16) as s:
                result.sessions += 1
                for i in range(session_chunks):
                    due = t0 + k * chunk_s
                    if due >= until:
                        break
                    k += 1
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    elif -wait > chunk_s:
                        result.late += 1
                    last = i == session_chunks - 1 or due + chunk_s >= until
                    await s.send(chunk(k), end=last)
                    result.latencies.append(loop.time() - due)
                    result.times.append(due - origin)
                    if last:
                        break
        except grpc.aio.AioRpcError as exc:
            result.errors[exc.code().name] += 1
            k += 1  # the failed chunk's slot; the next session starts on the next tick


async def realtime_streams(target: str, model: str, chunk: Callable[[int], Data], *,
                           streams: int, chunk_s: float, duration_s: float,
                           session_chunks: int = 250, pcm16: bool = False,
                           timeout: float = 30.0) -> LoadResult:
    """Run ``streams`` real-time streams for ``duration_s``; ``chunk(k)`` gives chunk k."""
    result = LoadResult()
    loop = asyncio.get_running_loop()
    async with AsyncClient(target, timeout=timeout) as client:
        await client.list_models()  # connect before the clock starts
        start = loop.time() + 0.05
        until = start + duration_s
        result.started = time.time() + 0.05
        await asyncio.gather(*(
            _one_stream(client, model, chunk, chunk_s, start + i * chunk_s / streams, until,
                        session_chunks, pcm16, result, start)
            for i in range(streams)))
        result.ended = time.time()
    return result
